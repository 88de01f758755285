"""The budget rule of selection policies (lckv/policies/selection.py): the resident part takes at
most half of the budget, the rest is selected, nothing is overspent, and a budget that cannot
hold sink + current token + one selected key is refused with both numbers named."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lckv
from lckv.policies import BudgetTooSmallError, get_policy

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]


@pytest.mark.parametrize("name", ["retrieval", "quest", "block", "snapkv"])
@pytest.mark.parametrize("budget", [0.01, 0.02, 0.05, 0.1, 0.5, 64, 256, 1024, 2048])
def test_split_never_overspends_and_always_selects(name, budget):
    policy = get_policy(name, budget=budget)
    assert (policy.sink, policy.window) == (4, 64)  # RetroInfer's resident part is the default
    for n in LENGTHS:
        total = math.ceil(budget * n) if isinstance(budget, float) else budget
        sink, window, selected = policy.split_budget(n)
        assert sink + window + selected == total
        assert 1 <= window <= policy.window
        assert selected >= total / 2 - 1, "at least half of the budget goes to selected keys"
        if total >= 2 * (sink + policy.window):
            assert window == policy.window, "the configured window is kept when the budget allows it"


def test_five_percent_at_8k_retrieves_on_a_model():
    """The case the defaults got wrong before: `retrieval` at 5% of 8K tokens must select keys
    (410 keys: sink 4, window 64, 342 retrieved per kv head), with the default window."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16384, pad_token_id=0, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    binding = lckv.enable(model, "retrieval", budget=0.05, index="exact")
    seen = []
    select = type(binding.policy).select

    def recording_select(self, state, view, q, n_select, scale=None):
        n_recent = view.resident_keys.shape[2] - view.n_sink
        seen.append((view.context_len, view.n_sink, n_recent, n_select))
        return select(self, state, view, q, n_select, scale)

    type(binding.policy).select = recording_select
    try:
        ids = torch.randint(3, 97, (1, 8191))
        cache = lckv.new_cache(model)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=3,
                           min_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        type(binding.policy).select = select
    assert len(seen) == 2 * 2  # layers x decode steps after the first token
    for total, n_sink, n_recent, n_select in seen:
        assert (n_sink, n_recent) == (4, 64)
        assert n_select == math.ceil(0.05 * total) - 4 - 64 > 300


def test_small_budget_shrinks_the_resident_window():
    """1% of 2K = 21 keys: window 6 (= 21 // 2 - 4), 11 selected; the cache keeps that window."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=4096, pad_token_id=0, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    lckv.enable(model, "quest", budget=0.01, page_size=4)
    cache = lckv.new_cache(model)
    ids = torch.randint(3, 97, (1, 2047))
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0)
    layer = cache.layers[0]
    # settled between calls: window - 1 recent tokens (the next token completes the window)
    assert layer.recent_k.shape[2] == 5 and layer.sink_k.shape[2] == 4
    assert layer.store.length == layer.total - 9


def test_budget_too_small_is_refused_with_both_numbers():
    with pytest.raises(BudgetTooSmallError, match=r"budget of 5 keys cannot hold the sink \(4\).*at least 6"):
        get_policy("retrieval", budget=5)
    policy = get_policy("retrieval", budget=0.01)  # a fraction: fine until the context is too short
    assert policy.split_budget(1000)[2] >= 1
    with pytest.raises(BudgetTooSmallError, match=r"0.01 of 300 tokens = 3 keys"):
        policy.split_budget(300)
    assert get_policy("retrieval", budget=6).split_budget(10**6) == (4, 1, 1)
    assert get_policy("retrieval", sink=0, budget=2).split_budget(100) == (0, 1, 1)
