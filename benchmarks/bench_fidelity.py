"""Fidelity of every selection policy against exact attention, on a real model (default
Qwen2.5-Coder-0.5B-Instruct, head_dim 64, GQA 7:1) with real HotpotQA text, at equal budgets.

For each context length the prompt is prefilled once, exactly (policy ``full``), and the exact
model then decodes ``--steps`` tokens greedily (the reference). Every policy x budget is measured
two ways from that same prefill:

* attention level: fed the reference run's queries, keys and values at every decode step (the
  exact history), each layer's policy attention is compared with exact attention over all keys:
  relative output error, recall of the exact top-k keys (k = the budget, per query head), and the
  exact attention mass on the keys the policy attended (mean over steps, layers, heads; the JSON
  also keeps recall and mass per layer and query head, mean over steps);
* end to end: the policy's own model, teacher-forced on the reference tokens: mean next-token
  KL(full || policy) and greedy agreement (argmax equals the reference token).

Budgets count every attended key per query head: sink + window + selected. Every policy runs
with its default settings (sink 4, window 64, the budget rule of ``lckv.policies.selection``):
``retrieval`` is the default (segment-clustered index, centroid estimate of the rest);
``retrieval-graph`` swaps in the attention-aware graph index (ef 128); ``streaming`` keeps
sink 4 + the last ``budget - 4`` tokens.

Per-row results stream to ``results/<name>.jsonl``: an interrupted run resumes where it stopped
(rows already there are skipped; a length with rows left is prefilled again), and runs at other
lengths add to the same JSON.

    python benchmarks/bench_fidelity.py                                   # Qwen, 4K and 8K
    python benchmarks/bench_fidelity.py --lengths 32768 --budgets 2% 5%   # the 32K targets
    python benchmarks/bench_fidelity.py --model smollm2-135m-instruct --lengths 4096 8192
    python benchmarks/bench_fidelity.py --model stories260K --quick
    python benchmarks/bench_fidelity.py --check    # harness check: budget >= context must be exact
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Table, load_model, machine, progress, write_json  # noqa: E402

import lckv  # noqa: E402
from lckv.attention import attend_segments, attend_with_selection  # noqa: E402
from lckv.cache import LckvCache, QueryRecorder  # noqa: E402
from lckv.research.capture import hotpotqa_token_ids  # noqa: E402
from lckv.policies import FullPolicy, SelectionPolicy, get_policy  # noqa: E402

POLICIES = {
    "streaming": ("streaming", {}),
    "snapkv": ("snapkv", {}),
    "quest": ("quest", {}),
    "block": ("block", {}),
    "retrieval": ("retrieval", {}),
    "retrieval-graph": ("retrieval", {"index": "graph", "search_params": {"ef": 128}}),
}
SINK, REF_WINDOW = 4, 64
RECORD = (4096, 64)  # prefill queries kept for index building (sample) and observation windows (recent)


def budget_tokens(label: str, length: int) -> int:
    return math.ceil(float(label[:-1]) / 100 * length) if label.endswith("%") else int(label)


def make_policy(kind: str, budget: int):
    """The policy at its defaults with this budget (streaming: sink + the rest as window)."""
    name, settings = POLICIES[kind]
    if name == "streaming":
        sink = min(SINK, max(0, budget - 1))
        return get_policy(name, sink=sink, window=budget - sink)
    return get_policy(name, budget=budget, **settings)


def prefill(model, ids: torch.Tensor, chunk: int) -> tuple[LckvCache, torch.Tensor]:
    """Exact chunked prefill into a `full` cache that records prefill queries."""
    binding = lckv.enable(model, FullPolicy(sink=SINK, window=REF_WINDOW))
    cache = binding.new_cache()
    for layer in cache.layers:
        layer.queries = QueryRecorder(*RECORD)
    with torch.no_grad():
        for lo in range(0, ids.shape[1], chunk):
            logits = model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True).logits
    return cache, logits[:, -1]


def reference_decode(model, prefill_cache, first_logits, steps):
    """Greedy exact decoding; returns tokens fed [steps], logits after each [steps, V], and the
    per-step, per-layer (query, key, value) of the new token."""
    policy = FullPolicy(sink=SINK, window=REF_WINDOW)
    binding = lckv.enable(model, policy)
    cache = LckvCache.from_cache(prefill_cache, policy)
    trace = [dict() for _ in range(steps)]
    step = [0]
    binding.observers.append(lambda m, q, k, v: trace[step[0]].__setitem__(m.layer_idx, (q, k, v)))
    tokens, logits = [], []
    token = first_logits.argmax(-1, keepdim=True)
    with torch.no_grad():
        for t in range(steps):
            step[0] = t
            tokens.append(token)
            out = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            logits.append(out)
            token = out.argmax(-1, keepdim=True)
    binding.observers.clear()
    return torch.cat(tokens, 1), torch.cat(logits, 0), trace, cache


def attention_metrics(policy, prefill_cache, ref_cache, trace, prompt_len, budget, scale):
    """Policy attention vs exact attention on the exact history (see the module docstring)."""
    probe = LckvCache.from_cache(prefill_cache, policy)
    kept = [layer.kept_keys_values() for layer in ref_cache.layers]
    all_keys = [k[0].float() for k, _ in kept]
    all_values = [v[0].float() for _, v in kept]
    errs, recalls, masses = [], [], []
    per_layer = {}  # layer -> ([recall per query head], [mass per query head]) over steps
    for t, layers in enumerate(trace):
        pos = prompt_len + t
        for i, (q, k, v) in sorted(layers.items()):
            layer = probe.layers[i]
            layer.update(k, v)
            if isinstance(policy, SelectionPolicy) and layer.store is not None and layer.store.length:
                out, _, rows = attend_with_selection(q, layer, None, policy, scale, return_indices=True)
            else:
                out, _ = attend_segments(q, layer.segments(), layer.total - 1, None, policy, scale)
                rows = None
            layer.record_queries(q)
            # exact attention of this query over positions [0, pos]
            keys, values = all_keys[i][:, :pos + 1], all_values[i][:, :pos + 1]
            group = q.shape[1] // keys.shape[0]
            qh = q[0, :, 0].float().reshape(keys.shape[0], group, -1)
            probs = torch.softmax((qh @ keys.transpose(-1, -2)) * scale, dim=-1)  # [Hkv, G, pos + 1]
            exact = (probs @ values).reshape(1, -1, 1, values.shape[-1])
            probs = probs.reshape(q.shape[1], pos + 1)
            errs.append(((out.float() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp(min=1e-12)).flatten())
            attended = torch.zeros(keys.shape[0], pos + 1, dtype=torch.bool)
            n_sink, n_recent = layer.sink_k.shape[2], layer.recent_k.shape[2]
            attended[:, :n_sink] = True
            attended[:, pos + 1 - n_recent:] = True
            if layer.store is not None:
                if rows is not None:
                    # count hits: a -1 slot (clamped to row 0) must not un-mark a selected row 0
                    hits = torch.zeros(attended.shape, dtype=torch.long)
                    hits.scatter_add_(1, rows[0].clamp(min=0) + n_sink, (rows[0] >= 0).long())
                    attended |= hits > 0
                elif isinstance(policy, SelectionPolicy) and (
                        policy.budget_tokens(layer.total) - n_sink - n_recent >= layer.store.length):
                    attended[:, n_sink:n_sink + layer.store.length] = True
            att = attended.repeat_interleave(group, 0)
            masses.append((probs * att).sum(-1))
            top = probs.topk(min(budget, pos + 1), dim=-1).indices
            recalls.append(torch.gather(att, 1, top).float().mean(-1))
            per_layer.setdefault(i, ([], []))
            per_layer[i][0].append(recalls[-1])
            per_layer[i][1].append(masses[-1])
    by_layer = {i: (torch.stack(r).mean(0).tolist(), torch.stack(m).mean(0).tolist()) for i, (r, m) in sorted(per_layer.items())}
    return (torch.cat(errs).mean().item(), torch.cat(recalls).mean().item(), torch.cat(masses).mean().item(), by_layer)


def end_to_end(model, policy, prefill_cache, ref_tokens, ref_logits):
    """Teacher-forced decoding under `policy`: mean KL(full || policy) and greedy agreement."""
    lckv.enable(model, policy)
    cache = LckvCache.from_cache(prefill_cache, policy)
    kls, agree = [], []
    with torch.no_grad():
        for t in range(ref_tokens.shape[1]):
            out = model(ref_tokens[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            p_ref = torch.log_softmax(ref_logits[t:t + 1].double(), -1)
            p_pol = torch.log_softmax(out.double(), -1)
            kls.append(float((p_ref.exp() * (p_ref - p_pol)).sum()))
            agree.append(bool(out.argmax(-1) == ref_logits[t:t + 1].argmax(-1)))
    return sum(kls) / len(kls), sum(agree) / len(agree)


def _done_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: measured again
            break
    return rows


def run(args) -> list[dict]:
    model, tok = load_model(args.model, max(args.lengths) + args.steps + 1)
    scale = model.model.layers[0].self_attn.scaling
    stream = RESULTS / f"{args.name}.jsonl"
    rows = [] if args.fresh else _done_rows(stream)  # every length's rows go to the JSON
    done = {(r["length"], r["budget"], r["policy"]) for r in rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = Table(COLUMNS)
    for row in rows:
        if row["length"] in args.lengths:
            table.row(row)
    with stream.open("w" if args.fresh else "a") as sink:
        for length in args.lengths:
            todo = [(label, kind) for label in args.budgets for kind in args.policies if (length, label, kind) not in done]
            if not todo:
                continue
            ids = hotpotqa_token_ids(tok, length, seed=length)[None]
            start = time.perf_counter()
            prefill_cache, first_logits = prefill(model, ids, args.chunk)
            ref_tokens, ref_logits, trace, ref_cache = reference_decode(model, prefill_cache, first_logits, args.steps)
            print(f"# {length} tokens: exact prefill + {args.steps}-step reference decode in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            for label, kind in progress(todo, f"{length} tokens"):
                budget = budget_tokens(label, length)
                policy = make_policy(kind, budget)
                t0 = time.perf_counter()
                err, recall, mass, by_layer = attention_metrics(policy, prefill_cache, ref_cache, trace, length, budget,
                                                                scale)
                kl, agree = end_to_end(model, policy, prefill_cache, ref_tokens, ref_logits)
                n_sink, n_window, n_selected = (policy.split_budget(length) if isinstance(policy, SelectionPolicy)
                                                else (policy.sink, policy.window, 0))
                row = dict(length=length, budget=label, budget_tokens=budget, policy=kind, sink=n_sink,
                           window=n_window, selected=n_selected, attn_rel_err=err, recall=recall, mass=mass, kl=kl,
                           greedy_agreement=agree, seconds=time.perf_counter() - t0,
                           # per layer, per query head: top-k recall and attention mass (mean over steps)
                           recall_by_layer_head=[by_layer[i][0] for i in sorted(by_layer)],
                           mass_by_layer_head=[by_layer[i][1] for i in sorted(by_layer)])
                rows.append(row)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                table.row(row)
            del prefill_cache, ref_cache, trace
    return rows


COLUMNS = [("length", "tokens", "d", 6), ("budget", "budget", "s", 6), ("budget_tokens", "keys", "d", 5),
           ("policy", "policy", "s", 15), ("window", "win", "d", 4), ("selected", "sel", "d", 5), ("attn_rel_err", "attn rel err", ".4f", 0), ("recall", "top-k recall", ".3f", 0),
           ("mass", "mass", ".3f", 5), ("kl", "KL", ".5f", 8), ("greedy_agreement", "greedy agree", ".3f", 0),
           ("seconds", "s", ".1f", 6)]


def check(args) -> None:
    """Budget >= context must reproduce exact attention: zero error, full mass, KL ~ 0."""
    args.lengths, args.steps, args.fresh = [300], 4, True
    args.budgets = ["400"]
    args.name = f"{args.name}_check"
    rows = run(args)
    (RESULTS / f"{args.name}.jsonl").unlink()
    for row in rows:
        ok = row["attn_rel_err"] < 1e-4 and row["mass"] > 0.9999 and row["kl"] < 1e-6 and row["greedy_agreement"] == 1.0
        if not ok:
            raise SystemExit(f"--check failed: {row}")
    print(f"--check: {len(rows)} policies reproduce exact attention at budget >= context")


def plot(rows, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 8), squeeze=False)
    for col, length in enumerate(lengths):
        for kind in policies:
            sel = sorted((r for r in rows if r["length"] == length and r["policy"] == kind), key=lambda r: r["budget_tokens"])
            x = [r["budget_tokens"] / length * 100 for r in sel]
            axes[0][col].plot(x, [max(r["kl"], 1e-6) for r in sel], marker="o", label=kind)
            axes[1][col].plot(x, [r["greedy_agreement"] for r in sel], marker="o", label=kind)
        axes[0][col].set(title=f"{length} tokens", xscale="log", yscale="log", xlabel="budget (% of context)",
                         ylabel="next-token KL vs full")
        axes[1][col].set(xscale="log", xlabel="budget (% of context)", ylabel="greedy agreement", ylim=(0, 1.02))
        axes[0][col].axhline(0.01, color="gray", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{model} on HotpotQA text: fidelity of each policy at equal budgets (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                        help="a lckv.models registry name or stories260K")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--budgets", nargs="+", default=["1%", "2%", "5%", "10%", "256", "1024"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="2K tokens, budgets 5%% and 256, 16 steps")
    parser.add_argument("--fresh", action="store_true", help="ignore rows of an earlier run instead of resuming")
    parser.add_argument("--check", action="store_true", help="verify the harness (budget >= context is exact) and exit")
    parser.add_argument("--name", default=None, help="result file name (default: bench_fidelity_<model>)")
    args = parser.parse_args(argv)
    args.name = args.name or f"bench_fidelity_{args.model.split('-')[0].lower()}"
    if args.check:
        return check(args)
    if args.quick:
        args.lengths, args.budgets, args.steps = [2048], ["5%", "256"], 16
    rows = run(args)
    payload = {"benchmark": "fidelity", "machine": machine(), "model": args.model,
               "text": "HotpotQA contexts (../shared/data)", "prefill": "exact (chunked, full attention)",
               "steps": args.steps, "rows": rows}
    write_json(args.name, payload)
    plot(rows, RESULTS / f"{args.name}.png", args.model)
    print(f"wrote {RESULTS / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
