"""Evaluation sets for the vector indexes: keys, build (prefill) queries and decode queries of one
(layer, kv head), with exact ground truth.

Two sources:

* :func:`real_sets` — REAL post-RoPE Q/K of the stories260K llama2.c model (head_dim 8) run over
  real HotpotQA context text, captured with :func:`lckv.research.capture.capture_qk`. The keys are the
  first ``n_keys`` positions; build queries are an even sample of the queries at those positions
  (both query heads of the kv head's GQA group); decode queries are the queries of the
  ``n_decode_positions`` positions right after the keys — never used to build an index.
  Long texts use the capture's sink + local-window prefill (its ``prefill`` string is kept in
  :attr:`EvalSet.source`). Captures are cached as ``.pt`` files when ``cache_dir`` is given.

* :func:`synthetic_set` — SYNTHETIC head_dim-128 data (labelled ``synthetic`` everywhere) whose
  queries and keys come from deliberately different distributions, in the way attention Q/K
  differ: tokens come in topic segments (mean length 256) over 512 latent topics
  ``z ~ N(0, I_32)``; a key is ``mu_k + s * A z + 0.5 eps`` (``s`` log-normal, sd 0.25: varying
  norms), a query is ``mu_q + B z' + 0.5 eps`` with another offset ``mu_q`` (orthogonal to
  ``mu_k``, both norm 8), another map ``B = A (I + 0.5 G)`` and ``z'`` the topic of the query's
  segment; the first 4 keys are "sinks" aligned with ``mu_q``. Both are then rotated by RoPE
  (theta 1e4) at their positions; as in trained models, the rows of ``A`` carry more energy in the
  slowly rotating RoPE pairs and the offsets live in the slowest quarter. Decode queries sit after
  the last key and draw their topics from topics the keys contain.
  What the exact top-k of a decode query turns out to be (measured on a 65K-key set, seed 0; an
  earlier version of this note said "mostly the keys of its topic", which is wrong): a few whole
  segments (two or three hold the top-10), chosen by how the rotated offsets and contents of the
  query and of each segment line up at their relative position; only ~2% of the top-100 share the
  query's topic. Those keys are in many build queries' lists (median 426), but no single build
  query ranks the same segments together, so an index must navigate between regions of keys.

Ground truth (:func:`exact_topk`) is the exact inner-product top-k over the keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["EvalSet", "exact_topk", "synthetic_set", "real_sets", "recall_at", "shifted_data", "topic_stream"]


@dataclass
class EvalSet:
    """keys ``[n, d]``, build_queries ``[m, d]``, decode_queries ``[q, d]`` (float32, contiguous)."""

    name: str
    keys: torch.Tensor
    build_queries: torch.Tensor
    decode_queries: torch.Tensor
    synthetic: bool
    source: str

    @property
    def label(self) -> str:
        return f"{self.name} ({'synthetic' if self.synthetic else 'real'})"


def exact_topk(keys: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 256):
    """Exact inner-product top-k: ``(scores [q, k'], ids [q, k'])``, ``k' = min(k, n)``, fp32."""
    k = min(k, keys.shape[0])
    scores, ids = [], []
    for lo in range(0, queries.shape[0], chunk):
        s, i = (queries[lo:lo + chunk] @ keys.T).topk(k, dim=1)
        scores.append(s)
        ids.append(i)
    return torch.cat(scores), torch.cat(ids)


def recall_at(found_ids: torch.Tensor, true_ids: torch.Tensor, k: int) -> float:
    """Mean over queries of |found[:, :k] ∩ true[:, :k]| / k."""
    found, true = found_ids[:, :k], true_ids[:, :k]
    hits = (found.unsqueeze(2) == true.unsqueeze(1)).any(dim=2).sum()
    return float(hits) / float(true.numel())


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 1e4) -> torch.Tensor:
    """HF-style rotate_half RoPE of x ``[n, d]`` at ``positions`` ``[n]``."""
    d = x.shape[1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().float().repeat(1, 2), angles.sin().float().repeat(1, 2)
    half = torch.cat([-x[:, d // 2:], x[:, :d // 2]], dim=1)
    return x * cos + half * sin


def synthetic_set(n_keys: int = 262144, dim: int = 128, n_build: int = 65536, n_decode: int = 512,
                  seed: int = 0) -> EvalSet:
    """The synthetic head_dim-``dim`` set described in the module docstring."""
    g = torch.Generator().manual_seed(seed)
    latent, n_topics = 32, 512

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    topics = randn(n_topics, latent)
    # RoPE pair i rotates (dims i, i + dim/2) with frequency theta^(-2i/dim): low i = fast. As in
    # trained models, content energy grows toward the slow pairs and the offsets live in the
    # slowest quarter, so scores depend on content more than on the pair phases.
    half = dim // 2
    slowness = ((torch.arange(half) + 1.0) / half).repeat(2)[:, None]
    a = slowness * randn(dim, latent) / math.sqrt(latent) * 2.0
    b = a @ (torch.eye(latent) + 0.5 * randn(latent, latent) / math.sqrt(latent))
    slow = torch.zeros(dim)
    slow[half - half // 4:half] = 1.0
    slow[dim - half // 4:] = 1.0
    basis, _ = torch.linalg.qr(slow[:, None] * randn(dim, 2))
    mu_k, mu_q = 8.0 * basis[:, 0], 8.0 * basis[:, 1]

    # Topic of every position: segments with geometric lengths (mean 256).
    total = n_keys + n_decode
    seg_topic = torch.empty(total, dtype=torch.long)
    pos = 0
    while pos < total:
        length = 1 + int(-256 * math.log(1 - float(torch.rand(1, generator=g))))  # geometric
        seg_topic[pos:pos + length] = int(torch.randint(n_topics, (1,), generator=g))
        pos += length

    scale = torch.exp(0.25 * randn(n_keys, 1))
    keys = mu_k + scale * (topics[seg_topic[:n_keys]] @ a.T) + 0.5 * randn(n_keys, dim)
    keys[:4] = mu_k + 0.5 * mu_q + 0.5 * randn(4, dim)  # attention sinks
    keys = _rope(keys, torch.arange(n_keys))

    build_pos = torch.randint(n_keys, (n_build,), generator=g).sort().values
    build = mu_q + topics[seg_topic[build_pos]] @ b.T + 0.5 * randn(n_build, dim)
    build = _rope(build, build_pos)

    seen = seg_topic[:n_keys].unique()
    decode_topics = seen[torch.randint(seen.numel(), (n_decode,), generator=g)]
    decode_pos = n_keys + torch.arange(n_decode)
    decode = mu_q + topics[decode_topics] @ b.T + 0.5 * randn(n_decode, dim)
    decode = _rope(decode, decode_pos)
    return EvalSet(f"synthetic-d{dim}", keys.contiguous(), build.contiguous(), decode.contiguous(), True,
                   f"synthetic generator (seed {seed}): topic segments, different Q/K offsets and maps, RoPE")


def _capture(n_tokens: int, window: int, cache_dir: Path | None, text_seed: int, model_name: str = "stories260K"):
    from lckv.research.capture import capture_qk, hotpotqa_token_ids

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{model_name}_hotpotqa_T{n_tokens}_w{window}_s{text_seed}.pt"
        if path.is_file():
            return torch.load(path)
    if model_name == "stories260K":
        from lckv.research.data import stories260k_paths
        from lckv.research.llama2c import load

        model, tok = load(*stories260k_paths())
    else:
        from lckv.models import load

        model, tok = load(model_name)
    ids = hotpotqa_token_ids(tok, n_tokens, seed=text_seed)
    cap = capture_qk(model, ids, window=window)
    data = {"q": cap.q, "k": cap.k, "prefill": cap.prefill}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(path)  # a cut run leaves no half-written capture behind
    return data


def real_sets(n_keys: int, heads=((1, 0), (2, 1), (3, 2), (4, 3)), n_decode_positions: int = 256,
              max_build_queries: int = 65536, window: int = 512, cache_dir=None,
              text_seed: int = 0, model: str = "stories260K") -> list[EvalSet]:
    """Real sets of ``model`` (stories260K or a :mod:`lckv.models` name), one per ``(layer,
    kv_head)`` of ``heads`` (see the module docstring).

    Captures ``n_keys + n_decode_positions`` tokens of HotpotQA text once (several minutes for
    256K tokens of stories260K or 32K of Qwen2.5-0.5B on 2 cores; cached under ``cache_dir``).
    """
    data = _capture(n_keys + n_decode_positions, window, cache_dir, text_seed, model)
    sets = []
    for layer, kv_head in heads:
        q, k = data["q"][layer], data["k"][layer]
        group = q.shape[0] // k.shape[0]
        qh = q[kv_head * group:(kv_head + 1) * group]  # [group, T, d]
        keys = k[kv_head, :n_keys].contiguous()
        prefill_q = qh[:, :n_keys].reshape(-1, q.shape[-1])
        if prefill_q.shape[0] > max_build_queries:
            pick = (torch.arange(max_build_queries, dtype=torch.float64) * (prefill_q.shape[0] / max_build_queries)).long()
            prefill_q = prefill_q[pick]
        decode_q = qh[:, n_keys:].reshape(-1, q.shape[-1])
        sets.append(EvalSet(f"{model.split('-')[0]}-L{layer}H{kv_head}", keys, prefill_q.contiguous(),
                            decode_q.contiguous(), False,
                            f"real {model} Q/K on HotpotQA text, {data['prefill']}"))
    return sets


def shifted_data(n: int, m_build: int, m_decode: int, dim: int, seed: int):
    """Keys around 64 cluster centres; queries around scaled centres plus a shared offset (another
    distribution than the keys): ``(keys [n, dim], build queries [m_build, dim], decode queries
    [m_decode, dim])``. The data of the index recall tests and of the concurrency stress run."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, dim, generator=g)
    keys = centres[torch.randint(64, (n,), generator=g)] + 0.4 * torch.randn(n, dim, generator=g)
    q = 2 * centres[torch.randint(64, (m_build + m_decode,), generator=g)] + 0.4 * torch.randn(m_build + m_decode, dim, generator=g)
    q[:, 0] += 3.0
    return keys.contiguous(), q[:m_build].contiguous(), q[m_build:].contiguous()


def topic_stream(n: int, m_decode: int, dim: int, seed: int, topics: int = 48, run: int = 200):
    """Keys in contiguous topic runs of ``run`` (as in a KV cache); queries from another
    distribution: scaled topic centres plus a shared offset. ``(keys [n, dim], queries [m_decode, dim])``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(topics, dim, generator=g)
    topic = torch.randint(topics, ((n + run - 1) // run,), generator=g).repeat_interleave(run)[:n]
    keys = centres[topic] + 0.5 * torch.randn(n, dim, generator=g)
    q = 2 * centres[torch.randint(topics, (m_decode,), generator=g)] + 0.5 * torch.randn(m_decode, dim, generator=g)
    q[:, 0] += 2.0
    return keys.contiguous(), q.contiguous()
