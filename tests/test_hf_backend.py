"""The "lckv" transformers backend against transformers' own sdpa attention.

`full` must give token-identical greedy output and matching logits (fp32) with offloading really
happening (prompts longer than the window); `streaming` must match sdpa run on the whole sequence
with an explicit sink+window 4D mask, recomputed from scratch at every step.
"""
import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import lckv
from lckv.cache import LckvCache
from lckv.integrations.hf import ModelNotSupportedError
from lckv.research.llama2c import load
from lckv.policies import PolicyConfigError, StreamingPolicy
from tiny_models import tiny_decoder

# fp32 end-to-end logits: both paths accumulate in fp32 but in different orders (merged partial
# softmaxes vs one softmax), so differences are rounding-level; 1e-4 is ~100x fp32 eps at logit scale.
LOGIT_ATOL, LOGIT_RTOL = 1e-4, 1e-4
NEW_TOKENS = 24


def _tiny(kind: str, kv_heads: int):
    return tiny_decoder(kind, kv_heads)


@pytest.fixture(scope="module")
def stories(stories260k_files):
    return load(*stories260k_files)


def _generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def _left_padded(vocab: int, lengths):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,))
        mask[row, width - n:] = 1
    return ids, mask


def _assert_same_generation(ref, got):
    ref_seq, ref_logits = ref
    seq, logits = got
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    assert torch.equal(seq, ref_seq)


@pytest.mark.parametrize("kind,kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 2), ("qwen2", 1)])
@pytest.mark.parametrize("lengths", [(37,), (41, 23)])
def test_full_matches_sdpa_on_random_models(kind, kv_heads, lengths):
    model = _tiny(kind, kv_heads)
    ids, mask = _left_padded(model.config.vocab_size, lengths)
    ref = _generate(model, ids, mask)
    lckv.enable(model, "full", sink=3, window=8)
    cache = lckv.new_cache(model)
    got = _generate(model, ids, mask, past_key_values=cache)
    _assert_same_generation(ref, got)
    report = cache.memory_report()
    assert report["offloaded_bytes"] > 0, "prompts longer than the window must offload"
    # resident between calls: sink + window - 1 per layer (settled: the next token completes the window), K and V
    per_token = 2 * model.config.num_key_value_heads * (model.config.hidden_size // 4 if kind == "qwen2" else 12) * 4
    assert report["resident_bytes"] == model.config.num_hidden_layers * len(lengths) * (3 + 7) * per_token


def test_full_default_cache_through_generate(stories):
    model, tok = copy.deepcopy(stories[0]), stories[1]
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily. She loved to play")])
    mask = torch.ones_like(ids)
    ref = _generate(model, ids, mask)
    lckv.enable(model, "full", sink=4, window=6)
    got = _generate(model, ids, mask)  # generate creates the LckvCache itself
    _assert_same_generation(ref, got)
    lckv.disable(model)
    assert model.config._attn_implementation == "sdpa"
    _assert_same_generation(ref, _generate(model, ids, mask))


def test_full_stories260k_batch_left_padding(stories):
    model, tok = copy.deepcopy(stories[0]), stories[1]
    texts = ["Tom had a red ball and a small dog. One day the dog ran to the park and",
             "Lily saw a cat. The cat was"]
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    ref = _generate(model, ids, mask)
    lckv.enable(model, "full", sink=2, window=5)
    _assert_same_generation(ref, _generate(model, ids, mask))


def test_prefill_logits_match_sdpa_without_cache(stories):
    model, tok = copy.deepcopy(stories[0]), stories[1]
    ids = torch.tensor([tok.encode("The sun was hot. Ben went to the lake with his dad to swim and play.")])
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        lckv.enable(model, "full", window=4)
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def _streaming_mask(length: int, sink: int, window: int, padding: torch.Tensor) -> torch.Tensor:
    q = torch.arange(length).unsqueeze(1)
    k = torch.arange(length).unsqueeze(0)
    allowed = (k <= q) & ((k < sink) | (k > q - window))
    return allowed[None, None] & padding.bool()[:, None, None, :]


def _streaming_reference(model, ids, padding, sink, window, steps):
    """Greedy decoding with sdpa over the whole sequence and an explicit 4D sink+window mask."""
    ids, padding, logits = ids.clone(), padding.clone(), []
    with torch.no_grad():
        for _ in range(steps):
            mask = _streaming_mask(ids.shape[1], sink, window, padding)
            position_ids = (padding.cumsum(-1) - 1).clamp(min=0)
            step = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -1]
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
            padding = torch.cat([padding, torch.ones_like(padding[:, :1])], dim=1)
    return ids, torch.stack(logits, dim=1)


@pytest.mark.parametrize("sink,window", [(4, 6), (0, 9), (2, 1)])
def test_streaming_matches_explicit_mask(stories, sink, window):
    model, tok = copy.deepcopy(stories[0]), stories[1]
    ids = torch.tensor([tok.encode("Once upon a time, there was a big dog named Max. Max liked to run")])
    padding = torch.ones_like(ids)
    ref = _streaming_reference(model, ids, padding, sink, window, NEW_TOKENS)
    lckv.enable(model, StreamingPolicy(sink=sink, window=window))
    cache = lckv.new_cache(model)
    got = _generate(model, ids, padding, past_key_values=cache)
    _assert_same_generation(ref, got)
    report = cache.memory_report()
    assert report["offloaded_bytes"] == 0 and report["evicted_tokens_per_layer"] > 0


def test_streaming_left_padding_random_qwen2():
    model = _tiny("qwen2", 2)
    ids, padding = _left_padded(model.config.vocab_size, (30, 19))
    ref = _streaming_reference(model, ids, padding, 3, 7, NEW_TOKENS)
    lckv.enable(model, "streaming", sink=3, window=7)
    _assert_same_generation(ref, _generate(model, ids, padding))


def test_streaming_without_cache_is_the_masked_model(stories):
    """Training-style forward (no cache): the policy is applied as a mask."""
    model, tok = copy.deepcopy(stories[0]), stories[1]
    ids = torch.tensor([tok.encode("Sue and Tim played with blocks. They built a tall tower and then it fell down.")])
    padding = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=_streaming_mask(ids.shape[1], 2, 5, padding), use_cache=False).logits
        lckv.enable(model, "streaming", sink=2, window=5)
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_bad_policies_raise():
    model = _tiny("llama", 2)
    with pytest.raises(PolicyConfigError, match="unknown policy 'nope'"):
        lckv.enable(model, "nope")
    with pytest.raises(PolicyConfigError, match="window must be >= 1"):
        lckv.enable(model, "streaming", window=0)
    with pytest.raises(PolicyConfigError, match="sink must be >= 0"):
        lckv.enable(model, "full", sink=-1)
    with pytest.raises(PolicyConfigError, match="no setting"):
        lckv.enable(model, "streaming", budget=3)
    with pytest.raises(PolicyConfigError, match="must be an int"):
        lckv.enable(model, "streaming", window=2.5)
    with pytest.raises(PolicyConfigError, match="not both"):
        lckv.enable(model, StreamingPolicy(), window=3)


def test_unsupported_or_mismatched_models_raise():
    with pytest.raises(ModelNotSupportedError, match="not a supported model"):
        lckv.enable(torch.nn.Linear(3, 3), "full")
    with pytest.raises(ValueError, match="before creating a cache"):
        lckv.new_cache(_tiny("llama", 2))
    a, b = _tiny("llama", 2), _tiny("llama", 2)
    lckv.enable(a, "full", window=4)
    lckv.enable(b, "full", window=4)
    ids = torch.randint(3, 97, (1, 9))
    with pytest.raises(ValueError, match="another model"):
        b(ids, past_key_values=lckv.new_cache(a))
    lckv.enable(a, "streaming", window=4)
    with pytest.raises(ValueError, match="another model"):
        b(ids, past_key_values=lckv.new_cache(a))
    deeper = _tiny("qwen2", 2)
    lckv.enable(deeper, "full", window=4)
    with pytest.raises(ValueError, match="out of range"):
        deeper(ids, past_key_values=LckvCache(deeper.lckv_binding.policy, 1))
    never = _tiny("llama", 2)
    lckv.disable(never)  # documented no-op on a model that was never enabled
    assert never.config._attn_implementation == "sdpa" and not hasattr(never, "lckv_binding")


def test_attn_implementation_lckv_from_config_uses_registered_default():
    """`attn_implementation="lckv"` without enable(): the registered default policy applies."""
    from lckv.integrations import hf

    ref = _tiny("llama", 2)
    ids = torch.randint(3, 97, (2, 30))
    with torch.no_grad():
        ref_logits = ref(ids).logits
    try:
        hf.register("streaming", sink=2, window=6)
        model = LlamaForCausalLM._from_config(copy.deepcopy(ref.config), attn_implementation="lckv").eval()
        model.load_state_dict(ref.state_dict())
        assert model.config._attn_implementation == "lckv"
        padding = torch.ones_like(ids)
        with torch.no_grad():
            masked = ref(ids, attention_mask=_streaming_mask(30, 2, 6, padding), use_cache=False).logits
            got = model(ids, use_cache=False).logits
        torch.testing.assert_close(got, masked, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
        hf.register("full")
        with torch.no_grad():
            torch.testing.assert_close(model(ids, use_cache=False).logits, ref_logits, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    finally:
        hf.register("full")
    with pytest.raises(ValueError, match="settings given without"):
        hf.register(window=3)
