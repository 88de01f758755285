"""Property-based fuzz targets of lckv's public surface, driven by hypothesis.

A target is a function ``target(case) -> None`` registered in :data:`TARGETS`. It draws one input
through ``case`` (hypothesis strategies, recorded in ``case.trace`` so a failure prints the input
that made it), calls lckv, and checks the contract:

* a valid input gets the documented result: compared with the pure-PyTorch reference of
  :mod:`lckv.reference` (or an independent oracle where there is none), with tolerances by kind
  of op (STYLE.md 3): float32 exact ops ``rtol = atol = 1e-5``; 16-bit exact ops at most 2x the
  error of PyTorch's own computation in that dtype against the float32 result, plus the rounding
  of the output to its dtype; selections and index results as sets and by their scores;
* an invalid input (``case.bad`` names the arguments made invalid) raises an allowed exception
  (:class:`ValueError` and lckv's subclasses of it, :class:`TypeError`, :class:`FileNotFoundError`,
  per target a few more) whose message names the offending argument;
* never a crash (any other exception), NaN where the docs promise a finite output, or a changed
  state after a failed call (inputs mutated, an index's ``size``, a cache's lengths).

A contract violation raises :class:`Violation`; :func:`run_target` runs a target for ``n`` cases from
a seed (hypothesis ``@given`` with ``@seed``, generation phase only, no example database) and
collects the violations with their inputs instead of stopping at the first. ``benchmarks/fuzz.py``
is the command line; ``tests/test_fuzz.py`` runs a small sample in CI.

Tensors are small (dims <= 64, rows <= 512): a case costs milliseconds. Values come from a
``torch.Generator`` seeded by a drawn integer, so the trace of a tensor is its recipe (shape,
dtype, memory layout, seed, injected NaN/inf).
"""
from __future__ import annotations

import atexit
import dataclasses
import faulthandler
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings
from hypothesis import strategies as st

from lckv import ops, reference
from lckv.backends import available_backends

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the training package sits beside lckv, at the repository root
    sys.path.insert(0, str(ROOT))

__all__ = ["TARGETS", "Violation", "Case", "Failure", "TargetReport", "run_target", "target_seed", "CRASH_GUARD"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (0, 1, 2, 3, 8, 16, 33, 59, 64)
LAYOUTS = ("contiguous", "contiguous", "transposed", "strided", "offset", "expanded")
MUTATION_CHANCE = 0.3  # of a case with one invalid argument (hypothesis favours small draws: ~0.45 in fact)
SLOW_CASE_S = 20.0  # a case slower than this is reported (a hang, or close to one)
HANG_S = 120.0  # a case still running after this dumps every thread's stack and exits the process
_BAD_FLOAT_DTYPES = (torch.float64, torch.int32, torch.int64, torch.bool)
_HUGE = (10**5, 2**40, 2**62, 2**63)  # "huge k": padded when it fits in memory, else refused by name


class Violation(AssertionError):
    """The contract of the target's surface does not hold for this input."""


# ----------------------------------------------------------------------------- the case
def _short(value, limit: int = 160) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Case:
    """One generated input: hypothesis draws, their trace, and the names made invalid."""

    def __init__(self, data):
        self.data = data
        self.trace: dict[str, str] = {}
        self.bad: set[str] = set()  # argument names a mutation made invalid (the error must name one)
        self.refused = False  # the call raised an allowed error

    def draw(self, label: str, strategy):
        value = self.data.draw(strategy, label=label)
        self.trace[label] = _short(value)
        return value

    def int(self, label: str, lo: int, hi: int) -> int:
        return self.draw(label, st.integers(lo, hi))

    def choice(self, label: str, options):
        return self.draw(label, st.sampled_from(list(options)))

    def chance(self, label: str, p: float) -> bool:
        return self.draw(label, st.integers(0, 999)) < int(p * 1000)

    def note(self, label: str, value) -> None:
        self.trace[label] = _short(value)

    def refuse(self, exc: BaseException, names, allowed=None) -> None:
        """``exc`` is an allowed refusal naming one of ``names`` (else :class:`Violation`)."""
        check_error(exc, names, ALLOWED if allowed is None else allowed)
        self.refused = True

    def tensor(self, label: str, shape, dtype=torch.float32, layout: str | None = None, scale: float = 1.0,
               special: bool = False, kind: str = "randn"):
        """A tensor of ``shape`` with fresh random values (seeded) in a drawn memory layout (same
        values, other strides); ``special`` puts one NaN/inf/-inf at a drawn element."""
        seed = self.draw(f"{label}.seed", st.integers(0, 2**32 - 1))
        layout = layout or self.choice(f"{label}.layout", LAYOUTS)
        gen = torch.Generator().manual_seed(seed)
        if kind == "randn":
            base = torch.randn(tuple(shape), generator=gen) * scale
        else:  # "rand": uniform [0, scale)
            base = torch.rand(tuple(shape), generator=gen) * scale
        where = None
        if special and base.numel():
            where = self.int(f"{label}.special_at", 0, base.numel() - 1)
            value = self.choice(f"{label}.special", (float("nan"), float("inf"), float("-inf")))
            base.view(-1)[where] = value
        t = with_layout(base.to(dtype), layout)
        self.note(label, f"tensor(shape={tuple(shape)}, dtype={str(dtype)[6:]}, layout={layout}, seed={seed}"
                         + (f", special at flat {where}" if where is not None else "") + ")")
        return t


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory layout: ``transposed`` (last two dims swapped in memory),
    ``strided`` (every other element of a wider buffer), ``offset`` (a storage offset),
    ``expanded`` (the first dim broadcast from one row, where it has size > 1: changes values)."""
    if t.dim() == 0 or t.numel() == 0 or layout == "contiguous":
        return t
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout == "offset":
        buf = torch.zeros(t.numel() + 7, dtype=t.dtype)
        buf[7:] = t.reshape(-1)
        return buf[7:].view(t.shape)
    if layout == "expanded" and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t


# ----------------------------------------------------------------------------- contract helpers
#: exception types a failed call may raise (lckv's own errors subclass ValueError)
ALLOWED = (ValueError, TypeError, FileNotFoundError)
_DEEP = ("incompatible function arguments",)  # pybind's own argument error: not a check of lckv's


def _names_any(message: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (raised at {Path(last.filename).name}:{last.lineno} in {last.name})"


def check_error(exc: BaseException, names, allowed=ALLOWED) -> None:
    """``exc`` must be of an allowed type and its message must name one of ``names``."""
    message = str(exc)
    if not isinstance(exc, allowed) or any(d in message for d in _DEEP):
        raise Violation(f"{type(exc).__name__}: {message[:300]}{_where(exc)}") from exc
    if names and not _names_any(message, names):
        raise Violation(f"{type(exc).__name__} does not name {sorted(names)}: {message[:300]}{_where(exc)}") from exc


class CaseSkipped(BaseException):
    """Raised by :func:`call` in a case listed in ``CRASH_GUARD["skip"]`` (it crashed the process)."""


#: crash isolation (benchmarks/fuzz.py runs targets in a worker process): ``log`` a file that
#: :func:`call` overwrites with the current case before every call into lckv, so a parent can name
#: the input that killed the worker; ``skip`` the (target, case) pairs not to call again
CRASH_GUARD: dict = {"log": None, "skip": set(), "current": None}


def _before_call() -> None:
    current = CRASH_GUARD["current"]
    if current is None:
        return
    if (current["target"], current["case"]) in CRASH_GUARD["skip"]:
        raise CaseSkipped()
    if CRASH_GUARD["log"] is not None:
        Path(CRASH_GUARD["log"]).write_text(json.dumps(current, default=repr))


def call(fn, *args, **kwargs):
    """``(result, None)`` or ``(None, exception)``; a BaseException that is not an Exception escapes."""
    _before_call()
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - judged by the caller
        return None, exc


def checked_call(fn, args: dict):
    """``call(fn, **args)``, then checks that the call left the tensors among ``args`` unchanged."""
    snap = snapshot(args)
    result, exc = call(fn, **args)
    check_unchanged(snap)
    return result, exc


def expect_error(case: Case, result, exc, names=None, allowed=ALLOWED) -> bool:
    """For an input made invalid (``case.bad``): True when it raised as it should; raises
    :class:`Violation` when it was accepted or raised wrongly. For a valid input: False when it
    succeeded, else the exception is a violation."""
    if case.bad:
        if exc is None:
            raise Violation(f"accepted an invalid {'/'.join(sorted(case.bad))}: returned {_short(result, 120)}")
        case.refuse(exc, names or case.bad, allowed)
        return True
    if exc is not None:
        raise Violation(f"valid input raised {type(exc).__name__}: {str(exc)[:300]}{_where(exc)}") from exc
    return False


def snapshot(values) -> list:
    """Copies of the tensors among ``values`` (nested lists/tuples/dicts), to detect mutation."""
    out = []
    for v in _tensors(values):
        out.append((v, None if v.device.type == "meta" else v.detach().clone()))
    return out


def _tensors(values):
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _tensors(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from _tensors(v)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        same_nan = torch.equal(a.isnan(), b.isnan())
        return same_nan and torch.equal(a.nan_to_num(0.0, 1.0, -1.0), b.nan_to_num(0.0, 1.0, -1.0))
    return torch.equal(a, b)


def check_unchanged(snap, what: str = "an input") -> None:
    for live, copy in snap:
        if copy is not None and not same_tensor(live, copy):
            raise Violation(f"{what} of shape {tuple(live.shape)} was modified by the call")


def check_finite_out(t: torch.Tensor, name: str, allow_neg_inf: bool = False) -> None:
    if t.numel() == 0:
        return
    if bool(torch.isnan(t).any()):
        raise Violation(f"{name} holds NaN")
    bad = torch.isinf(t) if not allow_neg_inf else (t == float("inf"))
    if bool(bad.any()):
        raise Violation(f"{name} holds {'+inf' if allow_neg_inf else 'inf'}")


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Elementwise ``|got - want| <= atol + rtol |want|``; non-finite entries must be equal."""
    if tuple(got.shape) != tuple(want.shape):
        raise Violation(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.double(), want.double()
    fin = torch.isfinite(w)
    if not torch.equal(torch.isfinite(g), fin) or not torch.equal(g[~fin], w[~fin]):
        raise Violation(f"{what}: non-finite entries differ from the reference")
    err = (g - w).abs()[fin]
    tol = (atol + rtol * w.abs())[fin]
    if err.numel() and bool((err > tol).any()):
        worst = int((err - tol).argmax())
        raise Violation(f"{what}: |got - want| {err[worst].item():.3g} > {tol[worst].item():.3g} "
                        f"(want {w[fin][worst].item():.6g})")


def close_lowp(got, want, lowp, what: str) -> None:
    """16-bit rule (flash-attn's): ``max |got - want| <= 2 max |lowp - want|`` plus the rounding of
    ``got`` to its dtype, where ``lowp`` is PyTorch's own computation in the inputs' dtype."""
    if tuple(got.shape) != tuple(want.shape):
        raise Violation(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w, lp = got.double(), want.double(), lowp.double()
    fin = torch.isfinite(w)
    if not torch.equal(torch.isfinite(g), fin) or not torch.equal(g[~fin], w[~fin]):
        raise Violation(f"{what}: non-finite entries differ from the reference")
    if not fin.any():
        return
    lowp_err = (lp - w).abs()[fin].nan_to_num(float("inf")).max().item()
    rounding = torch.finfo(got.dtype).eps * w[fin].abs().max().item() if got.is_floating_point() else 0.0
    bound = 2.0 * lowp_err + rounding + 1e-6
    err = (g - w).abs()[fin].max().item()
    if err > bound:
        raise Violation(f"{what}: max error {err:.3g} > 2 x PyTorch's {got.dtype} error {lowp_err:.3g} + rounding")


def close_to_exact(got, ref, exact, what: str, floor: float = 1e-5) -> None:
    """float32 kernels whose result is ill-conditioned (a difference of near-equal sums): ``got``'s
    error against the float64 ``exact`` at most 2x that of the float32 reference ``ref`` (PyTorch's
    own float32 computation of the same formula), plus ``floor``; non-finite entries as ``ref``'s."""
    g, r, x = got.double(), ref.double(), exact.double()
    fin = torch.isfinite(r)
    if not torch.equal(torch.isfinite(g), fin) or not torch.equal(g[~fin], r[~fin]):
        raise Violation(f"{what}: non-finite entries differ from the reference")
    both = fin & torch.isfinite(x)
    if not both.any():
        return
    err, ref_err = (g - x).abs()[both].max().item(), (r - x).abs()[both].max().item()
    if err > 2 * ref_err + floor:
        raise Violation(f"{what}: error {err:.3g} against float64 > 2 x the float32 reference's {ref_err:.3g} "
                        f"+ {floor:g}")


def lowest_dtype(*tensors) -> torch.dtype:
    return max((t.dtype for t in tensors), key=lambda d: torch.finfo(d).eps)


def lowp_attention(q, k, v, bias, scale: float, dtype):
    """PyTorch's own attention in ``dtype`` (every step): ``q [B, Hq, L, D]``, ``k``/``v``
    ``[B, Hkv, S, D]``, additive ``bias`` broadcastable to ``[B, Hq, L, S]`` (-inf = masked)."""
    group = q.shape[1] // max(1, k.shape[1])
    k = k.to(dtype).repeat_interleave(group, 1)
    v = v.to(dtype).repeat_interleave(group, 1)
    scores = (q.to(dtype) @ k.transpose(-1, -2)) * scale + bias.to(dtype)
    lse = torch.logsumexp(scores, -1) if scores.shape[-1] else scores.new_full(scores.shape[:-1], float("-inf"))
    out = torch.nan_to_num(torch.softmax(scores, -1)) @ v if scores.shape[-1] else q.new_zeros(q.shape).to(dtype)
    return out, lse.float()


def compare_attention(out, lse, want_out, want_lse, lowp, what: str) -> None:
    """An attention result against the float32 reference: fp32 tolerance, or the 16-bit rule
    with ``lowp = (out, lse)`` of PyTorch's own low-precision attention."""
    if lse.dtype != torch.float32:
        raise Violation(f"{what}: lse has dtype {lse.dtype}, documented float32")
    check_finite_out(out, f"{what} out")
    check_finite_out(lse, f"{what} lse", allow_neg_inf=True)
    empty = torch.isneginf(lse)
    if empty.any() and bool(out[empty].ne(0).any()):
        raise Violation(f"{what}: rows with lse -inf must have out 0")
    if lowp is None:
        close(out, want_out, f"{what} out")
        close(lse, want_lse, f"{what} lse")
    else:
        close_lowp(out, want_out, lowp[0], f"{what} out")
        close_lowp(lse, want_lse, lowp[1], f"{what} lse")


# ----------------------------------------------------------------------------- mutations
def _bad_value(case: Case, label: str):
    return case.choice(label, (None, "x", 3, [1.0, 2.0]))


def mutate(case: Case, args: dict, options: dict, prefix: str = "", chance: float = MUTATION_CHANCE) -> dict:
    """With probability ``chance``, a copy of ``args`` with one argument made invalid. ``options``
    maps an argument name to ``[(kind, names), ...]``: ``names`` the names its error may name
    (None: the argument's), ``kind`` one of ``type`` (None, a str, an int, a list), ``dtype`` /
    ``index_dtype`` / ``int_dtype`` / ``nonfloat`` (a wrong dtype), ``ndim``, ``dim<i>`` (dim i one
    longer), ``meta`` (this tensor on the meta device), ``all_meta`` (every tensor: the pseudo
    argument ``devices``), ``nan`` / ``inf`` (one element), ``set:<v>`` (one element set to v, an
    id out of range), ``noncontiguous``, ``dup`` (a repeated position), ``value:<a>|<b>|...`` (a
    bad plain value, see :func:`_parse`). Records the names in ``case.bad``; an empty tensor
    leaves the input valid."""
    choices = [(arg, kind, names) for arg, kinds in options.items() for kind, names in kinds]
    if not choices or not case.chance(f"{prefix}mutate", chance):
        return args
    arg, kind, names = case.choice(f"{prefix}mutation", choices)
    label = f"{prefix}{arg}"
    value = args.get(arg)
    args = dict(args)
    if kind == "all_meta":  # every tensor on the meta device: no data to compute on
        args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        names = ("meta", "device")
    elif kind == "type":
        args[arg] = _bad_value(case, f"{label}.bad_value")
    elif kind == "dtype":
        args[arg] = value.to(case.choice(f"{label}.bad_dtype", _BAD_FLOAT_DTYPES))
    elif kind == "index_dtype":
        args[arg] = value.to(case.choice(f"{label}.bad_dtype", [d for d in (torch.int32, torch.float32, torch.bool)
                                                                   if d != value.dtype]))
    elif kind == "int_dtype":
        args[arg] = value.to(torch.int32)
    elif kind == "nonfloat":  # for ops whose reference takes any floating dtype
        args[arg] = value.to(case.choice(f"{label}.bad_dtype", (torch.int32, torch.int64, torch.bool)))
    elif kind == "ndim":
        fewer = value.dim() != 1 and case.chance(f"{label}.fewer_dims", 0.5)
        args[arg] = value.reshape(-1) if fewer else value.unsqueeze(0)
    elif kind.startswith("dim"):  # one dimension one longer: no longer matches the others
        d = int(kind[3:])
        pad = list(value.shape)
        pad[d] = 1
        args[arg] = torch.cat([value, torch.zeros(pad, dtype=value.dtype)], dim=d)
    elif kind == "meta":
        args[arg] = value.to("meta")
    elif kind in ("nan", "inf"):
        if value.numel() == 0:
            return mutate_none(case, args, prefix)
        bad = value.clone(memory_format=torch.contiguous_format)
        bad.view(-1)[case.int(f"{label}.special_at", 0, bad.numel() - 1)] = float(kind)
        args[arg] = bad
    elif kind.startswith("set:"):  # one element set to a bad value (an index out of range)
        if value.numel() == 0:
            return mutate_none(case, args, prefix)
        bad = value.clone(memory_format=torch.contiguous_format)
        bad.view(-1)[case.int(f"{label}.at", 0, bad.numel() - 1)] = int(kind[4:])
        args[arg] = bad
    elif kind == "noncontiguous":
        if value.dim() < 2 or min(value.shape) < 2:
            return mutate_none(case, args, prefix)
        args[arg] = value.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif kind == "dup":  # a repeated position
        if value.numel() < 2:
            return mutate_none(case, args, prefix)
        bad = value.clone()
        bad[1] = bad[0]
        args[arg] = bad
    else:  # "value:<v1>|<v2>..." a bad plain value
        args[arg] = case.choice(f"{label}.bad_value", [_parse(v) for v in kind.split(":", 1)[1].split("|")])
    case.bad = set(names or (arg,))
    case.note(f"{prefix}mutated", f"{arg} ({kind})")
    return args


def mutate_none(case: Case, args: dict, prefix: str = "") -> dict:
    case.note(f"{prefix}mutated", "nothing (the tensor is empty)")
    return args


_NAMED_VALUES = {"None": None, "True": True, "False": False, "nan": float("nan"), "inf": float("inf"),
                 "-inf": float("-inf"), "str": "4", "list": [1]}


def _parse(text: str):
    """A plain value of a ``value:`` mutation: a name above, a float, an int, or the text itself."""
    if text in _NAMED_VALUES:
        return _NAMED_VALUES[text]
    if "." in text:
        return float(text)
    return int(text) if text.lstrip("-").isdigit() else text


def pick_backend(case: Case, op: str) -> str:
    """``auto`` or a backend that serves ``op`` on CPU tensors here."""
    return case.choice("backend", ["auto", *available_backends(op, "cpu")])


def resolved(op: str, backend: str) -> str:
    from lckv.backends import resolve_backend

    return resolve_backend(op, "cpu", backend)


# ----------------------------------------------------------------------------- ops: attention
def _heads(case: Case):
    return (case.int("batch", 0, 3), case.int("kv_heads", 1, 3), case.int("group", 1, 3),
            case.choice("head_dim", HEAD_DIMS))


def _scale(case: Case):
    return None if case.chance("scale.default", 0.5) else case.draw("scale", st.floats(0.01, 2.0))


_Q_MUTATIONS = [("type", None), ("dtype", None), ("ndim", None), ("nan", None), ("inf", None)]
_SCALE_MUTATION = ("value:nan|inf|-inf|str|list", ("scale",))
_BACKEND_MUTATION = ("value:bogus|None|CPU", ("backend",))
_META = {"devices": [("all_meta", None)]}  # an options entry: every tensor argument on the meta device


def _mutate_attention(case: Case, args: dict, options: dict, head_dim: int) -> dict:
    """:func:`mutate` for an attention op, with the meta-device mutation; a head_dim of 0 makes the
    case invalid whatever was mutated (no attention over zero dims, and no default scale)."""
    args = mutate(case, args, {**options, **_META})
    if head_dim == 0:
        case.bad |= {"q", "head_dim"}
    return args


def _nonfinite_rows(k, v):
    """[B, Hkv, S] rows of k or v holding NaN/inf."""
    return ~(torch.isfinite(k.float()).all(-1) & torch.isfinite(v.float()).all(-1))


def _kv_special(case: Case, shape, dtype):
    """k, v with (sometimes) one non-finite element: the op must refuse it when it reads its row."""
    special = case.chance("kv_special", 0.15)
    which = case.choice("kv_special.in", ("k", "v")) if special else None
    k = case.tensor("k", shape, dtype, special=which == "k")
    v = case.tensor("v", shape, dtype, special=which == "v")
    return k, v


def target_attention_with_lse(case: Case) -> None:
    """Dense attention (causal, bool/float masks, key padding, GQA, 16-bit, strides) against
    :func:`lckv.reference.attention_with_lse`; k/v NaN refused by name (the op scans them)."""
    B, Hkv, G, D = _heads(case)
    L, S = case.int("q_len", 0, 12), case.int("kv_len", 0, 40)
    q_dtype, kv_dtype = case.choice("q_dtype", FLOAT_DTYPES), case.choice("kv_dtype", FLOAT_DTYPES)
    q = case.tensor("q", (B, Hkv * G, L, D), q_dtype)
    k, v = _kv_special(case, (B, Hkv, S, D), kv_dtype)
    causal = case.chance("causal", 0.5)
    mask = key_padding = None
    mask_kind = case.choice("mask", ("none", "none", "bool", "float"))
    if mask_kind != "none":
        shape = (B if case.chance("mask.per_batch", 0.5) else 1, Hkv * G if case.chance("mask.per_head", 0.5) else 1,
                 L if case.chance("mask.per_query", 0.5) else 1, S)
        u = case.tensor("mask", shape, kind="rand", layout="contiguous")
        mask = u > 0.3 if mask_kind == "bool" else torch.where(u > 0.3, u - 0.5, float("-inf"))
    if case.chance("key_padding", 0.3):
        key_padding = case.tensor("key_padding", (B, S), kind="rand", layout="contiguous") > 0.2
    scale = _scale(case)
    plain = mask is None and q_dtype == kv_dtype
    backend = case.choice("backend", ["auto", "reference"] + (["torch"] if plain else []))
    args = dict(q=q, k=k, v=v, causal=causal, mask=mask, scale=scale, key_padding=key_padding, backend=backend)
    options = {"q": _Q_MUTATIONS + [("dim3", ("q", "k")), ("meta", ("q", "device"))],
               "k": [("dtype", ("k", "v")), ("ndim", None), ("dim0", ("k", "q")), ("dim3", ("k", "v", "q"))],
               "v": [("dim2", ("k", "v")), ("meta", ("v", "device"))],
               "scale": [_SCALE_MUTATION], "backend": [("value:bogus|None|cpu", ("backend",))]}
    if mask is not None:
        options["mask"] = [("int_dtype", ("mask",)), ("dim3", ("mask",))]
    if key_padding is not None:
        options["key_padding"] = [("index_dtype", ("key_padding",)), ("dim1", ("key_padding",))]
    if Hkv > 1:
        options["q"].append(("dim1", ("q_heads", "kv_heads")))
    args = _mutate_attention(case, args, options, D)
    if bool(_nonfinite_rows(k, v).any()):
        case.bad |= {"k", "v"}  # the dense op scans k and v
    result, exc = checked_call(ops.attention_with_lse, args)
    if expect_error(case, result, exc):
        return
    out, lse = result
    if out.dtype != q.dtype or tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != (B, Hkv * G, L):
        raise Violation(f"out {out.dtype} {tuple(out.shape)}, lse {tuple(lse.shape)}: not the documented shapes")
    want = reference.attention_with_lse(q.float(), k.float(), v.float(), causal, mask, scale, key_padding)
    lowp = None
    if lowest_dtype(q, k, v) != torch.float32:
        bias = torch.zeros(B, Hkv * G, L, S)
        if causal:
            bias = bias.masked_fill(torch.arange(S)[None, :] > torch.arange(L)[:, None] + (S - L), float("-inf"))
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
        if key_padding is not None:
            bias = bias.masked_fill(~key_padding[:, None, None, :], float("-inf"))
        lowp = lowp_attention(q, k, v, bias, 1 / math.sqrt(D) if scale is None else scale, lowest_dtype(q, k, v))
    compare_attention(out, lse, *want, lowp, "attention_with_lse")


def _read_special(k, v, read) -> str:
    """How a non-finite K/V row matters: ``"read"`` (the op must refuse it), ``"unread"`` (a fast
    backend ignores it, the reference may refuse it) or ``""``; ``read [B, Hkv, S]`` bool."""
    bad = _nonfinite_rows(k, v)
    if not bad.any():
        return ""
    return "read" if bool((bad & read).any()) else "unread"


def target_sparse_attention_with_lse(case: Case) -> None:
    """Decode sparse attention (GQA, -1 padding, repeats, 16-bit K/V read in place, strides)
    against :func:`lckv.reference.sparse_attention_with_lse`; NaN in a row read is refused."""
    B, Hkv, G, D = _heads(case)
    S, n = case.int("seq", 0, 40), case.int("n_selected", 0, 20)
    q = case.tensor("q", (B, Hkv * G, D), case.choice("q_dtype", FLOAT_DTYPES))
    k, v = _kv_special(case, (B, Hkv, S, D), case.choice("kv_dtype", FLOAT_DTYPES))
    gen = torch.Generator().manual_seed(case.int("indices.seed", 0, 2**31))
    indices = torch.randint(-1, S, (B, Hkv, n), generator=gen) if S else torch.full((B, Hkv, n), -1)
    case.note("indices", indices.tolist() if indices.numel() <= 40 else f"randint seed {case.trace['indices.seed']}")
    scale = _scale(case)
    backend = pick_backend(case, "sparse_attention_with_lse")
    args = dict(q=q, k=k, v=v, indices=indices, scale=scale, backend=backend)
    options = {"q": _Q_MUTATIONS + [("dim2", ("q", "k")), ("meta", ("q", "device"))],
               "k": [("dtype", ("k", "v")), ("ndim", None), ("dim0", ("k", "q")), ("dim3", ("k", "v", "q")),
                     ("meta", ("k", "device"))],
               "v": [("dim2", ("k", "v"))],
               "indices": [("index_dtype", None), ("ndim", None), ("dim1", None), (f"set:{S}", None),
                           ("set:-2", None), ("meta", ("indices", "device"))],
               "scale": [_SCALE_MUTATION], "backend": [_BACKEND_MUTATION]}
    if Hkv > 1:
        options["q"].append(("dim1", ("q_heads", "kv_heads")))
    args = _mutate_attention(case, args, options, D)
    special = ""
    if not case.bad:
        read = torch.zeros(B, Hkv, S, dtype=torch.long)
        if S:  # count hits: a -1 slot (clamped to row 0) must not un-mark a selected row 0
            read.scatter_add_(2, indices.clamp(min=0), (indices >= 0).long())
        special = _read_special(k, v, read > 0)
        if special == "read":
            case.bad = {"k", "v"}
    elif bool(_nonfinite_rows(k, v).any()):
        case.bad |= {"k", "v"}  # a bad argument and a non-finite row: either may be named
    result, exc = checked_call(ops.sparse_attention_with_lse, args)
    if special == "unread" and exc is not None and resolved("sparse_attention_with_lse", backend) == "reference":
        case.refuse(exc, {"k", "v"})  # the reference scans all of k and v
        return
    if expect_error(case, result, exc):
        return
    out, lse = result
    clean = _nonfinite_rows(k, v).unsqueeze(-1)
    kf, vf = k.float().masked_fill(clean, 0.0), v.float().masked_fill(clean, 0.0)
    if S:
        want = reference.sparse_attention_with_lse(q.float(), kf, vf, indices, scale=scale)
    else:  # nothing to attend (the reference itself fails on seq 0: a separate failure, reported on its backend)
        want = torch.zeros(B, Hkv * G, D), torch.full((B, Hkv * G), float("-inf"))
    if out.dtype != q.dtype:
        raise Violation(f"out has dtype {out.dtype}, documented q's {q.dtype}")
    lowp = None
    if lowest_dtype(q, k, v) != torch.float32 and S:
        safe = indices.clamp(min=0).unsqueeze(-1).expand(B, Hkv, n, D)
        k_sel, v_sel = torch.gather(kf, 2, safe), torch.gather(vf, 2, safe)
        bias = torch.zeros(B, Hkv * G, 1, n).masked_fill(~(indices >= 0).repeat_interleave(G, 1)[:, :, None],
                                                         float("-inf"))
        dtype = lowest_dtype(q, k, v)
        lo_out, lo_lse = lowp_attention(q.unsqueeze(2), k_sel.to(dtype), v_sel.to(dtype), bias,
                                        1 / math.sqrt(D) if scale is None else scale, dtype)
        lowp = (lo_out.squeeze(2), lo_lse.squeeze(2))
    compare_attention(out, lse, *want, lowp, "sparse_attention_with_lse")


def target_sink_window_attention_with_lse(case: Case) -> None:
    """Sink + sliding-window attention (decode and chunks) against
    :func:`lckv.reference.sink_window_attention_with_lse`; NaN in a row some query sees is refused."""
    from lckv.reference.window import sink_window_mask

    B, Hkv, G, D = _heads(case)
    S = case.int("kv_len", 0, 40)
    L = case.int("q_len", 0, min(S, 8))
    q = case.tensor("q", (B, Hkv * G, L, D), case.choice("q_dtype", FLOAT_DTYPES))
    k, v = _kv_special(case, (B, Hkv, S, D), case.choice("kv_dtype", FLOAT_DTYPES))
    sink, window = case.int("sink", 0, 6), case.int("window", 0, 12)
    scale = _scale(case)
    backend = pick_backend(case, "sink_window_attention_with_lse")
    args = dict(q=q, k=k, v=v, sink=sink, window=window, scale=scale, backend=backend)
    options = {"q": _Q_MUTATIONS + [("dim3", ("q", "k"))],
               "k": [("dtype", ("k", "v")), ("ndim", None), ("dim0", ("k", "q")), ("meta", ("k", "device"))],
               "v": [("dim2", ("k", "v"))],
               "sink": [("value:-1|2.5|True|None|str", ("sink",))],
               "window": [("value:-1|1.5|False|None", ("window",))],
               "scale": [_SCALE_MUTATION], "backend": [_BACKEND_MUTATION]}
    if L == S:
        options["q"].append(("dim2", ("q_len", "kv_len")))
    args = _mutate_attention(case, args, options, D)
    mask = sink_window_mask(L, S, sink, window)
    special = ""
    if not case.bad:
        special = _read_special(k, v, mask.any(0).expand(B, Hkv, S))
        if special == "read":
            case.bad = {"k", "v"}
    elif bool(_nonfinite_rows(k, v).any()):
        case.bad |= {"k", "v"}
    result, exc = checked_call(ops.sink_window_attention_with_lse, args)
    if special == "unread" and exc is not None and resolved("sink_window_attention_with_lse", backend) == "reference":
        case.refuse(exc, {"k", "v"})
        return
    if expect_error(case, result, exc):
        return
    out, lse = result
    clean = _nonfinite_rows(k, v).unsqueeze(-1)
    kf, vf = k.float().masked_fill(clean, 0.0), v.float().masked_fill(clean, 0.0)
    want = reference.sink_window_attention_with_lse(q.float(), kf, vf, sink, window, scale=scale)
    lowp = None
    if lowest_dtype(q, k, v) != torch.float32:
        bias = torch.zeros(L, S).masked_fill(~mask, float("-inf"))
        lowp = lowp_attention(q, kf, vf, bias, 1 / math.sqrt(D) if scale is None else scale, lowest_dtype(q, k, v))
    if out.dtype != q.dtype:
        raise Violation(f"out has dtype {out.dtype}, documented q's {q.dtype}")
    compare_attention(out, lse, *want, lowp, "sink_window_attention_with_lse")


_ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~2 ulp of 16-bit


def target_merge_attention_states(case: Case) -> None:
    """Merge of two partial states (any leading shape, -inf = empty part) against
    :func:`lckv.reference.merge_attention_states`; NaN/+inf lse and non-finite outputs refused."""
    lead = tuple(case.int(f"lead{i}", 0, 4) for i in range(case.int("lead_dims", 0, 3)))
    D = case.choice("head_dim", HEAD_DIMS)
    dtype, lse_dtype = case.choice("dtype", FLOAT_DTYPES), case.choice("lse_dtype", (torch.float32,) * 3 + FLOAT_DTYPES)
    out_a, out_b = case.tensor("out_a", lead + (D,), dtype), case.tensor("out_b", lead + (D,), dtype)
    lses = []
    for name in ("lse_a", "lse_b"):
        lse = case.tensor(name, lead, lse_dtype, scale=4.0, layout="contiguous")
        if lse.numel() and case.chance(f"{name}.empty_parts", 0.4):
            gen = torch.Generator().manual_seed(case.int(f"{name}.empty_seed", 0, 2**31))
            lse = lse.masked_fill(torch.rand(lead, generator=gen) < 0.5, float("-inf"))
        lses.append(lse)
    backend = pick_backend(case, "merge_attention_states")
    args = dict(out_a=out_a, lse_a=lses[0], out_b=out_b, lse_b=lses[1], backend=backend)
    options = {"out_a": [("type", None), ("dtype", None), ("nan", None), ("inf", None), ("meta", ("out_a", "device"))],
               "out_b": [("dim" + str(len(lead)), ("out_a", "out_b")), ("nan", None)],
               "lse_a": [("nan", None), ("inf", None), ("ndim", ("lse_a",))],
               "lse_b": [("nan", None), ("dtype", None)], "backend": [_BACKEND_MUTATION]}
    options.update(_META)
    args = mutate(case, args, options)
    result, exc = checked_call(ops.merge_attention_states, args)
    if expect_error(case, result, exc):
        return
    out, lse = result
    want_out, want_lse = reference.merge_attention_states(out_a.float(), lses[0].float(), out_b.float(),
                                                          lses[1].float())
    if out.dtype != dtype or lse.dtype != torch.float32:
        raise Violation(f"out {out.dtype} / lse {lse.dtype}: documented out_a's dtype and float32")
    check_finite_out(out, "out")
    check_finite_out(lse, "lse", allow_neg_inf=True)
    tol = _ELEMENTWISE_TOL[dtype]
    close(out, want_out, "merge out", rtol=tol, atol=tol)
    close(lse, want_lse, "merge lse")


# ----------------------------------------------------------------------------- ops: scoring
def target_page_key_bounds(case: Case) -> None:
    """Per-page min/max against an explicit loop over pages (exact); bad page_size refused by name."""
    B, H, D = case.int("batch", 0, 3), case.int("kv_heads", 1, 3), case.choice("head_dim", HEAD_DIMS)
    S = case.int("seq", 0, 60)
    k = case.tensor("k", (B, H, S, D), case.choice("dtype", FLOAT_DTYPES))
    page_size = case.int("page_size", 1, 12)
    backend = pick_backend(case, "page_key_bounds")
    args = dict(k=k, page_size=page_size, backend=backend)
    options = {"k": [("type", None), ("dtype", None), ("ndim", None), ("nan", None), ("inf", None)],
               "page_size": [("value:0|-3|2.5|True|None|str", ("page_size",))], "backend": [_BACKEND_MUTATION]}
    options.update(_META)
    args = mutate(case, args, options)
    result, exc = checked_call(ops.page_key_bounds, args)
    if expect_error(case, result, exc):
        return
    lo, hi = result
    n_pages = -(-S // page_size)
    want_lo = torch.stack([k[:, :, p * page_size:(p + 1) * page_size].float().amin(2) for p in range(n_pages)], 2) \
        if n_pages else torch.empty(B, H, 0, D)
    want_hi = torch.stack([k[:, :, p * page_size:(p + 1) * page_size].float().amax(2) for p in range(n_pages)], 2) \
        if n_pages else torch.empty(B, H, 0, D)
    for got, want, name in ((lo, want_lo, "page_min"), (hi, want_hi, "page_max")):
        if got.dtype != torch.float32 or not torch.equal(got, want):
            raise Violation(f"{name} differs from the per-page {'min' if name == 'page_min' else 'max'}")


def _dot_tolerance(terms: torch.Tensor) -> torch.Tensor:
    """float32 tolerance of a sum of ``terms`` (last dim): 1e-5 of the sum of their magnitudes."""
    return 1e-5 * (1.0 + terms.abs().sum(-1))


def target_quest_page_scores(case: Case) -> None:
    """Quest page bounds ``sum_d max(q_d min_d, q_d max_d)`` against float64 arithmetic."""
    B, Hkv, G, D = _heads(case)
    P = case.int("n_pages", 0, 20)
    q = case.tensor("q", (B, Hkv * G, D), case.choice("q_dtype", FLOAT_DTYPES))
    dtype = case.choice("page_dtype", FLOAT_DTYPES)
    page_min = case.tensor("page_min", (B, Hkv, P, D), dtype)
    width = case.tensor("page_width", (B, Hkv, P, D), kind="rand", layout="contiguous")
    page_max = (page_min.float() + width).to(dtype)
    backend = pick_backend(case, "quest_page_scores")
    args = dict(q=q, page_min=page_min, page_max=page_max, backend=backend)
    options = {"q": _Q_MUTATIONS + [("dim2", ("q", "page_min"))],
               "page_min": [("dtype", None), ("ndim", None), ("nan", None), ("dim2", ("page_min", "page_max")),
                            ("meta", ("page_min", "device"))],
               "page_max": [("inf", None)], "backend": [_BACKEND_MUTATION]}
    if Hkv > 1:
        options["q"].append(("dim1", ("q_heads", "kv_heads")))
    options.update(_META)
    args = mutate(case, args, options)
    result, exc = checked_call(ops.quest_page_scores, args)
    if expect_error(case, result, exc):
        return
    qd = q.double().reshape(B, Hkv, G, 1, D)
    terms = torch.maximum(qd * page_min.double().unsqueeze(2), qd * page_max.double().unsqueeze(2))
    want = terms.sum(-1).reshape(B, Hkv * G, P)
    if result.dtype != torch.float32 or tuple(result.shape) != tuple(want.shape):
        raise Violation(f"scores {result.dtype} {tuple(result.shape)}; documented float32 {tuple(want.shape)}")
    err = (result.double() - want).abs()
    if err.numel() and bool((err > _dot_tolerance(terms).reshape(B, Hkv * G, P)).any()):
        raise Violation(f"scores differ from float64 arithmetic by up to {err.max().item():.3g}")


def _check_topk(scores, ids, exact, n_valid: int, k: int, what: str, exact_scores=None) -> None:
    """Top-k result rows: shape ``[m, k]``; the first ``n_valid`` (at most) slots ids in range,
    distinct, scores descending and equal to the true inner products ``exact [m, n]`` (float64),
    then padding -1 / -inf. ``exact_scores`` given: also the true top-k scores."""
    m, n = exact.shape
    if tuple(scores.shape) != (m, k) or tuple(ids.shape) != (m, k):
        raise Violation(f"{what}: scores {tuple(scores.shape)} / ids {tuple(ids.shape)}, documented [{m}, {k}]")
    if scores.dtype != torch.float32 or ids.dtype != torch.int64:
        raise Violation(f"{what}: scores {scores.dtype} / ids {ids.dtype}, documented float32 / int64")
    filled = ids >= 0
    if bool((ids < -1).any() | (ids >= n).any()):
        raise Violation(f"{what}: ids outside [-1, {n})")
    if bool((filled[:, 1:] & ~filled[:, :-1]).any()):
        raise Violation(f"{what}: a result follows a padding slot")
    if bool((filled.sum(1) > n_valid).any()):
        raise Violation(f"{what}: more results than min(k, size) = {n_valid}")
    if bool((scores[~filled] != float("-inf")).any()):
        raise Violation(f"{what}: padding slot with a score other than -inf")
    for row in range(m):
        got = ids[row][filled[row]]
        if got.unique().numel() != got.numel():
            raise Violation(f"{what}: query {row} got a repeated id")
        true = exact[row, got]
        tol = 1e-5 * (1.0 + (exact[row].abs().max().item() if n else 0.0))
        if bool(((scores[row][filled[row]].double() - true).abs() > tol).any()):
            raise Violation(f"{what}: query {row} scores are not the inner products of its ids")
        if bool((scores[row][filled[row]][1:] > scores[row][filled[row]][:-1]).any()):
            raise Violation(f"{what}: query {row} scores not descending")
        if exact_scores is not None:
            if got.numel() != n_valid:
                raise Violation(f"{what}: exact search filled {got.numel()} of {n_valid} slots")
            best = exact[row].topk(n_valid).values
            if bool(((true.sort(descending=True).values - best).abs() > tol).any()):
                raise Violation(f"{what}: query {row} missed a true top-{k} key")


def target_flat_topk_scores(case: Case) -> None:
    """Exact top-k inner products (padding past seq, huge k) against float64 arithmetic."""
    B, Hkv, G, D = _heads(case)
    S = case.int("seq", 0, 60)
    q = case.tensor("q", (B, Hkv * G, D), case.choice("q_dtype", FLOAT_DTYPES))
    k = case.tensor("k", (B, Hkv, S, D), case.choice("k_dtype", FLOAT_DTYPES))
    top_k = case.choice("top_k.huge", _HUGE) if case.chance("top_k.is_huge", 0.05) else case.int("top_k", 1, S + 4)
    backend = pick_backend(case, "flat_topk_scores")
    args = dict(q=q, k=k, top_k=top_k, backend=backend)
    options = {"q": _Q_MUTATIONS + [("dim2", ("q", "k"))],
               "k": [("dtype", None), ("ndim", None), ("nan", None), ("dim0", ("k", "q")), ("meta", ("k", "device"))],
               "top_k": [("value:0|-1|2.5|True|None", ("top_k",))], "backend": [_BACKEND_MUTATION]}
    options.update(_META)
    args = mutate(case, args, options)
    result, exc = checked_call(ops.flat_topk_scores, args)
    if top_k in _HUGE and exc is not None and not case.bad:
        case.bad = {"top_k"}  # refusing a k that cannot be allocated is allowed, naming it
    if expect_error(case, result, exc):
        return
    scores, ids = result
    exact = torch.einsum("bhgd,bhnd->bhgn", q.double().reshape(B, Hkv, G, D), k.double()).reshape(B * Hkv * G, S)
    rows = B * Hkv * G
    _check_topk(scores.reshape(rows, top_k), ids.reshape(rows, top_k), exact, min(top_k, S), top_k, "flat_topk_scores",
                exact_scores=True)


def target_gather_rows(case: Case) -> None:
    """Rows of ``src`` at ``indices`` (-1: zeros) against direct indexing (exact, src's dtype);
    out-of-range ids, wrong dtypes and shapes refused by name."""
    B, H, D = case.int("batch", 0, 3), case.int("heads", 1, 3), case.choice("head_dim", HEAD_DIMS)
    S, N = case.int("seq", 0, 40), case.int("n", 0, 12)
    src = case.tensor("src", (B, H, S, D), case.choice("dtype", FLOAT_DTYPES))
    gen = torch.Generator().manual_seed(case.int("indices.seed", 0, 2**31))
    indices = torch.randint(-1, S, (B, H, N), generator=gen) if S else torch.full((B, H, N), -1)
    args = dict(src=src, indices=indices, backend=pick_backend(case, "gather_rows"))
    options = {"src": [("type", None), ("dtype", None), ("ndim", None)],
               "indices": [("index_dtype", None), ("ndim", None), (f"set:{S}", None), ("set:-2", None),
                           ("dim1", ("indices", "heads"))], "backend": [_BACKEND_MUTATION]}
    options.update(_META)
    args = mutate(case, args, options)
    result, exc = checked_call(ops.gather_rows, args)
    if expect_error(case, result, exc):
        return
    want = torch.zeros(B, H, N, D, dtype=src.dtype)
    for b, h, j in itertools.product(range(B), range(H), range(N)):
        if indices[b, h, j] >= 0:
            want[b, h, j] = src[b, h, indices[b, h, j]]
    if result.dtype != src.dtype or not torch.equal(result, want):
        raise Violation("gather_rows differs from direct indexing (or changed the dtype)")


def target_ivf_layout(case: Case) -> None:
    """Keys grouped by list: offsets count each list, rows a stable sort by list, the keys those
    rows; bad list ids, n_lists and shapes refused by name."""
    B, H, D = case.int("batch", 0, 2), case.int("kv_heads", 1, 3), case.choice("head_dim", HEAD_DIMS)
    n, n_lists = case.int("n", 0, 50), case.int("n_lists", 1, 8)
    keys = case.tensor("keys", (B, H, n, D), case.choice("dtype", FLOAT_DTYPES))
    gen = torch.Generator().manual_seed(case.int("assign.seed", 0, 2**31))
    assign = torch.randint(0, n_lists, (B, H, n), generator=gen)
    args = dict(keys=keys, assign=assign, n_lists=n_lists)
    options = {"keys": [("type", None), ("dtype", None), ("ndim", ("keys", "assign"))],
               "assign": [("index_dtype", None), (f"set:{n_lists}", None), ("set:-1", None), ("dim2", None)],
               "n_lists": [("value:0|-1|2.5|True|None", None)]}
    args = mutate(case, args, options)
    result, exc = checked_call(ops.ivf_layout, args)
    if expect_error(case, result, exc):
        return
    list_keys, offsets, rows = result
    counts = torch.stack([(assign == lst).sum(-1) for lst in range(n_lists)], -1) if n_lists else None
    if not torch.equal(offsets, torch.cat([torch.zeros(B, H, 1, dtype=torch.int64), counts.cumsum(-1)], -1)):
        raise Violation("list_offsets are not the running counts of the lists")
    want_rows = torch.sort(assign, dim=-1, stable=True).indices
    if not torch.equal(rows, want_rows) or not torch.equal(list_keys, torch.gather(
            keys, 2, want_rows[..., None].expand(-1, -1, -1, D))):
        raise Violation("list_rows / list_keys are not the keys sorted stably by list")


def target_ivf_topk_scores(case: Case) -> None:
    """The top-k keys of the probed lists (the nprobe best centroids) against float64 arithmetic:
    every id in a probed list, scores its inner product, and (no tie at the probe boundary) the
    best of the probed keys; bad layouts, nprobe and top_k refused by name."""
    B, Hkv, G, D = _heads(case)
    n, L = case.int("n", 0, 50), case.int("n_lists", 1, 8)
    q = case.tensor("q", (B, Hkv * G, D), case.choice("q_dtype", FLOAT_DTYPES))
    centroids = case.tensor("centroids", (B, Hkv, L, D))
    keys = case.tensor("keys", (B, Hkv, n, D), case.choice("k_dtype", FLOAT_DTYPES))
    gen = torch.Generator().manual_seed(case.int("assign.seed", 0, 2**31))
    assign = torch.randint(0, L, (B, Hkv, n), generator=gen)  # the list of each original row
    list_keys, offsets, rows = ops.ivf_layout(keys, assign, L)
    nprobe, top_k = case.int("nprobe", 1, L), case.int("top_k", 1, n + 4)
    args = dict(q=q, centroids=centroids, list_keys=list_keys, list_offsets=offsets, list_rows=rows, nprobe=nprobe,
                top_k=top_k, backend=pick_backend(case, "ivf_topk_scores"))
    options = {"q": _Q_MUTATIONS + [("dim2", ("q", "centroids", "list_keys"))],
               "centroids": [("nan", None), ("ndim", None)], "list_keys": [("inf", None), ("dtype", None)],
               "list_offsets": [("set:-1", None), ("index_dtype", None)], "list_rows": [("index_dtype", None)],
               "nprobe": [(f"value:0|{L + 1}|2.5|True|None", None)], "top_k": [("value:0|-1|2.5|True|None", None)],
               "backend": [_BACKEND_MUTATION]}
    options.update(_META)
    args = mutate(case, args, options)
    result, exc = checked_call(ops.ivf_topk_scores, args)
    if expect_error(case, result, exc):
        return
    scores, ids = result
    cent = torch.einsum("bhgd,bhld->bhgl", q.double().reshape(B, Hkv, G, D), centroids.double()).reshape(B * Hkv * G, L)
    exact = torch.einsum("bhgd,bhnd->bhgn", q.double().reshape(B, Hkv, G, D), keys.double()).reshape(B * Hkv * G, n)
    owner = assign.repeat_interleave(G, dim=1).reshape(B * Hkv * G, n)
    for row in range(B * Hkv * G):
        order = cent[row].sort(descending=True).values
        boundary = order[nprobe - 1].item()
        tie = nprobe < L and abs(order[nprobe].item() - boundary) <= 1e-5 * (1.0 + order.abs().max().item())
        allowed = cent[row][owner[row]] >= boundary - 1e-5 * (1.0 + order.abs().max().item())
        got = ids.reshape(-1, top_k)[row]
        if bool((got >= n).any()) or (bool((got >= 0).any()) and not bool(allowed[got[got >= 0]].all())):
            raise Violation(f"ivf_topk_scores: query {row} returned a key outside its nprobe best lists")
        floor = exact[row][allowed].min().item() - 1.0 if bool(allowed.any()) else 0.0
        masked = exact[row].masked_fill(~allowed, floor)  # finite: the tolerance reads its magnitude
        valid = int(allowed.sum())
        _check_topk(scores.reshape(-1, top_k)[row:row + 1], got[None], masked[None], min(top_k, valid), top_k,
                    "ivf_topk_scores", exact_scores=None if tie else True)


# ----------------------------------------------------------------------------- ops: retrieval
def _cluster_state(case: Case, B: int, H: int, C: int, D: int, rows: int, values_dtype=torch.float32):
    """(centroids, counts, value_sums, assign, values): every row in a random cluster."""
    centroids = case.tensor("centroids", (B, H, C, D), layout="contiguous")
    gen = torch.Generator().manual_seed(case.int("assign.seed", 0, 2**31))
    assign = torch.randint(0, C, (B, H, rows), generator=gen)
    values = case.tensor("values", (B, H, rows, D), values_dtype)
    counts = torch.zeros(B, H, C).scatter_add_(2, assign, torch.ones(B, H, rows))
    sums = torch.zeros(B, H, C, D).scatter_add_(2, assign.unsqueeze(-1).expand(B, H, rows, D), values.float())
    return centroids, counts, sums, assign, values


def _rows(case: Case, label: str, shape, rows: int):
    """int64 row ids in ``[-1, rows)`` (all -1 when there are no rows)."""
    gen = torch.Generator().manual_seed(case.int(f"{label}.seed", 0, 2**31))
    ids = torch.randint(-1, rows, shape, generator=gen) if rows else torch.full(shape, -1)
    case.note(label, ids.tolist() if ids.numel() <= 30 else f"randint(-1, {rows}, {tuple(shape)})")
    return ids


def _vs_reference(case: Case, fn, args: dict, compare, state=()) -> None:
    """Runs ``fn(**args)`` on the drawn backend and, for a valid input, on ``reference`` with copies
    of the in-place ``state`` arguments, then ``compare(got, want, got_args, want_args)``. A failed
    call must leave every tensor argument (state included) unchanged."""
    want_args = {name: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone())
                 if name in state and v is not None else v for name, v in args.items()}
    snap = snapshot(args)
    result, exc = call(fn, **args)
    if exc is not None or not state:
        check_unchanged(snap, "an input or the state")
    else:
        check_unchanged([s for s in snap if not any(s[0] is t for t in _tensors([args[n] for n in state]))])
    if expect_error(case, result, exc):
        return
    want, exc = call(fn, **{**want_args, "backend": "reference"})
    if exc is not None:
        raise Violation(f"the reference backend raised {type(exc).__name__} on an input backend "
                        f"{args['backend']!r} served: {str(exc)[:200]}{_where(exc)}") from exc
    compare(result, want, args, want_args)


def _estimate_float64(q, centroids, counts, sums, assign, values, indices, scale):
    """The estimate of the rows not in ``indices`` (lckv.reference.estimate's formula) in float64."""
    from lckv.reference.group_rank import distinct_rows

    B, Hq, D = q.shape
    H, rows = centroids.shape[1], values.shape[2]
    s = torch.einsum("bhgd,bhcd->bhgc", q.double().reshape(B, H, Hq // H, D), centroids.double()) * scale
    s = s.masked_fill((counts <= 0).unsqueeze(2), float("-inf"))
    top = s.amax(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)
    w = torch.exp(s - top)
    total = w @ counts.double().unsqueeze(-1)
    num = w @ sums.double()
    ids = distinct_rows(indices)
    if rows:
        valid = ids >= 0
        clusters = assign.gather(2, ids.clamp(min=0))
        w_rows = torch.gather(w, 3, clusters.unsqueeze(2).expand(-1, -1, Hq // H, -1)) * valid.unsqueeze(2)
        picked = values.double().gather(2, ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, D))
        num = num - w_rows @ picked
        den = total.squeeze(-1) - w_rows.sum(-1)
    else:
        den = total.squeeze(-1)
    keep = den > 1e-6 * total.squeeze(-1)
    safe = torch.where(keep, den, torch.ones_like(den))
    lse = torch.where(keep, torch.log(safe) + top.squeeze(-1), torch.full_like(den, float("-inf")))
    out = torch.where(keep.unsqueeze(-1), num / safe.unsqueeze(-1), torch.zeros_like(num))
    return out.reshape(B, Hq, D), lse.reshape(B, Hq)


def target_centroid_estimate(case: Case) -> None:
    """The estimate of the rows not retrieved: the ``cpu`` kernel against the ``reference``;
    lse -inf and out 0 for an empty rest; bad shapes, ids and NaN refused by name."""
    B, H, G = case.int("batch", 0, 2), case.int("kv_heads", 1, 2), case.int("group", 1, 3)
    C, D, rows, n = case.int("clusters", 1, 12), case.choice("head_dim", (1, 8, 16, 33)), case.int("rows", 0, 80), \
        case.int("n_indices", 0, 30)
    q_dtype, v_dtype = case.choice("q_dtype", (torch.float32,) * 2 + FLOAT_DTYPES), case.choice("v_dtype", FLOAT_DTYPES)
    centroids, counts, sums, assign, values = _cluster_state(case, B, H, C, D, rows, v_dtype)
    q = case.tensor("q", (B, H * G, D), q_dtype)
    indices = _rows(case, "indices", (B, H, n), rows)
    scale = case.draw("scale", st.floats(0.05, 1.0))
    lse_only = case.chance("lse_only", 0.3)
    backend = pick_backend(case, "centroid_estimate") if q_dtype == torch.float32 else case.choice(
        "backend", ("auto", "reference"))
    args = dict(q=q, centroids=centroids, counts=counts, value_sums=sums, assign=assign, values=values,
                indices=indices, scale=scale, lse_only=lse_only, backend=backend)
    options = {"q": [("type", None), ("ndim", None), ("dim2", ("q", "head_dim", "centroids")), ("nan", None),
                     ("meta", ("q", "device"))],
               "centroids": [("ndim", None), ("dim2", ("centroids", "counts", "value_sums")), ("nan", None)],
               "counts": [("dim2", ("counts", "centroids")), ("dtype", ("counts",))],
               "value_sums": [("dim3", ("value_sums", "centroids", "head_dim"))],
               "assign": [("index_dtype", ("assign",)), (f"set:{C}", ("assign",)), ("set:-1", ("assign",))],
               "values": [("dim2", ("values", "assign", "rows")), ("nonfloat", ("values",))],
               "indices": [("index_dtype", None), (f"set:{rows}", None), ("set:-2", None), ("dim1", None)],
               "scale": [("value:nan|inf|str", ("scale",))], "backend": [_BACKEND_MUTATION]}
    if H > 1:
        options["q"].append(("dim1", ("q", "q_heads", "kv_heads")))
    options.update(_META)
    args = mutate(case, args, options)
    if case.trace.get("mutated", "").startswith("'assign (set:") and rows:
        bad_ids = args["assign"].gather(2, indices.clamp(min=0))[indices >= 0]
        if not bool(((bad_ids < 0) | (bad_ids >= C)).any()):
            case.bad = set()  # the bad cluster id is in a row not retrieved: never read
            case.note("mutated", "assign, in a row not retrieved (valid)")

    def compare(got, want, *_):
        got_out, got_lse = (None, got) if lse_only else got
        want_out, want_lse = (None, want) if lse_only else want
        if got_lse.dtype != torch.float32 or tuple(got_lse.shape) != (B, H * G):
            raise Violation(f"lse {got_lse.dtype} {tuple(got_lse.shape)}: documented float32 [B, Hq]")
        check_finite_out(got_lse, "lse", allow_neg_inf=True)
        # the rest is (all clusters) - (the retrieved rows): float64 says how ill-conditioned that is
        exact_out, exact_lse = _estimate_float64(q, centroids, counts, sums, assign, values, indices, scale)
        close_to_exact(got_lse, want_lse, exact_lse, "centroid_estimate lse")
        if not lse_only:
            if got_out.dtype != q.dtype:
                raise Violation(f"out has dtype {got_out.dtype}, documented q's {q.dtype}")
            check_finite_out(got_out, "out")
            floor = 1e-5 if q.dtype == torch.float32 else _ELEMENTWISE_TOL[q.dtype]
            scale_of_out = 1 + (exact_out.abs().max().item() if exact_out.numel() else 0.0)
            close_to_exact(got_out, want_out, exact_out, "centroid_estimate out", floor * scale_of_out)

    _vs_reference(case, ops.centroid_estimate, args, compare)


def target_estimate_add_rows(case: Case) -> None:
    """New rows join their nearest clusters in place: ``cpu`` against ``reference`` (clusters,
    counts, value sums); a refused call leaves counts and value sums as they were."""
    B, H, C, D, n = case.int("batch", 0, 2), case.int("kv_heads", 1, 2), case.int("clusters", 1, 10), \
        case.choice("head_dim", (1, 8, 16, 33)), case.int("n", 0, 12)
    dtype = case.choice("dtype", FLOAT_DTYPES)
    keys, values = case.tensor("keys", (B, H, n, D), dtype), case.tensor("values", (B, H, n, D), dtype)
    valid = case.tensor("valid", (B, n), kind="rand", layout="contiguous") > 0.3 if case.chance("padded", 0.4) else None
    centroids = case.tensor("centroids", (B, H, C, D), layout="contiguous")
    half = 0.5 * centroids.square().sum(-1)
    counts = case.tensor("counts", (B, H, C), kind="rand", layout="contiguous")
    sums = case.tensor("value_sums", (B, H, C, D), layout="contiguous")
    backend = pick_backend(case, "estimate_add_rows")
    args = dict(keys=keys, values=values, valid=valid, centroids=centroids, half_norms=half, counts=counts,
                value_sums=sums, backend=backend)
    options = {"keys": [("type", None), ("ndim", None), ("nan", None), ("inf", None),
                        ("dim3", ("keys", "centroids", "head_dim"))],
               "values": [("dim2", ("values", "keys"))],
               "centroids": [("dim3", ("centroids", "keys", "head_dim", "value_sums")),
                             ("dim2", ("centroids", "counts", "half_norms", "value_sums"))],
               "half_norms": [("dim2", ("half_norms", "counts"))], "counts": [("dtype", ("counts",))],
               "value_sums": [("dtype", ("value_sums",)), ("dim3", ("value_sums", "centroids"))],
               "backend": [_BACKEND_MUTATION]}
    if valid is not None:
        options["valid"] = [("index_dtype", ("valid",)), ("dim1", ("valid",))]
    options.update(_META)
    args = mutate(case, args, options)

    def compare(got, want, got_args, want_args):
        if got.dtype != torch.int64 or not torch.equal(got, want):
            raise Violation("clusters of the new rows differ from the reference")
        close(got_args["counts"], want_args["counts"], "counts")
        close(got_args["value_sums"], want_args["value_sums"], "value_sums")

    _vs_reference(case, ops.estimate_add_rows, args, compare, state=("counts", "value_sums"))


def target_rank_by_group_probability(case: Case) -> None:
    """GQA group ranking: ``cpu`` against ``reference`` (as sets); -1 only for missing rows."""
    B, H, G = case.int("batch", 0, 2), case.int("kv_heads", 1, 2), case.int("group", 1, 4)
    D, rows, m = case.choice("head_dim", (1, 8, 16, 33)), case.int("rows", 1, 80), case.int("n_candidates", 0, 40)
    q = case.tensor("q", (B, H * G, D))
    keys = case.tensor("keys", (B, H, rows, D), case.choice("keys_dtype", FLOAT_DTYPES))
    candidates = None if case.chance("all_rows", 0.15) else _rows(case, "candidates", (B, H, m), rows)
    rest_lse = case.tensor("rest_lse", (B, H * G), layout="contiguous") if case.chance("rest", 0.5) else None
    scale = case.draw("scale", st.floats(0.05, 1.0))
    n_select = case.choice("n_select.huge", _HUGE) if case.chance("n_select.is_huge", 0.05) else \
        case.int("n_select", 1, m + 4)
    backend = pick_backend(case, "rank_by_group_probability") if candidates is not None else case.choice(
        "backend", ("auto", "reference"))
    args = dict(q=q, keys=keys, candidates=candidates, rest_lse=rest_lse, scale=scale, n_select=n_select,
                backend=backend)
    options = {"q": [("type", None), ("ndim", None), ("dim2", ("q", "keys", "head_dim")), ("nan", None)],
               "keys": [("ndim", None), ("nonfloat", None), ("dim3", ("keys", "q", "head_dim"))],
               "n_select": [("value:0|-1|2.5|None", ("n_select",))], "scale": [("value:nan|str", ("scale",))],
               "backend": [_BACKEND_MUTATION]}
    if candidates is not None:
        options["candidates"] = [("index_dtype", None), (f"set:{rows}", None), ("set:-2", None), ("dim1", None)]
    if rest_lse is not None:
        options["rest_lse"] = [("dim1", ("rest_lse",)), ("nan", ("rest_lse",))]
    options.update(_META)
    args = mutate(case, args, options)

    def compare(got, want, *_):
        if got.dtype != torch.int64 or got.shape[:2] != (B, H) or got.shape[2] > n_select:
            raise Violation(f"ids {got.dtype} {tuple(got.shape)}: documented int64 [B, H, <= n_select]")
        pool = torch.arange(rows) if candidates is None else candidates
        for b in range(B):
            for h in range(H):
                chosen = got[b, h][got[b, h] >= 0]
                allowed = pool if candidates is None else pool[b, h]
                if not bool(torch.isin(chosen, allowed).all()) or chosen.unique().numel() != chosen.numel():
                    raise Violation("ids outside the candidates, or repeated")
        if not torch.equal(got.sort(-1).values, want.sort(-1).values):
            raise Violation("selected rows differ from the reference")

    _vs_reference(case, ops.rank_by_group_probability, args, compare)


def _cluster_heads(case: Case, B: int, H: int, D: int, rows: int):
    keys = case.tensor("index_keys", (B, H, rows, D), layout="contiguous")
    return keys, _cluster_index_heads(keys)


def _cluster_index_heads(keys) -> list:
    """One small ClusterIndex (clusters of 4, segments of 32) per (batch row, kv head) of ``keys``."""
    from lckv.index import ClusterIndex

    B, H, _, D = keys.shape
    return [ClusterIndex(D, cluster_size=4, segment=32).build(keys[b, h].contiguous())
            for b in range(B) for h in range(H)]


def target_decode_cluster_step(case: Case) -> None:
    """The fused cluster decode step: ``cpu`` against its composition of separate ops
    (``reference``): the same rows, out and lse; bad shapes and settings refused by name."""
    B, H, G = case.int("batch", 1, 2), case.int("kv_heads", 1, 2), case.int("group", 1, 3)
    D = case.choice("head_dim", (4, 8, 16))
    rows, r = case.int("rows", 1, 80), case.int("resident", 0, 8)
    keys, heads = _cluster_heads(case, B, H, D, rows)
    store_dtype = case.choice("store_dtype", FLOAT_DTYPES)
    store_k = keys.to(store_dtype)
    values = case.tensor("values", (B, H, rows, D), store_dtype)
    res_dtype = case.choice("resident_dtype", (torch.float32, store_dtype))
    res_k = case.tensor("resident_k", (B, H, r, D), res_dtype)
    res_v = case.tensor("resident_v", (B, H, r, D), res_dtype)
    q = case.tensor("q", (B, H * G, D))
    n_select = case.int("n_select", 1, rows + 4)
    scale = case.draw("scale", st.floats(0.05, 1.0))
    estimate = None
    if case.chance("estimate", 0.5):
        centroids, counts, sums, assign, _ = _cluster_state(case, B, H, case.int("clusters", 1, 8), D, rows)
        estimate = (centroids, counts, sums, assign)
    search = case.choice("search", (None, {"scan": 1.0}, {"scan": 3.0}, {"expand": 1.0}, {"scan": 1.5, "expand": 0.3}))
    backend = pick_backend(case, "decode_cluster_step")
    args = dict(indexes=heads, q=q, keys=store_k, values=values, resident_k=res_k, resident_v=res_v, n_select=n_select,
                scale=scale, estimate=estimate, search=search, backend=backend)
    options = {"q": [("type", None), ("ndim", None), ("dim2", ("q", "head_dim", "keys", "offloaded_k")), ("nan", None)],
               "keys": [("dim3", ("keys", "offloaded_k", "q", "head_dim"))],
               "values": [("dim2", ("values", "offloaded_v", "keys", "offloaded_k"))],
               "resident_k": [("dim3", ("resident_k", "q", "head_dim")), ("ndim", None)],
               "resident_v": [("dim2", ("resident_v", "resident_k"))],
               "n_select": [("value:0|-1|None|2.5", ("n_select",))], "scale": [("value:nan|str", ("scale",))],
               "indexes": [("value:None|str|list", ("indexes", "heads"))],
               "search": [("value:str|list", ("search",))], "backend": [_BACKEND_MUTATION]}
    args = mutate(case, args, options)
    if case.chance("search.bad_param", 0.05) and not case.bad:
        args["search"] = {"bogus": 1.0}
        case.bad = {"bogus", "search"}
        case.note("mutated", "search (unknown parameter)")

    def compare(got, want, *_):
        out, lse, ids = got
        w_out, w_lse, w_ids = want
        if not torch.equal(ids.sort(-1).values, w_ids.sort(-1).values):
            raise Violation("rows searched differ from the reference's")
        check_finite_out(out, "out")
        check_finite_out(lse, "lse", allow_neg_inf=True)
        close(out, w_out, "decode_cluster_step out", rtol=1e-4)
        close(lse, w_lse, "decode_cluster_step lse")

    _vs_reference(case, ops.decode_cluster_step, args, compare)


def target_offload_rows(case: Case) -> None:
    """Spilled rows join the indexes and the estimate: ``cpu`` against ``reference`` on twin
    states; a refused call changes no index size and no estimate tensor."""
    B, H, D = case.int("batch", 1, 2), case.int("kv_heads", 1, 2), case.choice("head_dim", (4, 8, 16))
    rows, n = case.int("rows", 1, 100), case.int("n", 0, 10)
    index_seed = case.int("index_keys.seed", 0, 2**31)

    index_keys = torch.randn(B, H, rows, D, generator=torch.Generator().manual_seed(index_seed))
    heads, twin_heads = _cluster_index_heads(index_keys), _cluster_index_heads(index_keys)
    dtype = case.choice("dtype", FLOAT_DTYPES)
    keys, values = case.tensor("keys", (B, H, n, D), dtype), case.tensor("values", (B, H, n, D), dtype)
    valid = case.tensor("valid", (B, n), kind="rand", layout="contiguous") > 0.3 if case.chance("padded", 0.3) else None
    estimate = None
    if case.chance("estimate", 0.6):
        centroids = case.tensor("centroids", (B, H, case.int("clusters", 1, 8), D), layout="contiguous")
        estimate = (centroids, 0.5 * centroids.square().sum(-1), torch.zeros(centroids.shape[:3]),
                    torch.zeros(centroids.shape))
    backend = pick_backend(case, "offload_rows")
    args = dict(indexes=heads, keys=keys, values=values, valid=valid, estimate=estimate, backend=backend)
    options = {"keys": [("type", None), ("ndim", None), ("nan", None), ("dim3", ("keys", "head_dim", "dim"))],
               "values": [("dim2", ("values", "keys"))],
               "indexes": [("value:str|list", ("indexes", "heads"))], "backend": [_BACKEND_MUTATION]}
    if valid is not None and estimate is not None:  # valid is read by the estimate only
        options["valid"] = [("index_dtype", ("valid",)), ("dim1", ("valid",))]
    args = mutate(case, args, options)
    if estimate is not None and not case.bad and case.chance("estimate.bad", 0.1):
        args["estimate"] = (estimate[0][..., :-1], *estimate[1:]) if D > 1 else estimate[:3]
        case.bad = {"centroids", "estimate", "head_dim", "value_sums", "half_norms", "counts"}
        case.note("mutated", "estimate (centroids' head_dim, or a missing tensor)")
    sizes = [ix.size for ix in heads]
    snap = snapshot(args)
    result, exc = call(ops.offload_rows, **args)
    if exc is not None:
        check_unchanged(snap, "an input or the estimate")
        if [ix.size for ix in heads] != sizes:
            raise Violation(f"a refused call changed index sizes {sizes} -> {[ix.size for ix in heads]}")
    if expect_error(case, result, exc):
        return
    twin_est = None if estimate is None else (estimate[0], estimate[1], torch.zeros_like(estimate[2]),
                                              torch.zeros_like(estimate[3]))
    want = ops.offload_rows(twin_heads, keys, values, valid, twin_est, backend="reference")
    if any(ix.size != rows + n for ix in heads + twin_heads):
        raise Violation(f"index sizes {[ix.size for ix in heads]}, expected {rows + n}")
    if (result is None) != (want is None) or (result is not None and not torch.equal(result, want)):
        raise Violation("clusters of the new rows differ from the reference's")
    if estimate is not None:
        close(args["estimate"][2], twin_est[2], "counts")
        close(args["estimate"][3], twin_est[3], "value_sums")


def target_kmeans(case: Case) -> None:
    """Lloyd's k-means: ``cpu`` against ``reference`` (same clusters, centroids to float32
    rounding); bad init positions, iterations and NaN points refused by name."""
    heads, n, dim = case.int("heads", 0, 3), case.int("n", 1, 80), case.choice("dim", (1, 2, 8, 16, 33))
    dtype = case.choice("dtype", (torch.float32,) * 3 + FLOAT_DTYPES)
    points = case.tensor("points", (heads, n, dim), dtype)
    clusters = case.int("clusters", 1, min(n, 16))
    gen = torch.Generator().manual_seed(case.int("init.seed", 0, 2**31))
    init = torch.randperm(n, generator=gen)[:clusters]
    iterations = case.int("iterations", 0, 6)
    backend = pick_backend(case, "kmeans") if dtype == torch.float32 else case.choice("backend", ("auto", "reference"))
    args = dict(points=points, init=init, iterations=iterations, backend=backend)
    options = {"points": [("type", None), ("ndim", None), ("nan", None), ("inf", None)],
               "init": [("index_dtype", ("init",)), (f"set:{n}", ("init",)), ("set:-1", ("init",)), ("dup", ("init",)),
                        ("ndim", ("init",))],
               "iterations": [("value:-1|2.5|None", ("iterations",))], "backend": [_BACKEND_MUTATION]}
    options.update(_META)
    args = mutate(case, args, options)

    def compare(got, want, *_):
        (cent, assign), (w_cent, w_assign) = got, want
        if cent.dtype != torch.float32 or tuple(cent.shape) != (heads, clusters, dim) or assign.dtype != torch.int64:
            raise Violation(f"centroids {cent.dtype} {tuple(cent.shape)} / assign {assign.dtype}: not as documented")
        if not torch.equal(assign, w_assign):
            raise Violation("cluster assignments differ from the reference's")
        close(cent, w_cent, "centroids")

    _vs_reference(case, ops.kmeans, args, compare)


# ----------------------------------------------------------------------------- indexes
_INDEX_SEARCH = {  # search parameter -> (valid strategy, bad values)
    "nprobe": (st.integers(1, 16), "value:0|-1|2.5|None"),
    "ef": (st.integers(1, 100), "value:0|-1|None"),
    "upper_ef": (st.integers(0, 50), "value:-1|None"),
    "scan": (st.floats(1.0, 4.0), "value:0.5|nan|-1.0|None"),
    "expand": (st.floats(0.05, 1.0), "value:0.0|1.5|nan|None"),
}


_BAD_INDEX_SETTINGS = {"dim": "value:0|-1|True|2.5|str", "cluster_size": "value:0|-2|2.5|None",
                       "max_degree": "value:0|-4", "kind": "value:bogus|None"}


def _new_index(case: Case, kind: str, dim):
    """``call`` of the constructor of an index of ``kind`` with drawn settings (now and then an
    invalid one: ``case.bad``)."""
    from lckv import index

    cls = index.FaissIndex if kind == "faiss" else getattr(index, kind)
    settings = {"dim": dim}
    if kind == "faiss":
        settings["kind"] = case.choice("faiss_kind", ("flat", "hnsw", "ivf"))
    if kind in ("IVFIndex", "faiss") and settings.get("kind", "ivf") == "ivf" and case.chance("n_lists", 0.5):
        settings["n_lists"] = case.int("n_lists", 1, 16)
    if kind == "GraphIndex":
        settings["max_degree"] = case.int("max_degree", 2, 48) if case.chance("max_degree", 0.5) else None
    if kind == "ClusterIndex":
        settings.update(cluster_size=case.int("cluster_size", 1, 16), segment=case.int("segment", 16, 64))
    options = {name: [(kinds, (name,))] for name, kinds in _BAD_INDEX_SETTINGS.items() if name in settings}
    settings = mutate(case, settings, options, prefix="new.", chance=0.15)
    case.note("index", f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})")
    return call(lambda: cls(**settings))


def _index_target(kind: str):
    def target(case: Case) -> None:
        from lckv.index import EmptyIndexError
        from lckv.index.base import MAX_K

        dim = case.choice("dim", (1, 2, 3, 8, 16, 33, 64))
        ix, exc = _new_index(case, kind, dim)
        if expect_error(case, ix, exc):
            return
        case.bad = set()
        held = torch.empty(0, dim, dtype=torch.float64)  # the keys the index must hold, in id order
        for step in range(case.int("steps", 1, 5)):
            case.bad = set()
            action = case.choice(f"s{step}.action", ("build", "add", "add", "search", "search", "search"))
            if action in ("build", "add"):
                n = case.int(f"s{step}.n", 0, 200)
                keys = case.tensor(f"s{step}.keys", (n, dim), layout="contiguous")
                args = {"keys": keys}
                if action == "build" and case.chance(f"s{step}.with_queries", 0.5):
                    args["queries"] = case.tensor(f"s{step}.queries", (case.int(f"s{step}.m", 0, 40), dim),
                                                  layout="contiguous")
                bad = [("type", None), ("dtype", None), ("ndim", None), ("nan", None), ("inf", None),
                       ("dim1", ("keys", "head_dim", "dim")), ("noncontiguous", None), ("meta", None)]
                args = mutate(case, args, {"keys": bad}, prefix=f"s{step}.", chance=0.25)
                if action == "build" and held.shape[0] and not case.bad:
                    case.bad = {"build", "add"}  # build() needs an empty index
                before = ix.size
                result, exc = checked_call(getattr(ix, action), args)
                if exc is not None and ix.size != before:
                    raise Violation(f"a refused {action}() changed size {before} -> {ix.size}")
                if action == "build" and n == 0 and exc is not None and not case.bad:
                    case.refuse(exc, {"keys"})  # an index built from no keys may refuse them, by name
                    continue
                if expect_error(case, result, exc):
                    continue
                held = torch.cat([held, keys.double()])
                if ix.size != held.shape[0]:
                    raise Violation(f"size {ix.size} after {action}() of {n} keys, expected {held.shape[0]}")
                continue
            m = case.int(f"s{step}.m", 0, 6)
            queries = case.tensor(f"s{step}.queries", (m, dim), layout="contiguous")
            k = case.choice(f"s{step}.k_huge", _HUGE) if case.chance(f"s{step}.k_is_huge", 0.04) else \
                case.int(f"s{step}.k", 1, held.shape[0] + 10)
            params = {}
            for name in ix.search_params:
                if name in _INDEX_SEARCH and case.chance(f"s{step}.{name}.set", 0.5):
                    params[name] = case.draw(f"s{step}.{name}", _INDEX_SEARCH[name][0])
            options = {"queries": [("type", None), ("dtype", None), ("ndim", None), ("nan", None),
                                   ("dim1", ("queries", "head_dim", "dim")), ("noncontiguous", None)],
                       "k": [("value:0|-1|True|2.5|None", ("k",))]}
            for name in ix.search_params:
                if name in _INDEX_SEARCH:
                    options[name] = [(_INDEX_SEARCH[name][1], (name,))]
            args = {"queries": queries, "k": k, **{n: params.get(n) for n in options if n not in ("queries", "k")}}
            args = mutate(case, args, options, prefix=f"s{step}.", chance=0.25)
            args = {n: v for n, v in args.items() if n in ("queries", "k") or n in params or n in case.bad}
            if case.chance(f"s{step}.unknown_param", 0.03) and not case.bad:
                args["bogus_param"] = 1
                case.bad = {"bogus_param"}
            if type(args.get("k")) is int and args["k"] > MAX_K:  # refused by name (lckv.index.base.MAX_K)
                case.bad |= {"k"}
            allowed = ALLOWED
            if held.shape[0] == 0:  # an empty index: EmptyIndexError, or the bad argument's error
                allowed = ALLOWED if case.bad else (EmptyIndexError,)
                case.bad |= {"empty"}
            result, exc = checked_call(ix.search, args)
            if k in _HUGE and exc is not None and not case.bad:
                case.bad = {"k"}
            if expect_error(case, result, exc, allowed=allowed):
                continue
            scores, ids, n_scored = result
            if n_scored.dtype != torch.int64 or tuple(n_scored.shape) != (m,) or bool((n_scored < 0).any()):
                raise Violation(f"n_scored {n_scored.dtype} {tuple(n_scored.shape)}: documented int64 [m] >= 0")
            exact = queries.double() @ held.T
            scan = args.get("scan", ix.search_params.get("scan", 0.0))
            is_exact = kind == "FlatIndex" or (kind == "ClusterIndex" and scan * k >= held.shape[0]) or \
                (kind == "faiss" and ix.kind == "flat")
            _check_topk(scores, ids, exact, min(k, held.shape[0]), k, f"{kind}.search", exact_scores=is_exact or None)

    target.__name__ = f"target_{kind}"
    target.__doc__ = (f"{kind}: construct (bad settings refused by name), build/add (NaN, dims, dtype, strides "
                      "refused, size unchanged) and search (k 0, negative, past the size, huge; padding rule; "
                      "scores are the ids' inner products; exact indexes: the true top-k)")
    return target


# ----------------------------------------------------------------------------- policies
_ANY_VALUE = st.one_of(
    st.integers(-3, 5000), st.sampled_from([0, 1, 2, 2**40, -(2**40)]), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.05, 0.5, 1.0, 1.5]), st.booleans(), st.none(),
    st.sampled_from(["exact", "retrieval", "max", "avg", "none", "auto", "probability", "logits", "cluster", "flat",
                     "graph", "ivf", "faiss_hnsw", "float32", "bfloat16", "float16", "", "bogus"]),
    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["max_degree", "ef", "scan", "nprobe", "cluster_size", "bogus"]),
                    st.one_of(st.integers(-2, 64), st.floats(0, 4), st.text(max_size=3)), max_size=2))

#: the Python types a policy field's annotation admits (bool is not an int, an int is a float)
_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "str | None": (str, type(None)),
                "dict": (dict,), "int | str": (int, str), "int | None": (int, type(None))}


def _type_ok(annotation: str, value) -> bool:
    types = _FIELD_TYPES.get(annotation)
    if types is None:
        return True
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def target_policy_config(case: Case) -> None:
    """``resolve_policy(name, **settings)`` over every registered policy with drawn settings of
    right and wrong types and ranges: a policy holding exactly the settings, or
    :class:`PolicyConfigError` naming the setting (the policy, for an unknown name); a setting of
    the wrong type is never accepted. An accepted selection policy's budget split is consistent
    (sink + window + selected = budget, window >= 1, selected >= 1) or raises BudgetTooSmallError;
    an instance made invalid after construction is refused by :func:`resolve_policy`."""
    from lckv.policies import PolicyConfigError, SelectionPolicy, available_policies, resolve_policy
    from lckv.policies.base import _REGISTRY

    names = available_policies()
    name = case.choice("policy", names + ["bogus", "FULL", ""])
    cls = _REGISTRY.get(name)
    fields = [f for f in dataclasses.fields(cls)] if cls else []
    chosen = case.draw("settings", st.lists(st.sampled_from([f.name for f in fields] or ["sink"]), max_size=4,
                                            unique=True))
    settings = {}
    for setting in chosen:
        settings[setting] = case.draw(f"{setting}", _ANY_VALUE)
    if case.chance("unknown_setting", 0.05):
        settings["bogus_setting"] = 1
    annotations, init = {f.name: f.type for f in fields}, {f.name: f.init for f in fields}
    wrong = sorted(s for s, v in settings.items() if s not in annotations or not _type_ok(annotations[s], v)
                   or not init[s])
    as_instance = cls is not None and case.chance("as_instance", 0.3)
    if as_instance:  # a valid instance whose fields are then set to the drawn values
        settings = {s: v for s, v in settings.items() if s in annotations and init[s]}
        wrong = [s for s in wrong if s in settings]
        policy = cls()
        for setting, value in settings.items():
            setattr(policy, setting, value)
        result, exc = call(resolve_policy, policy)
    else:
        result, exc = call(resolve_policy, name, **settings)
    if exc is not None:
        names_ok = set(settings) | ({"policy", name} if cls is None else set())
        case.refuse(exc, names_ok or {"policy"}, allowed=(PolicyConfigError,))
        return
    if cls is None:
        raise Violation(f"accepted an unknown policy name {name!r}")
    if wrong:
        raise Violation(f"accepted settings of the wrong type or unknown: "
                        f"{ {s: settings.get(s) for s in wrong} } (annotations {[annotations.get(s) for s in wrong]})")
    for setting, value in settings.items():
        got = getattr(result, setting)
        if not (got is value or got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got))):
            raise Violation(f"policy holds {setting}={got!r}, given {value!r}")
    for n in (1, 2, 7, 100, 4096):
        window, exc = call(result.resident_window, n)
        if exc is not None:
            check_error(exc, {"budget", "sink"}, allowed=(PolicyConfigError,))
            continue
        if not isinstance(window, int) or window < 1:
            raise Violation(f"resident_window({n}) = {window!r}: must be an int >= 1")
        if isinstance(result, SelectionPolicy):
            split, exc = call(result.split_budget, n)
            if exc is not None:
                check_error(exc, {"budget", "sink"}, allowed=(PolicyConfigError,))
                continue
            sink, w, selected = split
            total = result.budget_tokens(n)
            if sink + w + selected != total or w < 1 or selected < 1 or w > result.window:
                raise Violation(f"split_budget({n}) = {split} for a budget of {total} tokens")


# ----------------------------------------------------------------------------- the cache
def _layer_state(layer) -> tuple:
    if not layer.is_initialized:
        return (False,)
    store = layer.store
    return (layer.total, layer.evicted, layer.sink_k.shape, layer.recent_k.shape, layer.sink_v.shape,
            layer.recent_v.shape, layer.recent_k.dtype, layer.recent_v.dtype,
            None if store is None else (store.length, store.keys.dtype))


def target_cache_update(case: Case) -> None:
    """``LckvCache`` under a drawn policy fed a drawn sequence of updates: each valid update returns
    the sink then the newest tokens (every new token included), and the sink, the offloaded store
    and the recent part together hold every token fed (evicted ones counted, for ``streaming``);
    a bad update (shapes, dtypes, k/v mismatch, a layer out of range) is refused by name and
    leaves every length and dtype as it was."""
    from lckv.cache import LckvCache
    from lckv.policies import get_policy

    name = case.choice("policy", ("full", "streaming", "quest", "snapkv", "block"))
    sink, window = case.int("sink", 0, 6), case.int("window", 1, 24)
    settings = {"sink": sink, "window": window}
    if name != "full" and name != "streaming":
        settings["budget"] = case.int("budget", sink + 2, sink + 80)
    if case.chance("host_dtype", 0.2):
        settings["host_dtype"] = case.choice("host_dtype.value", ("float32", "bfloat16", "float16"))
    policy = get_policy(name, **settings)
    layers = case.int("layers", 1, 3)
    cache = LckvCache(policy, layers)
    cache.routed = True  # as lckv.enable's attention sets it: the cache may offload and evict
    B, H, D = case.int("batch", 1, 3), case.int("kv_heads", 1, 3), case.choice("head_dim", (1, 4, 8, 16))
    dtype = case.choice("dtype", FLOAT_DTYPES)
    history = [[] for _ in range(layers)]  # per layer: (k, v) fed, in order
    for step in range(case.int("steps", 1, 6)):
        case.bad = set()
        layer_idx = case.int(f"s{step}.layer", 0, layers - 1)
        n = case.int(f"s{step}.n", 0, 30) if step == 0 or case.chance(f"s{step}.chunk", 0.3) else 1
        k = case.tensor(f"s{step}.k", (B, H, n, D), dtype)
        v = case.tensor(f"s{step}.v", (B, H, n, D), dtype)
        args = {"key_states": k, "value_states": v, "layer_idx": layer_idx}
        options = {"key_states": [("type", None), ("ndim", ("key_states", "keys")),
                                  ("dim3", ("key_states", "keys", "head_dim"))],
                   "value_states": [("dim2", ("value_states", "values", "key_states")),
                                    ("dim3", ("value_states", "values", "head_dim")),
                                    ("dtype", ("value_states", "values", "dtype")), ("type", None)],
                   "layer_idx": [(f"value:{layers}|-1|None", ("layer_idx",))]}
        if history[layer_idx]:
            options["key_states"] += [("dim0", ("key_states", "keys", "batch")),
                                      ("dim1", ("key_states", "keys", "kv_heads")),
                                      ("dtype", ("key_states", "keys", "dtype"))]
        args = mutate(case, args, options, prefix=f"s{step}.")
        layer = cache.layers[layer_idx]
        before = [_layer_state(lay) for lay in cache.layers]
        result, exc = checked_call(cache.update, args)
        if exc is not None:
            if [_layer_state(lay) for lay in cache.layers] != before:
                raise Violation("a refused update changed the cache's lengths or dtypes")
        if expect_error(case, result, exc):
            return
        history[layer_idx].append((k, v))
        all_k = torch.cat([h[0] for h in history[layer_idx]], 2)
        all_v = torch.cat([h[1] for h in history[layer_idx]], 2)
        total = all_k.shape[2]
        got_k, got_v = result
        n_sink = min(sink, total)
        n_recent = got_k.shape[2] - n_sink
        if layer.get_seq_length() != total:
            raise Violation(f"get_seq_length() {layer.get_seq_length()} after {total} tokens")
        if n_recent < min(n, total - n_sink) or n_recent > max(window - 1, 0) + n:
            raise Violation(f"{n_recent} recent tokens resident after an update of {n} (window {window})")
        want_k = torch.cat([all_k[:, :, :n_sink], all_k[:, :, total - n_recent:]], 2)
        want_v = torch.cat([all_v[:, :, :n_sink], all_v[:, :, total - n_recent:]], 2)
        if not (same_tensor(got_k, want_k) and same_tensor(got_v, want_v)):
            raise Violation("update() did not return the sink then the newest tokens")
        stored = layer.store.length if layer.store is not None else 0
        if n_sink + stored + n_recent + layer.evicted != total:
            raise Violation(f"sink {n_sink} + offloaded {stored} + recent {n_recent} + evicted {layer.evicted} "
                            f"!= {total} tokens")
        if stored:
            host = getattr(torch, policy.host_dtype) if policy.host_dtype else dtype
            middle = slice(n_sink, n_sink + stored)
            if not (same_tensor(layer.store.keys, all_k[:, :, middle].to(host))
                    and same_tensor(layer.store.values, all_v[:, :, middle].to(host))):
                raise Violation("the offloaded store does not hold the tokens between the sink and the recent part")


# ----------------------------------------------------------------------------- rewards and scorers
_NOISE = st.sampled_from(["", " ", "\n", "é", "日本語", "\u200b", "🙂", "\x00", "**", "The", "the answer is",
                          "[DOC", "]", "1990", "a", "Quote 1:", '"', "\u201c", "\r\n", "\t"])
_SHORT_TEXT = st.one_of(st.text(max_size=12), _NOISE, st.sampled_from(["Paris", "Marie Curie", "1990", "the Beatles"]))
_REWARD_RANGES = {"ao": 1.0, "id": 2.0, "id_c": 4.8, "id_q": 4.2, "r_judge": 4.0}
_UNIT_PARTS = ("ao", "id_f1", "content", "format", "quote_precision", "coverage", "overlong", "judge_ok", "invalid")


class _Judge:
    """A judge that answers with drawn verdicts (or None: unreachable); no network."""

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def grade(self, messages, n: int = 3):
        from training.judge import parse_criteria

        return self.verdicts if not isinstance(self.verdicts, str) else parse_criteria(self.verdicts, n)


def _solution_text(case: Case, documents: list, aliases: list) -> str:
    """A response built from the pieces the rewards parse (answer lines, [DOC i] tags, quotes,
    section headers), some copied from the documents and the aliases, plus noise."""
    lines = []
    for i in range(case.int("lines", 0, 8)):
        kind = case.choice(f"line{i}", ("answer", "answer", "tags", "quote", "relevant", "relevant_ids", "doc_copy",
                                        "noise"))
        alias = case.choice(f"line{i}.alias", aliases) if aliases and case.chance(f"line{i}.use_alias", 0.7) else \
            case.draw(f"line{i}.text", _SHORT_TEXT)
        alias = alias if isinstance(alias, str) else str(alias)
        doc_ids = case.draw(f"line{i}.ids", st.lists(st.integers(-2, len(documents) + 2), max_size=4))
        tags = ", ".join(f"[DOC {j}]" for j in doc_ids)
        doc = documents[doc_ids[0]] if doc_ids and 0 <= doc_ids[0] < len(documents) and \
            isinstance(documents[doc_ids[0]], str) else ""
        words = doc.split()
        lo = case.int(f"line{i}.from", 0, max(0, len(words)))
        quote = " ".join(words[lo:lo + case.int(f"line{i}.words", 0, 40)])
        lines.append({"answer": f"{case.choice(f'line{i}.prefix', ('', '**', '> '))}The answer is: {alias}",
                      "tags": tags, "quote": f'Quote {case.int(f"line{i}.n", 0, 12)}: "{quote}"',
                      "relevant": "Relevant documents:", "relevant_ids": f"Relevant Document IDs: {tags}",
                      "doc_copy": f"{tags} {doc}", "noise": case.draw(f"line{i}.noise", st.text(max_size=40))}[kind])
    return "\n".join(lines)


def target_rewards(case: Case) -> None:
    """The five GRPO rewards (``reward_components``, the VERL entry points and the ``compute_score``
    dispatch) on drawn responses, ground truths and extra_info of every accepted form and many
    unaccepted ones: never raise, and the score and its parts stay in the documented ranges. An
    unknown weight keyword raises TypeError naming it."""
    from training import rewards

    aliases = case.draw("aliases", st.lists(_SHORT_TEXT, max_size=3))
    documents = case.draw("documents", st.lists(st.one_of(st.text(max_size=80), _SHORT_TEXT,
                                                          st.sampled_from(["Paris is the capital of France and a city.",
                                                                           None, 5])), max_size=5))
    gold_ids = case.draw("gold_ids", st.lists(st.one_of(st.integers(-2, 6), st.sampled_from(
        [float("inf"), float("nan"), 1e30, "1", None, 2.5, 2**70])), max_size=4))
    truth_form = case.choice("truth_form", ("dict", "json", "str", "list", "bytes", "garbage"))
    truth = {"answers": aliases, "gold_ids": gold_ids}
    ground_truth = {"dict": truth, "json": json.dumps(truth), "str": aliases[0] if aliases else "",
                    "list": aliases, "bytes": (aliases[0] if aliases else "").encode(),
                    "garbage": case.choice("garbage", (None, 5, 2.5, object(), {"answers": 3}, b"\xff\xfe",
                                                       "{not json", {"gold_ids": "x"}))}[truth_form]
    extra_info = {"documents": documents, "question": case.draw("question", _SHORT_TEXT)}
    if case.chance("extra_info.garbage", 0.1):
        extra_info = case.choice("extra_info.value", (None, "x", [1], {"documents": "abc"}, {"documents": 5}))
    form = case.choice("solution_form", ("text", "text", "text", "bytes", "none", "number", "huge", "empty"))
    text = _solution_text(case, [d for d in documents], [a for a in aliases if isinstance(a, str)])
    solution = {"text": text, "bytes": text.encode("utf-8", errors="surrogatepass") + b"\xff", "none": None,
                "number": 42, "huge": "x" * (rewards.MAX_RESPONSE_CHARS + 1), "empty": "   "}[form]
    fmt = case.choice("format", tuple(_REWARD_RANGES))
    weights = {}
    if fmt == "r_judge":
        weights["judge_client"] = _Judge(case.choice("judge", (None, [0, 1, 1], [1, 1, 1], [0, 0, 0],
                                                              "\\boxed{Criterion 1: 1}", "garbage")))
    if case.chance("max_response_chars", 0.1):
        weights["max_response_chars"] = case.int("max_response_chars.value", 1, 200)
    if case.chance("unknown_weight", 0.05):
        weights["bogus_weight"] = 1.0
        case.bad = {"bogus_weight"}
    entry = case.choice("entry", ("components", "verl", "dispatch"))
    if entry == "components":
        result, exc = call(rewards.reward_components, fmt, solution, ground_truth, extra_info, **weights)
    elif entry == "verl":
        result, exc = call(getattr(rewards, f"compute_score_{fmt}"), "hotpotqa", solution, ground_truth, extra_info,
                           **weights)
    else:
        if isinstance(extra_info, dict):
            extra_info = {**extra_info, "format": case.choice("dispatch_format", (*_REWARD_RANGES, "bogus", None))}
            fmt = extra_info["format"] if extra_info["format"] in _REWARD_RANGES else "ao"
        else:
            fmt = "ao"
        weights.pop("judge_client", None)
        if fmt == "r_judge":
            weights["judge_client"] = _Judge(None)
        result, exc = call(rewards.compute_score, "hotpotqa", solution, ground_truth, extra_info, **weights)
    if expect_error(case, result, exc):
        return
    parts = result if isinstance(result, dict) else {"score": result}
    for key, value in parts.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise Violation(f"reward part {key}={value!r} is not a finite number")
        if key in _UNIT_PARTS and not 0.0 <= value <= 1.0:
            raise Violation(f"reward part {key}={value!r} outside [0, 1]")
    score = parts["score"]
    if not isinstance(score, float) or not 0.0 <= score <= _REWARD_RANGES[fmt] + 1e-9:
        raise Violation(f"{fmt} score {score!r} outside [0, {_REWARD_RANGES[fmt]}]")


def target_scorers(case: Case) -> None:
    """Evaluation scorers and the fuzzy matching they use on drawn (unicode, empty) strings and
    numbers: SubEM and similarities in [0, 1] (1 for identical non-empty texts), relative drop
    finite, NDCG@k in [0, 1], prompt segments that join to the prompt; a bad argument raises
    ValueError/TypeError naming it."""
    from training import matching, scorers
    from training.prompts import FORMATS, build_messages

    which = case.choice("scorer", ("subem", "mean_subem", "relative_drop", "ndcg", "prompt_segments", "similarity"))
    unit = None
    if which == "subem":
        prediction = case.draw("prediction", st.one_of(_SHORT_TEXT, st.text(max_size=60), st.none(), st.integers()))
        answers = case.draw("answers", st.one_of(_SHORT_TEXT, st.lists(_SHORT_TEXT, max_size=3)))
        if case.chance("answers.bad", 0.05):
            answers, case.bad = case.choice("answers.bad_value", ([None, 3], 5, b"x")), {"answers"}
        result, exc = call(scorers.subem_score, prediction, answers)
        unit = result
    elif which == "mean_subem":
        predictions = case.draw("predictions", st.lists(_SHORT_TEXT, max_size=4))
        answers = case.draw("answers", st.lists(st.lists(_SHORT_TEXT, max_size=2), max_size=4))
        if len(predictions) != len(answers) or not predictions:
            case.bad = {"predictions", "answers"}
        result, exc = call(scorers.mean_subem, predictions, answers)
        unit = result
    elif which == "relative_drop":
        number = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000))
        full = case.draw("full", st.one_of(number, st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "1", None])))
        compressed = case.draw("compressed", st.one_of(number, st.sampled_from([float("nan"), float("-inf"), "x"])))
        ok = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        case.bad = {"full"} if not ok(full) or full <= 0 else set()
        if not ok(compressed):
            case.bad.add("compressed")
        result, exc = call(scorers.relative_drop, full, compressed)
        if exc is None and not case.bad and (not math.isfinite(result)
                                             or abs(result - 100.0 * (full - compressed) / full) > 1e-6 * abs(result)):
            raise Violation(f"relative_drop({full!r}, {compressed!r}) = {result!r}")
    elif which == "ndcg":
        n = case.int("n_docs", 0, 12)
        scores = case.draw("scores", st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n))
        relevance = case.draw("relevance", st.lists(st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0, 5)),
                                                    min_size=n, max_size=n))
        k = case.int("k", 1, 12)
        mutation = case.choice("ndcg.bad", ("none",) * 6 + ("length", "k", "k_type", "negative", "nan", "inf"))
        if mutation == "length":
            relevance, case.bad = relevance + [1.0], {"scores", "relevance"}
        elif mutation == "k":
            k, case.bad = case.int("k.bad", -3, 0), {"k"}
        elif mutation == "k_type":
            k, case.bad = case.choice("k.bad_type", (2.5, "3", None)), {"k"}
        elif mutation in ("negative", "nan", "inf") and n:
            relevance = list(relevance)
            bad = {"negative": -1.0, "nan": float("nan"), "inf": float("inf")}[mutation]
            relevance[case.int("relevance.at", 0, n - 1)] = bad
            case.bad = {"relevance"}
        if not case.bad and not any(r > 0 for r in relevance):
            case.bad = {"relevance"}  # nothing relevant: NDCG undefined, documented to raise
        if any(math.isnan(x) for x in scores):
            case.bad |= {"scores"}  # a ranking of NaN scores is undefined
        result, exc = call(scorers.ndcg_at_k, scores, relevance, k)
        unit = result
    elif which == "prompt_segments":
        question = case.draw("question", st.one_of(_SHORT_TEXT, st.text(max_size=40)))
        document = st.fixed_dictionaries({"title": st.one_of(_SHORT_TEXT, st.text(max_size=20)),
                                          "text": st.one_of(_SHORT_TEXT, st.text(max_size=60))})
        documents = case.draw("documents", st.lists(document, max_size=5))
        fmt = case.choice("fmt", FORMATS + ("bogus",))
        if fmt == "bogus":
            case.bad = {"fmt"}
        result, exc = call(scorers.prompt_segments, question, documents, fmt)
        if exc is None and not case.bad:
            segments, doc_index = result
            prompt = build_messages(question, documents, fmt)[1]["content"]
            if "".join(segments) != prompt or len(doc_index) != len(documents):
                raise Violation("segments do not join to the user prompt, or a document has no segment")
            for i, j in enumerate(doc_index):
                if not segments[j].startswith(f"[DOC {i}]"):
                    raise Violation(f"segment {j} of document {i} does not start with its [DOC {i}] tag")
    else:
        a = case.draw("a", st.one_of(_SHORT_TEXT, st.text(max_size=60)))
        b = a if case.chance("identical", 0.2) else case.draw("b", st.one_of(_SHORT_TEXT, st.text(max_size=60)))
        method = case.choice("method", ("jaccard", "char_f1", "ngram", "mean", "max", "partial", "bogus"))
        if method == "bogus":
            case.bad = {"method"}
        if method == "partial":
            result, exc = call(matching.partial_similarity, a, b)
        elif method == "ngram":
            result, exc = call(matching.ngram_overlap, a, b, case.int("ngram.n", 1, 4))
        else:
            result, exc = call(matching.passage_similarity, a, b, method)
        unit = result
        exact_methods = ("jaccard", "char_f1", "partial", "max")
        if exc is None and a == b and matching.normalize_answer(a) and method in exact_methods and result != 1.0:
            raise Violation(f"{method} similarity of a text with itself is {result!r}, not 1")
    if expect_error(case, result, exc):
        return
    if unit is not None and (not isinstance(unit, float) or not 0.0 <= unit <= 1.0):
        raise Violation(f"{which} = {unit!r}, documented in [0, 1]")


# ----------------------------------------------------------------------------- files
_TMP: list[str] = []


def _tmp_dir() -> Path:
    """A fresh directory under this process's fuzz temp root (removed at exit)."""
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="lckv-fuzz-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return Path(tempfile.mkdtemp(dir=_TMP[0]))


def _random_bytes(case: Case, label: str, size: int) -> bytes:
    seed = case.int(f"{label}.seed", 0, 2**31)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen).numpy().tobytes()


def _corrupt(case: Case, data: bytes, kinds=("truncate", "flip", "append", "garbage", "empty")) -> tuple[bytes, str]:
    kind = case.choice("corruption", kinds)
    if kind == "truncate":
        return data[:case.int("truncate.at", 0, max(0, len(data) - 1))], kind
    if kind == "flip" and data:
        at = case.int("flip.at", 0, len(data) - 1)
        return data[:at] + bytes([data[at] ^ case.int("flip.mask", 1, 255)]) + data[at + 1:], kind
    if kind in ("append", "flip"):  # (a flip of no bytes appends)
        return data + _random_bytes(case, "append", case.int("append.size", 1, 64)), kind
    if kind == "garbage":
        return _random_bytes(case, "garbage", case.int("garbage.size", 0, 512)), kind
    return b"", kind


_BOOKMARKS: dict = {}


def _bookmark_fixture() -> dict:
    """A tiny Llama, its untrained bookmarks saved once, and a second model of the same shape."""
    if not _BOOKMARKS:
        from transformers import LlamaConfig, LlamaForCausalLM

        from lckv.retrolm import Bookmarks

        config = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**config)).eval()
            other = LlamaForCausalLM(LlamaConfig(**config)).eval()
        bookmarks = Bookmarks(model)
        path = bookmarks.save(_tmp_dir() / "bookmarks.pt")
        _BOOKMARKS.update(model=model, other=other, data=path.read_bytes(), fingerprint=bookmarks.fingerprint,
                          state={k: v.detach().clone() for k, v in bookmarks.state_dict().items()})
    return _BOOKMARKS


def _bookmark_payload(case: Case, fixture: dict) -> tuple[object, bool]:
    """A torch-saved payload, mostly a bookmark file's with one part wrong; True when it is right."""
    from lckv.retrolm import FILE_FORMAT

    if case.chance("payload.not_dict", 0.1):
        return case.choice("payload.value", ([1, 2], 5, "x", None, torch.zeros(2))), False
    state = dict(fixture["state"])
    key = case.choice("state.key", sorted(state))
    state_kind = case.choice("state", ("good", "good", "missing", "shape", "dtype", "extra", "not_tensor", "not_dict"))
    if state_kind == "missing":
        del state[key]
    elif state_kind == "shape":
        state[key] = torch.zeros(3, 5)
    elif state_kind == "dtype":
        state[key] = state[key].double()
    elif state_kind == "extra":
        state["extra.weight"] = torch.zeros(1)
    elif state_kind == "not_tensor":
        state[key] = case.choice("state.value", (1, "x", None, [1.0]))
    elif state_kind == "not_dict":
        state = case.choice("state.value", ([1], "x", None, 3))
    fingerprint = case.choice("fingerprint", ("good", "good", "good", "other", "none", "str", "list", "partial"))
    fp = {"good": fixture["fingerprint"], "other": {**fixture["fingerprint"], "q_proj_sha1": "0" * 40}, "none": None,
          "str": "x", "list": [1, 2], "partial": {"hidden_size": 16}}[fingerprint]
    fmt = case.choice("format", (FILE_FORMAT, FILE_FORMAT, FILE_FORMAT, "lckv-retrolm-bookmarks/0", None, 3))
    payload = {"format": fmt, "fingerprint": fp, "state": state}
    for drop in case.draw("payload.drop", st.lists(st.sampled_from(["format", "fingerprint", "state"]), max_size=1)):
        payload.pop(drop)
    good = payload.get("format") == FILE_FORMAT and fingerprint == "good" and state_kind in ("good", "dtype") \
        and "state" in payload and "fingerprint" in payload
    return payload, good


def target_bookmark_file(case: Case) -> None:
    """``lckv.retrolm.load_bookmarks`` on intact, truncated, bit-flipped, extended and random files,
    on torch files holding wrong payloads, a missing path and a directory: the saved bookmarks
    exactly, or FileNotFoundError / BookmarkFileError naming the file; never garbage parameters."""
    from lckv.retrolm import BookmarkFileError, load_bookmarks

    fixture = _bookmark_fixture()
    directory = _tmp_dir()
    path = directory / "bookmarks.pt"
    kind = case.choice("file", ("intact", "corrupt", "corrupt", "payload", "payload", "missing", "directory",
                                "other_model"))
    model = fixture["model"]
    expect_same = False
    if kind == "intact":
        path.write_bytes(fixture["data"])
        expect_same = True
    elif kind == "corrupt":
        data, how = _corrupt(case, fixture["data"])
        path.write_bytes(data)
        case.bad = {"bookmarks", str(path)}
        expect_same = how in ("flip", "append")  # may load, but then only as the saved parameters
    elif kind == "payload":
        payload, good = _bookmark_payload(case, fixture)
        buf = io.BytesIO()
        torch.save(payload, buf)
        path.write_bytes(buf.getvalue())
        expect_same = good
        if not good:
            case.bad = {"bookmarks", str(path)}
    elif kind == "missing":
        case.bad = {"bookmarks", str(path)}
    elif kind == "directory":
        path.mkdir()
        case.bad = {"bookmarks", str(path)}
    else:
        path.write_bytes(fixture["data"])
        model = fixture["other"]
        case.bad = {"bookmarks", str(path)}
    result, exc = call(load_bookmarks, path, model)
    shutil.rmtree(directory, ignore_errors=True)
    if exc is not None:
        case.refuse(exc, {"bookmarks", str(path)}, allowed=(BookmarkFileError, FileNotFoundError))
        if kind in ("intact",) or (kind == "payload" and expect_same):
            raise Violation(f"a valid bookmark file was refused: {exc}")
        return
    if case.bad and not expect_same:
        raise Violation(f"accepted a bad bookmark file ({kind})")
    state = result.state_dict()
    if set(state) != set(fixture["state"]) or any(not torch.equal(state[k].double(), fixture["state"][k].double())
                                                  for k in state):
        raise Violation(f"loaded parameters differ from the saved ones ({kind}): a corrupt file was read as garbage")


def target_model_cache(case: Case) -> None:
    """The model registry's cache (``lckv.models``) with a fake spec in a temp ``LCKV_CACHE`` and an
    empty ``LCKV_WHEEL_DIR`` (no download can happen): the GGUF absent, intact, truncated, flipped,
    extended, empty or a directory; its sha256 sidecar absent, matching, stale, of another hash,
    garbage (non-UTF-8) or a directory; leftovers of a killed fetch. ``is_fetched`` is a bool
    following the trust rule; ``model_path`` returns the directory iff the file is trusted or
    verifies (then its sidecar matches), else raises ModelNotFetchedError and a bad file is gone;
    ``fetch`` of a verified model never downloads."""
    from lckv.models import registry

    root = _tmp_dir()
    saved = {k: os.environ.get(k) for k in ("LCKV_CACHE", "LCKV_WHEEL_DIR")}
    os.environ["LCKV_CACHE"], os.environ["LCKV_WHEEL_DIR"] = str(root / "cache"), str(root / "wheels")
    (root / "wheels").mkdir()
    try:
        content = _random_bytes(case, "gguf", case.int("gguf.size", 1, 4096))
        part = registry.WheelPart("lckv-fuzz-absent", "0.0.0", "x/y.bin")  # never downloaded
        spec = registry.ModelSpec(name="fuzz-model", parts=(part,), gguf_file="fuzz.gguf",
                                  sha256=hashlib.sha256(content).hexdigest(), size=len(content), architecture="fuzz",
                                  description="random bytes", context_length=1)
        directory = registry.model_dir(spec)
        directory.mkdir(parents=True)
        gguf = directory / spec.gguf_file
        sidecar = gguf.with_name(gguf.name + ".sha256")
        state = case.choice("gguf", ("absent", "intact", "intact", "corrupt", "corrupt", "directory"))
        if state == "intact":
            gguf.write_bytes(content)
        elif state == "corrupt":
            data, how = _corrupt(case, content)
            gguf.write_bytes(data)
            state = "intact" if data == content else "corrupt"
        elif state == "directory":
            gguf.mkdir()
        side = case.choice("sidecar", ("absent", "matching", "matching", "stale", "other_hash", "garbage", "empty",
                                       "directory"))
        if side == "matching" and state == "directory":
            side = "stale"
        stamp = f"{gguf.stat().st_size} {gguf.stat().st_mtime_ns}" if gguf.exists() else "0 0"
        if side == "matching":
            sidecar.write_text(f"{spec.sha256} {stamp}\n")
        elif side == "stale":
            sidecar.write_text(f"{spec.sha256} {stamp.split()[0]} 1\n")
        elif side == "other_hash":
            sidecar.write_text(f"{'0' * 64} {stamp}\n")
        elif side == "garbage":
            sidecar.write_bytes(_random_bytes(case, "sidecar", case.int("sidecar.size", 0, 80)) + b"\xff")
        elif side == "empty":
            sidecar.write_bytes(b"")
        elif side == "directory":
            sidecar.mkdir()
        if case.chance("leftovers", 0.3):
            (directory / f".{spec.gguf_file}.123.abcd.partial").write_bytes(b"partial")
            (directory / ".download-xyz").mkdir()
        trusted = side == "matching" and state != "absent"
        good = state == "intact"
        which = case.choice("call", ("is_fetched", "model_path", "model_path", "fetch"))
        if which == "fetch" and not (trusted or good):
            which = "model_path"  # fetching a bad file would download: not here
        fn = {"is_fetched": registry.is_fetched, "model_path": registry.model_path,
              "fetch": lambda s: registry.fetch(s, progress=False)}[which]
        result, exc = call(fn, spec)
        if which == "is_fetched":
            if exc is not None:
                raise Violation(f"is_fetched raised {type(exc).__name__}: {exc}{_where(exc)}")
            if result is not trusted:
                raise Violation(f"is_fetched() = {result!r} for a {state} GGUF with a {side} sidecar")
            return
        if trusted or good:
            if exc is not None:
                raise Violation(f"{which} refused a {'trusted' if trusted else 'verifiable'} GGUF: "
                                f"{type(exc).__name__}: {exc}{_where(exc)}")
            if result != directory or not registry.is_fetched(spec):
                raise Violation(f"{which} returned {result} and left the sidecar unmatched")
            if good and gguf.read_bytes() != content:
                raise Violation(f"{which} changed the GGUF")
            return
        case.bad = {"fetch", spec.name}
        if exc is None:
            raise Violation(f"model_path accepted a {state} GGUF with a {side} sidecar")
        case.refuse(exc, {spec.name, str(gguf)}, allowed=(registry.ModelNotFetchedError,))
        if state == "corrupt" and gguf.exists():
            raise Violation("model_path left a GGUF that failed verification in place")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


def _dataset_row(case: Case, i: int, layout: str) -> dict:
    text = st.one_of(_SHORT_TEXT, st.text(max_size=40), st.sampled_from(["One. Two! Three?", "A b c. D e."]))
    titles = case.draw(f"row{i}.titles", st.lists(text, min_size=1, max_size=3, unique=True))
    sentences = [case.draw(f"row{i}.sents{j}", st.lists(text, min_size=1, max_size=3)) for j in range(len(titles))]
    answer = case.draw(f"row{i}.answer", st.one_of(st.sampled_from(["Paris", "1990"]), text))
    row = {"_id": f"id{i}", "question": case.draw(f"row{i}.question", text), "answer": answer}
    if layout == "musique":
        row["answer_aliases"] = case.draw(f"row{i}.aliases", st.lists(text, max_size=2))
        row["paragraphs"] = [{"idx": j, "title": t, "paragraph_text": " ".join(s), "is_supporting": j == 0}
                             for j, (t, s) in enumerate(zip(titles, sentences))]
    elif layout == "hotpotqa_hf":
        row["supporting_facts"] = {"title": [titles[0]], "sent_id": [0]}
        row["context"] = {"title": titles, "sentences": sentences}
    else:
        row["supporting_facts"] = [[titles[0], 0]]
        row["context"] = [[t, s] for t, s in zip(titles, sentences)]
        if layout == "2wiki":
            row["type"] = "compositional"
    return row


def _break_row(case: Case, i: int, row: dict, layout: str) -> dict:
    """A row with one field of the wrong type or missing (the loader must name the row)."""
    row = json.loads(json.dumps(row))
    how = case.choice(f"row{i}.broken", ("question", "answer", "aliases", "context", "text", "not_object", "sent_id"))
    if how == "question":
        row.pop("question")
    elif how == "answer":
        row["answer"] = case.choice(f"row{i}.answer.bad", (None, 5, "", ["a"]))
    elif how == "aliases":
        row["answer"], row["answer_aliases"] = "", case.choice(f"row{i}.aliases.bad", (5, [None], "x"))
    elif how == "context":
        row.pop("paragraphs" if layout == "musique" else "context")
    elif how == "text":
        if layout == "musique":
            row["paragraphs"][0]["paragraph_text"] = case.choice(f"row{i}.text.bad", (5, None, ["x"]))
        elif layout == "hotpotqa_hf":
            row["context"]["sentences"] = 5
        else:
            row["context"][0] = case.choice(f"row{i}.text.bad", (5, None, ["only title"]))
    elif how == "sent_id":
        if layout == "hotpotqa_hf":
            row["supporting_facts"]["sent_id"] = ["x"]
        elif layout != "musique":
            row["supporting_facts"] = [[row["context"][0][0], "x"]]
        else:
            row["paragraphs"] = 5
    else:
        return [row]
    return row


def target_training_data(case: Case) -> None:
    """The data builder's reader (``training.data.load_records``) on .jsonl/.json/.parquet files of
    drawn HotpotQA, HF-hotpot_qa, 2Wiki and MuSiQue rows: valid files give one QARecord per row (a
    .parquet file the same records as the .jsonl of the same rows); broken rows, truncated or
    corrupt files, bad suffixes and settings raise DataFormatError/ValueError naming the file, the
    row or the setting; a missing file FileNotFoundError."""
    import pandas as pd

    from training import data as D

    layout = case.choice("layout", ("hotpotqa", "hotpotqa_hf", "2wiki", "musique"))
    rows = [_dataset_row(case, i, layout) for i in range(case.int("rows", 0, 4))]
    answered = [any(isinstance(a, str) and a.strip() for a in [r["answer"], *r.get("answer_aliases", [])])
                for r in rows]
    broken = [i for i in range(len(rows)) if case.chance(f"row{i}.break", 0.1) or not answered[i]]
    for i in broken:
        rows[i] = _break_row(case, i, rows[i], layout)
    suffix = case.choice("suffix", (".jsonl", ".json", ".parquet", ".parquet", ".txt"))
    if suffix == ".parquet" and (layout not in ("musique", "hotpotqa_hf") or broken or not rows):
        suffix = ".jsonl"  # pyarrow stores uniform nested records only
    directory = _tmp_dir()
    path = directory / f"rows{suffix}"
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    if suffix == ".jsonl":
        data = jsonl
    elif suffix == ".json":
        data = json.dumps({"data": rows} if case.chance("json.wrapped", 0.3) else rows).encode()
    elif suffix == ".parquet":
        buf = io.BytesIO()
        pd.DataFrame(rows).to_parquet(buf)
        data = buf.getvalue()
    else:
        data = jsonl
    corrupt = case.chance("corrupt", 0.3)
    if corrupt:
        data, _ = _corrupt(case, data)
    path.write_bytes(data)
    if case.chance("missing", 0.05):
        path.unlink()
        case.bad = {str(path), path.name}
    settings = {"layout": case.choice("load.layout", ("auto", "auto", layout, "bogus")),
                "passage_words": case.choice("passage_words", (100, 100, 5, 1, 0, -1)),
                "limit": case.choice("limit", (None, None, 1, 3))}
    if settings["layout"] == "bogus":
        case.bad.add("layout")
    if settings["passage_words"] < 1:
        case.bad.add("passage_words")
    if suffix == ".txt":
        case.bad |= {path.name, str(path)}
    file_names = {str(path), path.name, "row"}  # a broken row or a corrupt file: either may be named
    names = case.bad | (file_names if corrupt or broken else set())
    result, exc = call(D.load_records, [path], **settings)
    shutil.rmtree(directory, ignore_errors=True)
    if exc is not None and (corrupt or broken) and not case.bad:
        case.refuse(exc, names)
        return
    if expect_error(case, result, exc, names=names):
        return
    if corrupt or broken:
        return  # a corruption that left a readable file (a flipped letter, a cut at a line end)
    want = len(rows) if settings["limit"] is None else min(len(rows), settings["limit"])
    if len(result) != want or not all(isinstance(r, D.QARecord) for r in result):
        raise Violation(f"{len(result)} records from {len(rows)} rows (limit {settings['limit']})")
    if suffix == ".parquet":
        reference_path = directory.with_name(directory.name + "-ref.jsonl")
        reference_path.write_bytes(jsonl)
        try:
            from_jsonl = D.load_records([reference_path], **settings)
        finally:
            reference_path.unlink()
        if result != from_jsonl:
            raise Violation("records read from .parquet differ from those of the same rows in .jsonl")


# ----------------------------------------------------------------------------- registry and runner
def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


#: target name -> target; the ops are named as in ``lckv.ops.__all__``
TARGETS = {
    "attention_with_lse": target_attention_with_lse,
    "sparse_attention_with_lse": target_sparse_attention_with_lse,
    "sink_window_attention_with_lse": target_sink_window_attention_with_lse,
    "merge_attention_states": target_merge_attention_states,
    "page_key_bounds": target_page_key_bounds,
    "quest_page_scores": target_quest_page_scores,
    "flat_topk_scores": target_flat_topk_scores,
    "gather_rows": target_gather_rows,
    "ivf_layout": target_ivf_layout,
    "ivf_topk_scores": target_ivf_topk_scores,
    "centroid_estimate": target_centroid_estimate,
    "estimate_add_rows": target_estimate_add_rows,
    "rank_by_group_probability": target_rank_by_group_probability,
    "decode_cluster_step": target_decode_cluster_step,
    "offload_rows": target_offload_rows,
    "kmeans": target_kmeans,
    "index_flat": _index_target("FlatIndex"),
    "index_ivf": _index_target("IVFIndex"),
    "index_graph": _index_target("GraphIndex"),
    "index_cluster": _index_target("ClusterIndex"),
    **({"index_faiss": _index_target("faiss")} if _faiss_available() else {}),
    "policy_config": target_policy_config,
    "cache_update": target_cache_update,
    "rewards": target_rewards,
    "scorers": target_scorers,
    "bookmark_file": target_bookmark_file,
    "model_cache": target_model_cache,
    "training_data": target_training_data,
}


@dataclass
class Failure:
    target: str
    message: str
    case: int  # 1-based index of the case within the target's run
    trace: dict

    def signature(self) -> str:
        """The failure without its numbers: failures of one cause share it."""
        head = self.message.split("\n")[0].split(": returned ")[0]
        head = re.sub(r"(/[\w.+-]+)+", "<path>", head)
        return re.sub(r"0x[0-9a-f]+|-?\d+(\.\d+)?(e-?\d+)?", "#", head)[:200]


@dataclass
class TargetReport:
    name: str
    seed: int
    cases: int = 0
    refused: int = 0  # cases that raised an allowed error
    seconds: float = 0.0
    failures: list = field(default_factory=list)


def target_seed(name: str, seed: int) -> int:
    """The hypothesis seed of target ``name`` in a run seeded ``seed`` (independent of the others)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def run_target(name: str, cases: int, seed: int, progress=None) -> TargetReport:
    """Runs target ``name`` for ``cases`` generated inputs from ``seed``: hypothesis ``@given`` under
    ``@seed``, generation only (no shrinking, no example database), every violation collected with
    its input. ``progress(report)`` is called after each case."""
    from hypothesis.errors import HypothesisException, InvalidArgument

    target = TARGETS[name]
    report = TargetReport(name, target_seed(name, seed))
    if cases <= 0:
        return report

    @hypothesis_seed(report.seed)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False)
    @given(st.data())
    def driver(data):
        case = Case(data)
        index = report.cases + 1
        CRASH_GUARD["current"] = {"target": name, "case": index, "trace": case.trace}
        started = time.perf_counter()
        faulthandler.dump_traceback_later(HANG_S, exit=True)
        try:
            target(case)
        except CaseSkipped:
            pass  # the parent process reports the crash this case caused
        except Violation as exc:
            report.failures.append(Failure(name, str(exc), index, dict(case.trace)))
        except InvalidArgument as exc:  # a strategy the target built wrongly: a bug of the target
            report.failures.append(Failure(name, f"target bug: {exc}{_where(exc)}", index, dict(case.trace)))
        except HypothesisException:
            raise
        except Exception as exc:  # noqa: BLE001 - an exception the target did not expect: a failure too
            report.failures.append(Failure(name, f"unexpected {type(exc).__name__}: {exc}{_where(exc)}", index,
                                           dict(case.trace)))
        else:
            report.refused += case.refused
        finally:
            faulthandler.cancel_dump_traceback_later()
            CRASH_GUARD["current"] = None
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_CASE_S and index > 1:  # the first case also pays the target's imports and fixtures
            report.failures.append(Failure(name, f"case took {elapsed:.1f} s (a hang?)", index, dict(case.trace)))
        report.cases = index
        report.seconds += elapsed
        if progress is not None:
            progress(report)

    driver()
    return report
