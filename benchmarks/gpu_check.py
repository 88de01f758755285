"""GPU check: every GPU kernel of lckv against its reference op, compiled (not interpreted), then a
short speed table, including one decode-attention step of ``retrieval`` vs sdpa at a real model's
shape and 128K tokens. benchmarks/gpu_check.sh runs it on the GPU machine (after building the
extension there and running the ``cuda``-marked tests).

Correctness: each (op, backend) on CUDA tensors against :mod:`lckv.reference` on the same inputs
(fresh random, seeds printed), with the tolerances of the CPU test suite: fp32 sums to 1e-5
relative of their magnitude, 16-bit inputs at most 2x the error of torch's own 16-bit computation,
index outputs checked by the scores they claim. Speed: CUDA-event medians of ``--repeats`` runs
after warm-up, each kernel beside the torch code a user would write instead.

The decode step (Qwen2.5-0.5B's attention: 14 query heads, 2 kv heads, head_dim 64; one layer,
batch 1, fp16 K/V of ``--tokens`` keys on the GPU): sdpa over every key vs ``retrieval``'s GPU path
at a 2,048-key budget: sink 4 + window 64 exactly (Triton), the top 1,980 keys per kv head by the
group's summed query (flat top-k, ``cuda`` or ``triton``), sparse attention over them (Triton),
merged by LSE (Triton); plus its error against sdpa (the selection is exact top-k by logits, not
by probability, so the error is the budget's, not a bug's).

Writes ``gpu_check.json`` under ``--out`` (default ``$OUT`` or benchmarks/results/) and prints the
tables. ``--dry-run`` runs the same code on the CPU with the reference backends and tiny sizes (it
checks the script itself; tests/test_benchmarks.py runs it).

    python benchmarks/gpu_check.py               # on a GPU
    python benchmarks/gpu_check.py --dry-run     # anywhere
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Table, machine  # noqa: E402

import lckv.ops as ops  # noqa: E402
import lckv.reference as reference  # noqa: E402
from lckv.backends import available_backends  # noqa: E402


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def _median_ms(fn, repeats: int, device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def _max_err(got, want) -> float:
    finite = torch.isfinite(want)
    return float((got.float()[finite] - want.float()[finite]).abs().max()) if finite.any() else 0.0


# ----------------------------------------------------------------------------------- correctness
def check_flat_topk(backend, device, seed, sizes):
    gen = _seeded(seed)
    batch, kv_heads, group, seq, head_dim, top_k = sizes
    q = _randn(gen, batch, kv_heads * group, head_dim, device=device)
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k = _randn(gen, batch, kv_heads, seq, head_dim, dtype=dtype, device=device)
        scores, idx = ops.flat_topk_scores(q, k, top_k, backend=backend)
        want, _ = reference.flat_topk_scores(q.float().cpu(), k.float().cpu(), top_k)
        exact = (q.float().reshape(batch, kv_heads, group, head_dim) @ k.float().transpose(-1, -2)).reshape(
            batch, kv_heads * group, seq)
        claimed = torch.gather(exact, -1, idx.clamp(min=0))
        tol = 1e-5 * head_dim ** 0.5 * max(1.0, float(want.abs().max()))
        ok = (_max_err(scores.cpu(), want) <= tol and _max_err(claimed.cpu(), scores.cpu()) <= tol
              and all(row.unique().numel() == row.numel() for row in idx.reshape(-1, top_k).cpu()))
        out[str(dtype).replace("torch.", "")] = ok
    return all(out.values()), out


def check_gather(backend, device, seed, sizes):
    gen = _seeded(seed)
    batch, heads, seq, head_dim, n = sizes
    result = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        src = _randn(gen, batch, heads, seq, head_dim, dtype=dtype)
        indices = torch.randint(-1, seq, (batch, heads, n), generator=gen).to(device)
        host = src.pin_memory() if device.type == "cuda" else src
        got = ops.gather_rows(host, indices, backend=backend)
        result[str(dtype).replace("torch.", "")] = bool(torch.equal(got.cpu(), reference.gather_rows(src, indices.cpu())))
    return all(result.values()), result


def _lowp_sparse(q, k, v, idx):
    """Torch's own sparse attention with every step in the inputs' dtype (the 16-bit error scale)."""
    batch, kv_heads, n = idx.shape
    head_dim = q.shape[-1]
    rows = idx.clamp(min=0)[..., None].expand(-1, -1, -1, head_dim)
    k_sel, v_sel = torch.gather(k, 2, rows), torch.gather(v, 2, rows)
    scores = (q.reshape(batch, kv_heads, -1, head_dim) @ k_sel.transpose(-1, -2)) * head_dim ** -0.5
    probs = torch.softmax(scores.masked_fill((idx < 0)[:, :, None], float("-inf")), dim=-1)
    return (probs @ v_sel).reshape(q.shape)


def check_sparse_attention(backend, device, seed, sizes):
    gen = _seeded(seed)
    batch, kv_heads, group, seq, head_dim, n = sizes
    result = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q = _randn(gen, batch, kv_heads * group, head_dim, dtype=dtype, device=device)
        k = _randn(gen, batch, kv_heads, seq, head_dim, dtype=dtype, device=device)
        v = _randn(gen, batch, kv_heads, seq, head_dim, dtype=dtype, device=device)
        idx = torch.randint(-1, seq, (batch, kv_heads, n), generator=gen).to(device)
        out, lse = ops.sparse_attention_with_lse(q, k, v, idx, backend=backend)
        want, want_lse = reference.sparse_attention_with_lse(q.float().cpu(), k.float().cpu(), v.float().cpu(), idx.cpu())
        if dtype == torch.float32:
            ok = _max_err(out.cpu(), want) <= 1e-5 * 4 and _max_err(lse.cpu(), want_lse) <= 1e-5 * 4
        else:  # 2x the error of the same math in the inputs' dtype
            ok = _max_err(out.cpu(), want) <= 2 * _max_err(_lowp_sparse(q, k, v, idx).cpu(), want) + 1e-6
        result[str(dtype).replace("torch.", "")] = ok
    return all(result.values()), result


def check_merge(backend, device, seed, sizes):
    gen = _seeded(seed)
    rows, head_dim = sizes
    out_a, out_b = (_randn(gen, rows, head_dim, device=device) for _ in range(2))
    lse_a, lse_b = (_randn(gen, rows, device=device) for _ in range(2))
    got = ops.merge_attention_states(out_a, lse_a, out_b, lse_b, backend=backend)
    want = reference.merge_attention_states(out_a.cpu(), lse_a.cpu(), out_b.cpu(), lse_b.cpu())
    ok = _max_err(got[0].cpu(), want[0]) <= 1e-5 and _max_err(got[1].cpu(), want[1]) <= 1e-5
    return ok, {"float32": ok}


def check_sink_window(backend, device, seed, sizes):
    gen = _seeded(seed)
    batch, kv_heads, group, q_len, kv_len, head_dim, sink, window = sizes
    q = _randn(gen, batch, kv_heads * group, q_len, head_dim, device=device)
    k = _randn(gen, batch, kv_heads, kv_len, head_dim, device=device)
    v = _randn(gen, batch, kv_heads, kv_len, head_dim, device=device)
    out, lse = ops.sink_window_attention_with_lse(q, k, v, sink, window, backend=backend)
    want, want_lse = reference.sink_window_attention_with_lse(q.cpu(), k.cpu(), v.cpu(), sink, window)
    ok = _max_err(out.cpu(), want) <= 4e-5 and _max_err(lse.cpu(), want_lse) <= 4e-5
    return ok, {"float32": ok}


def check_quest(backend, device, seed, sizes):
    gen = _seeded(seed)
    batch, kv_heads, group, seq, head_dim, page = sizes
    q = _randn(gen, batch, kv_heads * group, head_dim, device=device)
    k = _randn(gen, batch, kv_heads, seq, head_dim, device=device)
    page_min, page_max = reference.page_key_bounds(k, page)
    got = ops.quest_page_scores(q, page_min, page_max, backend=backend)
    want = reference.quest_page_scores(q.cpu(), page_min.cpu(), page_max.cpu())
    ok = _max_err(got.cpu(), want) <= 1e-5 * head_dim * max(1.0, float(want.abs().max()))
    return ok, {"float32": ok}


def check_ivf(backend, device, seed, sizes):
    gen = _seeded(seed)
    batch, kv_heads, group, n, head_dim, n_lists, nprobe, top_k = sizes
    result = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        keys = _randn(gen, batch, kv_heads, n, head_dim, dtype=dtype)
        assign = torch.randint(0, n_lists, (batch, kv_heads, n), generator=gen)
        centroids, q = _randn(gen, batch, kv_heads, n_lists, head_dim), _randn(gen, batch, kv_heads * group, head_dim)
        layout = ops.ivf_layout(keys, assign, n_lists)
        want = reference.ivf_topk_scores(q, centroids, *layout, nprobe, top_k)
        got = ops.ivf_topk_scores(q.to(device), centroids.to(device), *(t.to(device) for t in layout), nprobe, top_k,
                                  backend=backend)
        tol = 1e-5 * head_dim ** 0.5 * max(1.0, float(want[0][torch.isfinite(want[0])].abs().max()))
        result[str(dtype).replace("torch.", "")] = (_max_err(got[0].cpu(), want[0]) <= tol
                                                    and bool(torch.equal(got[1].cpu() == -1, want[1] == -1)))
    return all(result.values()), result


CHECKS = {  # op -> (check, sizes on a GPU, sizes of the dry run)
    "flat_topk_scores": (check_flat_topk, (2, 2, 7, 5000, 64, 300), (1, 2, 2, 300, 16, 20)),
    "gather_rows": (check_gather, (2, 2, 20000, 64, 2048), (1, 2, 300, 8, 20)),
    "ivf_topk_scores": (check_ivf, (1, 2, 7, 50000, 64, 256, 16, 100), (1, 2, 2, 300, 16, 8, 2, 10)),
    "sparse_attention_with_lse": (check_sparse_attention, (2, 2, 7, 20000, 64, 2048), (1, 2, 2, 300, 16, 40)),
    "merge_attention_states": (check_merge, (4096, 64), (64, 16)),
    "sink_window_attention_with_lse": (check_sink_window, (1, 2, 7, 256, 8192, 64, 4, 1024), (1, 2, 2, 8, 200, 16, 4, 64)),
    "quest_page_scores": (check_quest, (2, 2, 7, 20000, 64, 16), (1, 2, 2, 300, 16, 16)),
}


def correctness(device, seed: int, dry_run: bool) -> list[dict]:
    rows = []
    for op, (check, gpu_sizes, dry_sizes) in CHECKS.items():
        backends = [b for b in available_backends(op, device, explicit=False) if b != "reference"]
        backends = backends or (["reference"] if dry_run else [])
        for backend in backends:
            try:
                ok, detail = check(backend, device, seed, dry_sizes if dry_run else gpu_sizes)
                rows.append({"op": op, "backend": backend, "ok": bool(ok), "detail": detail, "seed": seed})
            except Exception as exc:  # a kernel that fails to compile or launch is a result too
                rows.append({"op": op, "backend": backend, "ok": False, "seed": seed,
                             "detail": {"error": f"{type(exc).__name__}: {exc}"[:400]},
                             "traceback": traceback.format_exc()[-2000:]})
    return rows


# ----------------------------------------------------------------------------------- speed
def speed(device, repeats: int, tokens: int, dry_run: bool) -> list[dict]:
    gen, rows = _seeded(1), []
    kv_heads, group, head_dim = (2, 7, 64) if not dry_run else (2, 2, 16)
    n = tokens
    half = torch.float16 if device.type == "cuda" else torch.float32
    q = _randn(gen, 1, kv_heads * group, head_dim, device=device)
    k = _randn(gen, 1, kv_heads, n, head_dim, dtype=half, device=device)
    v = _randn(gen, 1, kv_heads, n, head_dim, dtype=half, device=device)
    budget, sink, window = (2048, 4, 64) if not dry_run else (64, 4, 16)
    n_select = budget - sink - window
    q_sum = q.float().reshape(1, kv_heads, group, head_dim).sum(2)

    def row(name, backend, ms, baseline_ms, baseline):
        rows.append({"kernel": name, "backend": backend, "ms": ms, "baseline": baseline, "baseline_ms": baseline_ms,
                     "speedup": baseline_ms / ms if ms else None})

    # flat top-k over every key vs torch matmul + topk
    torch_topk = _median_ms(lambda: torch.topk((q_sum[:, :, None] @ k.float().transpose(-1, -2))[:, :, 0], n_select, -1),
                            repeats, device)
    for backend in [b for b in available_backends("flat_topk_scores", device, explicit=False) if b != "reference"]:
        ms = _median_ms(lambda b=backend: ops.flat_topk_scores(q_sum, k, n_select, backend=b), repeats, device)
        row(f"flat_topk {n} keys, top {n_select}", backend, ms, torch_topk, "torch matmul + topk")
    # gather of the selected rows from pinned host memory vs copying them with torch
    idx = torch.randint(0, n, (1, kv_heads, n_select), generator=gen).to(device)
    host = k.cpu().pin_memory() if device.type == "cuda" else k.cpu()
    torch_gather = _median_ms(lambda: torch.gather(host, 2, idx.cpu()[..., None].expand(-1, -1, -1, head_dim)).to(device),
                              repeats, device)
    for backend in [b for b in available_backends("gather_rows", device, explicit=False) if b != "reference"]:
        ms = _median_ms(lambda b=backend: ops.gather_rows(host, idx, backend=b), repeats, device)
        row(f"gather {n_select} rows from host", backend, ms, torch_gather, "torch gather on host + copy")
    # the decode step: sdpa over every key vs retrieval's path
    q4 = q.to(half)[:, :, None]
    sdpa = _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True), repeats, device)
    served = available_backends("flat_topk_scores", device, explicit=False)
    topk_backend = next((b for b in ("cuda", "triton") if b in served), "reference")

    def retrieval_step():
        idx = ops.flat_topk_scores(q_sum, k[:, :, sink:n - window], n_select, backend=topk_backend)[1] + sink
        part = ops.sparse_attention_with_lse(q.to(half), k, v, idx)
        keep = torch.cat([torch.arange(sink, device=device), torch.arange(n - window, n, device=device)])
        resident = ops.sparse_attention_with_lse(q.to(half), k, v, keep.expand(1, kv_heads, -1).contiguous())
        return ops.merge_attention_states(*resident, *part)

    ms = _median_ms(retrieval_step, repeats, device)
    out = retrieval_step()[0].float()
    want = torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0].float()
    rows.append({"kernel": f"decode step, {n} keys ({kv_heads * group}/{kv_heads} heads, d {head_dim}), budget {budget}",
                 "backend": topk_backend,
                 "ms": ms, "baseline": "sdpa", "baseline_ms": sdpa, "speedup": sdpa / ms,
                 "max_abs_err_vs_sdpa": float((out - want).abs().max())})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, reference backends, tiny sizes")
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --dry-run to check the script on a CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    tokens = 4096 if args.dry_run else args.tokens
    checks = correctness(device, seed, args.dry_run)
    table = Table([("op", "op", "s", 30), ("backend", "backend", "s", 8), ("ok", "ok", "s", 5)])
    for r in checks:
        table.row({**r, "ok": "yes" if r["ok"] else "NO"})
        if not r["ok"]:
            print(f"  {r['op']} {r['backend']}: {r['detail']}", flush=True)
    speeds = speed(device, 3 if args.dry_run else args.repeats, tokens, args.dry_run)
    table = Table([("kernel", "kernel", "s", 52), ("backend", "backend", "s", 8), ("ms", "ms", ".3f", 8),
                   ("baseline", "baseline", "s", 28), ("baseline_ms", "base ms", ".3f", 8), ("speedup", "x", ".2f", 6)])
    for r in speeds:
        table.row(r)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    payload = {"benchmark": "gpu_check", "machine": machine(), "gpu": info, "dry_run": args.dry_run, "seed": seed,
               "correctness": checks, "speed": speeds, "all_ok": all(r["ok"] for r in checks)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"
    (args.out / name).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{'all checks passed' if payload['all_ok'] else 'SOME CHECKS FAILED'}; wrote {args.out / name}")
    return payload


if __name__ == "__main__":
    main()
