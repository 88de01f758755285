"""Host memory of a long generation against :mod:`lckv.footprint`'s formula (CPU).

Each case runs in a fresh process: load the model, bind the policy, warm up (a short generation on
a throwaway cache, so thread pools and one-time buffers exist before the baseline), free it,
``malloc_trim`` and read the baseline RSS; prefill the prompt in chunks, read RSS, reset the
high-water mark (``/proc/self/clear_refs``), decode teacher-forced, read RSS and the high-water
mark; then the accounting, and the RSS left once the cache is freed. Reported per case:

* ``formula`` -- :func:`lckv.footprint.predicted_bytes` (``total``: the bytes the cache writes),
  ``acct`` -- :func:`lckv.footprint.cache_bytes` of the cache itself;
* ``RSS`` -- RSS growth over the baseline after decoding, against the formula's ``total``;
* ``HWM`` -- the decoding phase's high-water mark over the baseline, against the formula's
  ``peak_decode`` (the cache plus what a call's transaction holds: after a chunked prompt, the
  last chunk's resident K/V; in the call where the stores double, their old buffers);
* ``prompt`` -- the same two after the prompt (its high-water mark also holds the model's
  activations and the attention scratch of a chunk, which the formula leaves out);
* ``trimmed`` -- RSS growth after ``malloc_trim`` with the cache alive; ``left`` -- after freeing it.

``--allocator fixed`` (default) holds glibc's mmap threshold at its default 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), so freed buffers leave the RSS at once and it follows the live bytes;
``--allocator glibc`` leaves the threshold dynamic, as a default process runs: freed buffers of up
to 32 MiB (a grown store's old ones, the recorder's replaced samples, chunk temporaries) then stay
in the heap, and the RSS exceeds the live bytes by what the heap retains.

The reference is the formula; ``--check`` first verifies, on a short run of every policy with an
exact prefill, that the accounting equals the formula (exactly; the ClusterIndex within 5%, its
cluster padding being a mean). Prompts are real HotpotQA text.

``--prefill local`` (default) feeds the prompt through a variant of the policy whose chunks attend
only the sink and the window (StreamingLLM's pattern, its fused op): the cache it leaves -- store,
resident part, recorded queries, no selection state yet -- is the one an exact prefill leaves (the
cache never sees what attention read), at linear instead of quadratic cost; decoding then runs the
policy itself. ``--prefill exact`` runs the policy's own prefill.

    python benchmarks/bench_memory.py --check          # stories260K 64K + SmolLM2 4K, 7 policies (~40 min on 2 cores)
    python benchmarks/bench_memory.py --model stories260K --policies retrieval --allocator glibc
    python benchmarks/bench_memory.py --one '{"model": "stories260K", "policy": "full", "prompt": 8192}'

Writes benchmarks/results/bench_memory.{json,png} (rows of earlier runs of other cases are kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lckv, whatever is installed
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, Table, load_model, machine, write_json  # noqa: E402

import lckv  # noqa: E402
from lckv.footprint import COMPONENTS, ModelShape, cache_bytes, predicted_bytes  # noqa: E402
from lckv.integrations.hf import _band_mask  # noqa: E402
from lckv.memory import release_free_memory  # noqa: E402
from lckv.policies import StreamingPolicy, get_policy  # noqa: E402
from lckv.research.capture import hotpotqa_token_ids  # noqa: E402

MIB = 1 << 20
#: glibc's default initial mmap threshold; setting it turns off the dynamic raise (see measure_in_subprocess)
FIXED_MMAP_THRESHOLD = 128 * 1024
POLICIES = ("full", "streaming", "snapkv", "quest", "block", "retrieval", "retrolm")
#: (model, prompt, decode steps) of the default run
DEFAULT_RUNS = (("stories260K", 65536, 512), ("smollm2-135m-instruct", 4096, 64))
RESULT_TAG = "RESULT "


# --- one case, in this process ---------------------------------------------------------------------
def memory_status() -> dict:
    """``VmRSS`` and ``VmHWM`` of this process in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                out[name] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def trim() -> None:
    """Returns freed heap memory to the system (:func:`lckv.memory.release_free_memory`), so the
    baseline is not inflated by what the warm-up freed."""
    gc.collect()
    release_free_memory()


def local_prefill_variant(policy):
    """``policy`` as a :class:`~lckv.policies.StreamingPolicy` too: its prompt chunks take the fused
    sink + window attention of streaming policies, while its fields, window rule, store and recorded
    queries stay ``policy``'s (so does the cache it leaves)."""
    cls = type(policy)
    if isinstance(policy, StreamingPolicy):  # attends sink + window already
        return policy
    variant = dataclasses.dataclass(type(f"LocalPrefill{cls.__name__}", (cls, StreamingPolicy), {}))
    return variant(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if f.init})


def run(model, ids, policy, prompt_policy, prompt: int, steps: int, chunk: int):
    """Prefill ``ids[:, :prompt]`` in chunks under ``prompt_policy`` then decode ``steps`` tokens
    teacher-forced under ``policy``; returns the cache and the memory status after the prompt and
    after decoding (the high-water marks of each phase)."""
    lckv.enable(model, prompt_policy)
    cache = lckv.new_cache(model)
    with torch.no_grad():
        for lo in range(0, prompt, chunk):
            model(ids[:, lo:min(prompt, lo + chunk)], past_key_values=cache, use_cache=True, logits_to_keep=1)
        if prompt_policy is not policy:  # decode with the policy itself
            # the streaming fast path caches its band masks (up to 8 of chunk x (chunk + window)
            # bools); an exact prefill makes none, so they go with the variant
            _band_mask.cache_clear()
            lckv.enable(model, policy)
            cache.policy = policy
            for layer in cache.layers:
                layer.policy = policy
        after_prompt = memory_status()
        reset_peak()
        for i in range(steps):
            model(ids[:, prompt + i:prompt + i + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, after_prompt, memory_status()


def measure(case: dict) -> dict:
    """One case (``model``, ``policy``, ``settings``, ``prompt``, ``steps``, ``chunk``,
    ``prefill``, ``batch``): RSS and high-water marks over the baseline, the accounting and the
    formula, and ``residual``: the RSS growth left once the cache is freed (and the heap trimmed)."""
    model_name, prompt, steps = case["model"], case["prompt"], case.get("steps", 0)
    batch = case.get("batch", 1)
    chunk, prefill = case.get("chunk", 1024), case.get("prefill", "local")
    torch.manual_seed(0)
    model, tok = load_model(model_name, max_positions=prompt + steps + 1)
    policy = get_policy(case["policy"], **case.get("settings", {}))
    prompt_policy = local_prefill_variant(policy) if prefill == "local" else policy
    ids = torch.stack([hotpotqa_token_ids(tok, prompt + steps, seed=1 + b) for b in range(batch)])
    warm = min(prompt, chunk + 512)
    # warm-up: also attaches the policies' model parts (RetroLM's bookmarks) before the baseline
    cache, _, _ = run(model, ids, policy, prompt_policy, warm, min(steps, 8), chunk)
    lckv.disable(model)  # the binding remembers the last cache it served
    del cache
    trim()
    base = memory_status()["VmRSS"]
    start = time.perf_counter()
    cache, after_prompt, after_decode = run(model, ids, policy, prompt_policy, prompt, steps, chunk)
    seconds = time.perf_counter() - start
    dtype = next(model.parameters()).dtype
    acct = cache_bytes(cache)
    formula = predicted_bytes(model.config, policy, prompt + steps, batch, prompt=prompt, chunk=chunk, dtype=dtype)
    at_prompt = predicted_bytes(model.config, policy, prompt, batch, prompt=prompt, chunk=chunk, dtype=dtype)
    trim()
    trimmed = memory_status()["VmRSS"] - base
    lckv.disable(model)
    del cache
    trim()
    residual = memory_status()["VmRSS"] - base
    shape = dataclasses.asdict(ModelShape.from_config(model.config, dtype))
    return dict(case, shape=shape, seconds=seconds, baseline_rss=base,
                rss_prompt=after_prompt["VmRSS"] - base, hwm_prompt=after_prompt["VmHWM"] - base,
                rss=after_decode["VmRSS"] - base, hwm=after_decode["VmHWM"] - base, rss_trimmed=trimmed,
                residual=residual,
                formula_prompt=at_prompt["total"], formula_prompt_peak=at_prompt["peak"],
                formula=formula, acct=acct)


def with_formula(result: dict) -> dict:
    """``result`` with its formula fields computed again by the current :mod:`lckv.footprint`
    (from its ``shape`` and case; the measurements stay)."""
    shape = ModelShape(**result["shape"])
    policy = get_policy(result["policy"], **result.get("settings", {}))
    prompt, steps, chunk, batch = result["prompt"], result["steps"], result["chunk"], result.get("batch", 1)
    at_prompt = predicted_bytes(shape, policy, prompt, batch, prompt=prompt, chunk=chunk)
    return dict(result, formula=predicted_bytes(shape, policy, prompt + steps, batch, prompt=prompt, chunk=chunk),
                formula_prompt=at_prompt["total"], formula_prompt_peak=at_prompt["peak"])


def measure_in_subprocess(case: dict, timeout: float = 1800) -> dict:
    """:func:`measure` in a fresh Python process (its own allocator state and RSS); ``case
    ["allocator"]`` ``"fixed"`` holds glibc's mmap threshold at its default 128 KiB
    (``MALLOC_MMAP_THRESHOLD_``), ``"glibc"`` leaves it dynamic (the default)."""
    env = dict(os.environ)
    if case.get("allocator", "fixed") == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(FIXED_MMAP_THRESHOLD)
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


# --- check -----------------------------------------------------------------------------------------
def check(model_name: str) -> None:
    """Short runs of every policy (exact prefill, a 700-token prompt in chunks of 300, 10 decode
    steps): the accounting equals the formula, component by component (the ClusterIndex within
    5%, its cluster padding being a mean)."""
    model, tok = load_model(model_name, max_positions=1024)
    ids = hotpotqa_token_ids(tok, 710, seed=2)[None]
    dtype = next(model.parameters()).dtype
    for name in POLICIES:
        policy = get_policy(name)
        cache, _, _ = run(model, ids, policy, policy, 700, 10, 300)
        acct = cache_bytes(cache)
        formula = predicted_bytes(model.config, policy, 710, prompt=700, chunk=300, dtype=dtype)
        for key in [c + s for c in COMPONENTS for s in ("", "_allocated")]:
            tolerance = 0.05 * acct[key] if key.startswith("index") else 0
            if abs(formula[key] - acct[key]) > tolerance:
                raise SystemExit(f"--check: {model_name} {name} {key}: formula {formula[key]} != "
                                 f"accounting {acct[key]}")
    lckv.disable(model)
    print(f"--check: the accounting equals the formula for {len(POLICIES)} policies on {model_name}")


# --- report ----------------------------------------------------------------------------------------
def table_row(r: dict) -> dict:
    f, a, tokens = r["formula"], r["acct"], r["formula"]["tokens"]
    rates = f["per_token"]
    return dict(model=r["model"], policy=r["policy"], allocator=r.get("allocator", "fixed"), tokens=tokens,
                formula=f["total"] / MIB, acct=a["total"] / MIB, rss=r["rss"] / MIB, rss_ratio=r["rss"] / f["total"],
                peak=f["peak_decode"] / MIB, hwm=r["hwm"] / MIB, hwm_ratio=r["hwm"] / f["peak_decode"],
                prompt_rss_ratio=r["rss_prompt"] / r["formula_prompt"],
                prompt_hwm_ratio=r["hwm_prompt"] / r["formula_prompt_peak"],
                trimmed_ratio=r["rss_trimmed"] / f["total"], residual=r["residual"] / MIB,
                bytes_per_token=f["total"] / tokens, kv_per_token=rates["host_kv"], index_per_token=rates["index"],
                estimate_per_token=rates["estimate"], selection_per_token=rates["selection"],
                fixed=(f["resident"] + f["queries"] + f["log"]) / MIB, seconds=r["seconds"])


COLUMNS = [("model", "model", "s", 21), ("policy", "policy", "s", 9), ("allocator", "malloc", "s", 6),
           ("tokens", "tokens", "d", 6), ("formula", "formula MiB", ".1f", 0), ("acct", "acct MiB", ".1f", 0),
           ("rss", "RSS MiB", ".1f", 0), ("rss_ratio", "RSS/f", ".3f", 0), ("peak", "peak MiB", ".1f", 0),
           ("hwm", "HWM MiB", ".1f", 0), ("hwm_ratio", "HWM/peak", ".3f", 0),
           ("prompt_rss_ratio", "prompt RSS/f", ".3f", 0), ("prompt_hwm_ratio", "prompt HWM/peak", ".3f", 0),
           ("trimmed_ratio", "trimmed/f", ".3f", 0), ("residual", "left MiB", ".1f", 0),
           ("bytes_per_token", "B/token", ".0f", 0), ("kv_per_token", "KV B/tok", ".0f", 0),
           ("index_per_token", "index B/tok", ".0f", 0), ("estimate_per_token", "est B/tok", ".0f", 0),
           ("selection_per_token", "sel B/tok", ".1f", 0), ("fixed", "fixed MiB", ".1f", 0), ("seconds", "s", ".0f", 4)]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    labels = [f"{r['model'][:8]}\n{r['policy']}\n{r['allocator']}" for r in rows]
    bars = [("formula", "formula (written)"), ("rss", "RSS growth"), ("peak", "formula peak"), ("hwm", "HWM growth")]
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="MiB over the baseline", title="host memory of a long generation vs lckv.footprint (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _key(row: dict) -> tuple:
    return row["model"], row["policy"], row["allocator"], row["tokens"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help="run one case (JSON) in this process and print its result")
    parser.add_argument("--check", action="store_true", help="verify accounting == formula first")
    parser.add_argument("--model", help="one model (default: stories260K and SmolLM2-135M)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--prefill", choices=("local", "exact"), default="local")
    parser.add_argument("--allocator", choices=("fixed", "glibc"), default="fixed",
                        help="fixed: glibc's mmap threshold held at 128 KiB; glibc: its default dynamic threshold")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the results file")
    parser.add_argument("--reformula", action="store_true",
                        help="recompute the formula of the stored results (no measurement) and rewrite the report")
    args = parser.parse_args(argv)
    if args.one:
        print(RESULT_TAG + json.dumps(measure(json.loads(args.one))), flush=True)
        return
    runs = DEFAULT_RUNS if args.model is None else [
        next(((m, p, s) for m, p, s in DEFAULT_RUNS if m.lower() == args.model.lower()), (args.model, 8192, 128))]
    if args.check:
        for model_name, _, _ in runs:
            check(model_name)
    path = RESULTS / "bench_memory.json"
    earlier = [] if args.fresh or not path.exists() else json.loads(path.read_text())["results"]
    table = Table(COLUMNS)
    results = []
    if args.reformula:
        earlier = [with_formula(r) if "shape" in r else r for r in earlier]
        runs = []
        for r in earlier:
            table.row(table_row(r))
    for model_name, prompt, steps in runs:
        for name in args.policies:
            case = dict(model=model_name, policy=name, prompt=args.prompt or prompt,
                        steps=steps if args.steps is None else args.steps, chunk=args.chunk, prefill=args.prefill,
                        allocator=args.allocator)
            results.append(measure_in_subprocess(case))
            table.row(table_row(results[-1]))
    # rows of other cases measured earlier stay (one case per model, policy, allocator and length)
    replaced = {_key(table_row(r)) for r in results}
    results = [r for r in earlier if _key(table_row(r)) not in replaced] + results
    order = {name: i for i, name in enumerate(POLICIES)}
    results.sort(key=lambda r: (r["model"] != "stories260K", r["model"], r.get("allocator", "fixed") != "fixed",
                                order.get(r["policy"], len(order)), r["prompt"] + r["steps"]))
    rows = [table_row(r) for r in results]
    write_json("bench_memory", {"machine": machine(), "rows": rows, "results": results})
    plot(rows, RESULTS / "bench_memory.png")
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
