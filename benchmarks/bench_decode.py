"""Per-token decode latency and memory of `retrieval` vs `full` on long caches (stories260K, CPU).

Reported twice, in one run:

* attention only: for each layer, the retrieval path (index search + sparse attention over the
  retrieved rows + the estimate of the rest + attention over sink/window + merges) vs. exact
  attention over the same cache, summed over layers, per decoded token;
* the whole decode step (model forward of one token with the cache), vs. the floor the framework
  sets: the same forward with attention replaced by a no-op (``--floor``).

Exact causal prefill of 1M tokens is out of reach on 2 cores, so caches are filled with a chunked
prefill whose chunks attend the sink + a local window only (linear cost); the text is real
HotpotQA context, repeated in shuffled passes to reach the length.

    python benchmarks/bench_decode.py                      # 32K, 128K, 1M tokens; cluster and graph indexes
    python benchmarks/bench_decode.py --lengths 32768 --steps 4
    python benchmarks/bench_decode.py --lengths 1048576 --indexes cluster   # the graph build is slow at 1M
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Table, machine, write_json  # noqa: E402

import lckv  # noqa: E402
from lckv.attention import attend_segments, attend_with_selection  # noqa: E402
from lckv.cache import LckvCache, QueryRecorder  # noqa: E402
from lckv.capture import hotpotqa_token_ids  # noqa: E402
from lckv.data import stories260k_paths  # noqa: E402
from lckv.models.llama2c import load  # noqa: E402
from lckv.policies import FullPolicy, RetrievalPolicy, StreamingPolicy  # noqa: E402


@dataclass
class LocalPrefill(StreamingPolicy):
    """Sink + local-window attention that keeps (offloads) every token: fills long caches."""

    name: ClassVar[str] = "local-prefill"
    keeps_offloaded: ClassVar[bool] = True


def fill_cache(model, ids, sink, window, chunk, build_queries):
    """Prefill; records a uniform sample of prefill queries, which the retrieval index is built from."""
    binding = lckv.enable(model, LocalPrefill(sink=sink, window=window))
    cache = binding.new_cache()
    for layer in cache.layers:
        layer.queries = QueryRecorder(build_queries, 0)
    with torch.no_grad():
        for lo in range(0, ids.shape[1], chunk):
            model.model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True)
    return cache


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(model, policy, prefill_cache, token, steps, repeats):
    """Whole-step and attention-only latency (s/token) of `policy` on a copy of the cache."""
    binding = lckv.enable(model, policy)
    cache = LckvCache.from_cache(prefill_cache, policy)
    queries = {}
    binding.observers.append(lambda m, q, k, v: queries.__setitem__(m.layer_idx, q))
    with torch.no_grad():
        t0 = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True)  # first step: builds the indexes (retrieval)
        first = time.perf_counter() - t0
        step_times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(token, past_key_values=cache, use_cache=True)
            step_times.append(time.perf_counter() - t0)
    binding.observers.clear()
    scale = model.config.head_dim ** -0.5
    attn = 0.0
    with torch.no_grad():
        for i, layer in enumerate(cache.layers):
            q = queries[i]
            if isinstance(policy, RetrievalPolicy):
                fn = lambda: attend_with_selection(q, layer, None, policy, scale)  # noqa: E731
            else:
                fn = lambda: attend_segments(q, layer.segments(), layer.total - 1, None, policy, scale)  # noqa: E731
            attn += _median_time(fn, repeats)
    report = cache.memory_report()
    index_bytes = 0
    for layer in cache.layers:
        state = layer.selection
        if state is not None and getattr(state, "indexes", None):
            index_bytes += sum(h.memory_bytes() for ix in state.indexes if ix is not None for h in ix.heads)
    step = sorted(step_times)[len(step_times) // 2]
    return dict(step_s=step, attention_s=attn, first_step_s=first, resident_bytes=report["resident_bytes"],
                offloaded_bytes=report["offloaded_bytes"], index_bytes=index_bytes)


def floor_step(model, token, repeats):
    """A one-token forward with attention replaced by a no-op and no cache: the framework floor."""
    from transformers import AttentionInterface

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    AttentionInterface.register("lckv_none", no_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("lckv_none")
    try:
        with torch.no_grad():
            model(token, use_cache=False)
            return _median_time(lambda: model(token, use_cache=False), repeats)
    finally:
        model.set_attn_implementation(previous)


COLUMNS = [("tokens", "cached", "d", 8), ("policy", "policy", "s", 9), ("attention_ms", "attn ms/tok", ".2f", 0),
           ("attention_speedup", "attn x exact", ".1f", 0), ("step_ms", "step ms/tok", ".2f", 0),
           ("step_over_floor", "step / floor", ".2f", 0), ("first_step_s", "1st step s", ".1f", 0),
           ("resident_mib", "resident MiB", ".2f", 0), ("host_mib", "host MiB", ".1f", 0), ("index_mib", "index MiB", ".1f", 0)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--prefill-window", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=2048, help="retrieved keys per kv head per step")
    parser.add_argument("--indexes", nargs="+", default=["cluster", "graph"],
                        help="index kinds of the retrieval policies measured (one row each)")
    parser.add_argument("--group-ranks", nargs="+", default=["probability", "logits"], choices=["probability", "logits"],
                        help="RetrievalPolicy.group_rank values measured per index (logits rows are named <index>-logits)")
    parser.add_argument("--build-queries", type=int, default=4096)
    parser.add_argument("--name", default="bench_decode")
    args = parser.parse_args(argv)

    ckpt, tok_path = stories260k_paths()
    model, tok = load(ckpt, tok_path, max_position_embeddings=max(args.lengths) + 16)
    torch.set_grad_enabled(False)
    token = torch.tensor([[tok.encode("the", add_special_tokens=False)[0]]])
    floor = floor_step(model, token, args.repeats * 4)
    print(f"# floor (one-token forward, attention replaced by a no-op): {floor * 1e3:.2f} ms", flush=True)
    rows, table = [], None
    for length in args.lengths:
        t0 = time.perf_counter()
        ids = hotpotqa_token_ids(tok, length, seed=1)[None]
        prefill = fill_cache(model, ids, args.sink, args.prefill_window, args.chunk, args.build_queries)
        print(f"# {length} tokens cached by a sink+local-window prefill (sink={args.sink}, window={args.prefill_window}, "
              f"chunk={args.chunk}) in {time.perf_counter() - t0:.0f} s", flush=True)
        table = table or Table(COLUMNS)
        policies = {"full": FullPolicy(sink=args.sink, window=args.window)}
        for kind in args.indexes:
            for rank in args.group_ranks:
                policies[f"retrieval-{kind}" + ("-logits" if rank == "logits" else "")] = RetrievalPolicy(
                    sink=args.sink, window=args.window, budget=args.sink + args.window + args.topk, index=kind,
                    build_queries=args.build_queries, group_rank=rank)
        exact = None
        for name, policy in policies.items():
            m = measure(model, policy, prefill, token, args.steps, args.repeats)
            exact = exact or m
            row = dict(tokens=length, policy=name, attention_ms=m["attention_s"] * 1e3,
                       attention_speedup=exact["attention_s"] / m["attention_s"], step_ms=m["step_s"] * 1e3,
                       step_over_floor=m["step_s"] / floor, first_step_s=m["first_step_s"],
                       resident_mib=m["resident_bytes"] / 2**20, host_mib=m["offloaded_bytes"] / 2**20,
                       index_mib=m["index_bytes"] / 2**20, floor_ms=floor * 1e3, topk=args.topk,
                       index=getattr(policy, "index", None), group_rank=getattr(policy, "group_rank", None))
            rows.append(row)
            table.row(row)
            gc.collect()
        del prefill
        gc.collect()
    payload = {"benchmark": "decode", "machine": machine(), "model": "stories260K (llama2.c)",
               "prefill": f"chunked, sink {args.sink} + local window {args.prefill_window} (not exact)",
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    write_json(args.name, payload)
    plot(rows, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / (args.name + '.json')} and .png; peak RSS {payload['peak_rss_mib']:.0f} MiB")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["policy"] for r in rows):
        sel = [r for r in rows if r["policy"] == name]
        axes[0].plot([r["tokens"] for r in sel], [r["attention_ms"] for r in sel], marker="o", label=name)
        axes[1].plot([r["tokens"] for r in sel], [r["step_ms"] for r in sel], marker="o", label=name)
    axes[1].axhline(rows[0]["floor_ms"], color="gray", ls="--", label="no-attention floor")
    for ax, title in zip(axes, ["attention only (all layers)", "whole decode step"]):
        ax.set(xscale="log", yscale="log", xlabel="cached tokens", ylabel="ms per token", title=title)
        ax.legend()
    fig.suptitle("stories260K decode on CPU: retrieval vs full")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
