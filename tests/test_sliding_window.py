"""Models that mix sliding-window and global attention layers (Gemma 3, Qwen2 with
use_sliding_window, Mistral): a sliding layer attends its window exactly and keeps only that
window resident; the policy applies to the global layers. With ``full`` the outputs equal
transformers' sdpa, token for token."""
import copy

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import lckv
from lckv.policies import StreamingPolicy

LOGIT_ATOL, LOGIT_RTOL = 1e-4, 1e-4  # fp32 logits, as in test_hf_backend.py
WINDOW = 6

_COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, pad_token_id=0,
               bos_token_id=1, eos_token_id=None, sliding_window=WINDOW)


def _model(kind: str):
    if kind == "gemma3":
        cfg = Gemma3TextConfig(**_COMMON, head_dim=12, layer_types=["sliding_attention", "full_attention"] * 2,
                               attn_logit_softcapping=None, final_logit_softcapping=None)
        model = Gemma3ForCausalLM(cfg)
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON, use_sliding_window=True, max_window_layers=2))
    else:
        model = MistralForCausalLM(MistralConfig(**_COMMON, head_dim=12))
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _sliding(model) -> list[int]:
    types = getattr(model.config, "layer_types", None)
    if types is None:  # Mistral: the window applies to every layer
        return list(range(model.config.num_hidden_layers))
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def _generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("kind", ["gemma3", "qwen2", "mistral"])
@pytest.mark.parametrize("lengths", [(23,), (29, 17)])
def test_full_matches_sdpa_with_sliding_layers(kind, lengths):
    torch.manual_seed(len(lengths) + len(kind))
    model = _model(kind)
    sliding = _sliding(model)
    assert sliding and len(sliding) <= model.config.num_hidden_layers
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):  # left padding
        ids[row, width - n:] = torch.randint(3, 97, (n,))
        mask[row, width - n:] = 1
    ref_seq, ref_logits = _generate(model, ids, mask)
    lckv.enable(model, "full", sink=2, window=5)
    cache = lckv.new_cache(model)
    seq, logits = _generate(model, ids, mask, past_key_values=cache)
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    assert torch.equal(seq, ref_seq)
    for i, layer in enumerate(cache.layers):
        if i in sliding:  # only the window is kept: bounded memory, nothing offloaded
            assert isinstance(layer.policy, StreamingPolicy) and layer.policy.window == WINDOW
            assert layer.store is None and layer.sink_k.shape[2] == 0
            assert layer.recent_k.shape[2] == WINDOW - 1  # settled between calls: the next token completes it
            assert layer.evicted == layer.total - WINDOW + 1
        else:  # the global layers follow the policy: every token kept, old ones offloaded
            assert layer.policy is model.lckv_binding.policy
            assert layer.store is not None and layer.store.length > 0 and layer.evicted == 0


def test_sliding_layers_without_cache_match_sdpa():
    """Forward without a cache (training, scoring): the window is applied as a mask."""
    model = _model("gemma3")
    ids = torch.randint(3, 97, (2, 31))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        lckv.enable(model, "full")
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_selection_policy_applies_to_global_layers_only():
    model = _model("gemma3")
    lckv.enable(model, "quest", sink=2, window=4, budget=12, page_size=4)
    cache = lckv.new_cache(model)
    ids = torch.randint(3, 97, (1, 40))
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=3,
                       min_new_tokens=3, do_sample=False, pad_token_id=0)
    for i, layer in enumerate(cache.layers):
        if i in _sliding(model):
            assert layer.store is None and layer.recent_k.shape[2] == WINDOW - 1  # settled between calls
        else:
            assert layer.policy.name == "quest" and layer.store.length == layer.total - 2 - (layer.recent_k.shape[2])


def test_mismatched_window_is_refused():
    model = _model("gemma3")
    lckv.enable(model, "full")
    cfg = copy.deepcopy(model.config)
    model.lckv_binding.sliding_layers[0] = StreamingPolicy(sink=0, window=WINDOW + 1)
    with pytest.raises(ValueError, match="sliding window of 6 tokens"):
        with torch.no_grad():
            model(torch.randint(3, 97, (1, 9)), past_key_values=lckv.new_cache(model))
    assert cfg.sliding_window == WINDOW
