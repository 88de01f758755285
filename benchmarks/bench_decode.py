"""Per-token decode latency and memory of every policy on long caches of a real model (default
Qwen2.5-Coder-0.5B-Instruct, CPU), with transformers' sdpa and the no-attention floor in the same run.

Reported twice, in one run:

* attention only: for each layer, the policy's decode attention (for ``retrieval``: index search +
  sparse attention over the retrieved rows + the estimate of the rest + attention over sink/window
  + merges, one fused C++ call per layer) vs exact attention over the same cache, summed over
  layers, per decoded token;
* the whole decode step (a one-token model forward with the cache) vs the floor: the same forward
  with attention replaced by a no-op, and vs transformers' sdpa with a ``DynamicCache`` holding the
  same keys and values.

How the caches are filled: an exact prefill of a 32K-token prompt takes ~25 minutes for this model
on 2 cores and 128K is out of reach, so ``--fill`` tokens of real HotpotQA text (default 8K) are
prefilled with a chunked pass whose chunks attend the sink + a local window (linear cost), and
their keys and values are tiled along the sequence to each measured length. Timing and memory
depend on the sizes, not on the text; fidelity is measured by ``bench_fidelity.py`` on exact
prefills. With ``--fill`` >= the length nothing is tiled.

    python benchmarks/bench_decode.py                                # Qwen, 8K / 32K / 128K
    python benchmarks/bench_decode.py --model stories260K --lengths 32768 131072 1048576 --fill 1048576
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
from common import RESULTS, Table, load_model, machine, progress, write_json  # noqa: E402

import lckv  # noqa: E402
from lckv.attention import attend_segments, attend_with_selection  # noqa: E402
from lckv.cache import LckvCache, QueryRecorder  # noqa: E402
from lckv.research.capture import hotpotqa_token_ids  # noqa: E402
from lckv.policies import FullPolicy, SelectionPolicy, StreamingPolicy, get_policy  # noqa: E402


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
        layer.queries = QueryRecorder(build_queries, 64)  # a sample for index builds, the last 64 for SnapKV
    with torch.no_grad():
        for lo in progress(range(0, ids.shape[1], chunk), "fill"):
            model.model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True)
    return cache


def tiled_cache(source: LckvCache, length: int, sink: int) -> LckvCache:
    """A `full` cache of ``length`` tokens whose keys/values repeat the source's along the
    sequence (sink: the source's first tokens; recorded prefill queries carried over)."""
    policy = FullPolicy(sink=sink, window=64)
    out = LckvCache(policy, len(source.layers))
    for src, dst in zip(source.layers, out.layers):
        keys, values = src.kept_keys_values()
        reps = -(-length // keys.shape[2])
        keys, values = keys.repeat(1, 1, reps, 1)[:, :, :length], values.repeat(1, 1, reps, 1)[:, :, :length]
        dst.lazy_initialization(keys, values)
        n_recent = policy.window - 1
        dst.sink_k, dst.sink_v = keys[:, :, :sink].clone(), values[:, :, :sink].clone()
        dst.recent_k, dst.recent_v = keys[:, :, length - n_recent:].clone(), values[:, :, length - n_recent:].clone()
        dst.keys, dst.values = dst.recent_k, dst.recent_v
        dst.store.append(keys[:, :, sink:length - n_recent], values[:, :, sink:length - n_recent])
        dst.total = length
        dst.queries = src.queries
    return out


def sdpa_step(model, source: LckvCache, token, steps) -> float:
    """Median one-token forward of transformers' sdpa over a DynamicCache with the same K/V."""
    from transformers import DynamicCache

    lckv.disable(model)
    times = []
    for _ in range(steps):  # a fresh cache each step: sdpa's cache grows by one token per call
        cache = DynamicCache()
        for i, layer in enumerate(source.layers):
            cache.update(*layer.kept_keys_values(), i)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
        del cache
    return sorted(times)[len(times) // 2]


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
    scale = model.model.layers[0].self_attn.scaling
    attn = 0.0
    with torch.no_grad():
        for i, layer in enumerate(cache.layers):
            q = queries[i]
            if isinstance(policy, SelectionPolicy):
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


COLUMNS = [("tokens", "cached", "d", 8), ("policy", "policy", "s", 10), ("attention_ms", "attn ms/tok", ".2f", 0),
           ("attention_speedup", "attn x exact", ".1f", 0), ("step_ms", "step ms/tok", ".1f", 0),
           ("step_over_floor", "step / floor", ".3f", 0), ("sdpa_over_step", "sdpa / step", ".2f", 0),
           ("first_step_s", "1st step s", ".1f", 0), ("resident_mib", "resident MiB", ".2f", 0),
           ("host_mib", "host MiB", ".1f", 0), ("index_mib", "index MiB", ".1f", 0)]


def make_policies(budget, sink, window):
    """Every policy at its defaults with one budget (streaming: sink + budget - sink as window)."""
    settings = dict(budget=budget)
    total = budget if isinstance(budget, int) else None
    policies = {"full": FullPolicy(sink=sink, window=window)}
    policies["streaming"] = StreamingPolicy(sink=sink, window=(total or 2048) - sink)
    for name in ("snapkv", "quest", "block", "retrieval"):
        policies[name] = get_policy(name, **settings)
    return policies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a lckv.models name or stories260K")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--fill", type=int, default=8192, help="tokens really prefilled (the rest is tiled)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--prefill-window", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--budget", default="2048", help="keys per query head: a count, or a fraction like 0.05")
    parser.add_argument("--policies", nargs="+", default=None, help="subset of the policies (default: all)")
    parser.add_argument("--build-queries", type=int, default=4096)
    parser.add_argument("--name", default=None, help="result file name (default: bench_decode_<model>)")
    args = parser.parse_args(argv)
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    name = args.name or f"bench_decode_{args.model.split('-')[0].lower()}"

    model, tok = load_model(args.model, max(args.lengths) + 16)
    torch.set_grad_enabled(False)
    token = torch.tensor([[tok.encode(" the", add_special_tokens=False)[0]]])
    floor = floor_step(model, token, args.repeats * 4)
    print(f"# {args.model}: floor (one-token forward, attention replaced by a no-op): {floor * 1e3:.2f} ms; "
          f"budget {budget} keys per query head; {torch.get_num_threads()} threads", flush=True)
    t0 = time.perf_counter()
    fill = min(args.fill, max(args.lengths))
    ids = hotpotqa_token_ids(tok, fill, seed=1)[None]
    filled = fill_cache(model, ids, args.sink, args.prefill_window, args.chunk, args.build_queries)
    print(f"# {fill} tokens prefilled (sink {args.sink} + local window {args.prefill_window}, chunk {args.chunk}) "
          f"in {time.perf_counter() - t0:.0f} s; longer caches tile them", flush=True)
    rows, table = [], Table(COLUMNS)
    for length in args.lengths:
        prefill = filled if length == fill else tiled_cache(filled, length, args.sink)
        sdpa = sdpa_step(model, prefill, token, args.steps)
        table.row(dict(tokens=length, policy="sdpa", step_ms=sdpa * 1e3, step_over_floor=sdpa / floor, sdpa_over_step=1.0))
        rows.append(dict(tokens=length, policy="sdpa", step_ms=sdpa * 1e3, step_over_floor=sdpa / floor, floor_ms=floor * 1e3))
        policies = make_policies(budget, args.sink, args.window)
        exact = None
        for pname, policy in policies.items():
            if args.policies and pname not in args.policies and pname != "full":
                continue
            m = measure(model, policy, prefill, token, args.steps, args.repeats)
            exact = exact or m
            row = dict(tokens=length, policy=pname, attention_ms=m["attention_s"] * 1e3,
                       attention_speedup=exact["attention_s"] / m["attention_s"], step_ms=m["step_s"] * 1e3,
                       step_over_floor=m["step_s"] / floor, sdpa_over_step=sdpa / m["step_s"],
                       first_step_s=m["first_step_s"], resident_mib=m["resident_bytes"] / 2**20,
                       host_mib=m["offloaded_bytes"] / 2**20, index_mib=m["index_bytes"] / 2**20, floor_ms=floor * 1e3,
                       budget=budget, policy_repr=repr(policy))
            rows.append(row)
            table.row(row)
            gc.collect()
        del prefill
        gc.collect()
    payload = {"benchmark": "decode", "machine": machine(), "model": args.model,
               "prefill": (f"{fill} tokens of HotpotQA text, chunked sink {args.sink} + local window "
                           f"{args.prefill_window} (not exact); K/V tiled to each length"),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    write_json(name, payload)
    plot(rows, RESULTS / f"{name}.png", args.model)
    print(f"wrote {RESULTS / (name + '.json')} and .png; peak RSS {payload['peak_rss_mib']:.0f} MiB")


def plot(rows, path, model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["policy"] for r in rows):
        sel = [r for r in rows if r["policy"] == name]
        if sel[0].get("attention_ms") is not None:
            axes[0].plot([r["tokens"] for r in sel], [r["attention_ms"] for r in sel], marker="o", label=name)
        axes[1].plot([r["tokens"] for r in sel], [r["step_ms"] for r in sel], marker="o", label=name)
    axes[1].axhline(rows[0]["floor_ms"], color="gray", ls="--", label="no-attention floor")
    for ax, title in zip(axes, ["attention only (all layers)", "whole decode step"]):
        ax.set(xscale="log", yscale="log", xlabel="cached tokens", ylabel="ms per token", title=title)
        ax.legend()
    fig.suptitle(f"{model} decode on CPU: every policy vs full and sdpa")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
