"""Public merge of partial attention states: ``merge_attention_states`` with a backend choice."""
from __future__ import annotations

import torch

from lckv import reference
from lckv._extension import compiled
from lckv.backends import resolve_backend
from lckv.checks import check_states
from lckv.ops._common import next_power_of_2

__all__ = ["merge_attention_states"]


def _triton(out_a, lse_a, out_b, lse_b):
    import triton

    from lckv.kernels.merge_states import merge_states_kernel

    head_dim = out_a.shape[-1]
    a = out_a.contiguous()
    b = out_b.to(out_a.dtype).contiguous()
    la = lse_a.contiguous()
    lb = lse_b.contiguous()
    out = torch.empty(out_a.shape, device=out_a.device, dtype=torch.float32)
    lse = torch.empty(lse_a.shape, device=out_a.device, dtype=torch.float32)
    rows = la.numel()
    if rows and head_dim:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)  # noqa: E731
        merge_states_kernel[grid](a, la, b, lb, out, lse, rows, head_dim, BLOCK_D=max(2, next_power_of_2(head_dim)))
    elif rows:
        lse.copy_(torch.logaddexp(la.float(), lb.float()))
    return out.to(out_a.dtype), lse


def _cpu(out_a, lse_a, out_b, lse_b):
    if out_a.shape[-1] == 0:  # no output columns: the kernel leaves lse unwritten
        lse = torch.logaddexp(lse_a.float(), lse_b.float())
        return out_a.new_empty(out_a.shape), lse
    return compiled("merge_attention_states").merge_attention_states(out_a, lse_a, out_b, lse_b)


_BACKENDS = {"triton": _triton, "cpu": _cpu}


def merge_attention_states(out_a, lse_a, out_b, lse_b, backend: str = "auto"):
    """Merges two partial attention states computed over disjoint key sets.

    Same contract as :func:`lckv.reference.merge_attention_states`: ``out_*`` are
    ``[..., head_dim]``, ``lse_*`` are ``[...]`` (natural log, ``-inf`` = empty part). Returns
    ``out`` in ``out_a.dtype`` and ``lse`` float32; two empty parts give 0 and ``-inf``.

    Example
    -------
    >>> out, lse = merge_attention_states(out_static, lse_static, out_retrieved, lse_retrieved)
    """
    device = out_a.device if isinstance(out_a, torch.Tensor) else "cpu"
    name = resolve_backend("merge_attention_states", device, backend)
    if name == "reference":
        return reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    check_states(out_a, lse_a, out_b, lse_b)
    return _BACKENDS[name](out_a, lse_a, out_b, lse_b)


def merge_states_unchecked(out_a, lse_a, out_b, lse_b):
    """:func:`merge_attention_states` on the ``auto`` backend without argument checks, for the
    decode engine's internal partial states. States that need a gradient (a training forward on
    an :class:`~lckv.cache.LckvCache`) take the reference, whose torch ops autograd follows; the
    kernels have no backward."""
    name = resolve_backend("merge_attention_states", out_a.device, "auto")
    if name == "reference" or (torch.is_grad_enabled() and any(t.requires_grad for t in (out_a, lse_a, out_b, lse_b))):
        return reference.attention.merge_states_unchecked(out_a, lse_a, out_b, lse_b)
    return _BACKENDS[name](out_a, lse_a, out_b, lse_b)
