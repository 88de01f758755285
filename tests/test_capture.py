"""Q/K capture on the real stories260K model against an independent recomputation."""
import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lckv.research.capture import capture_qk, hotpotqa_token_ids
from lckv.research.llama2c import load


@pytest.fixture(scope="module")
def stories(stories260k_files):
    return load(*stories260k_files)


def _oracle_qk(model, ids):
    """Post-RoPE q/k per layer from the plain sdpa model, via pre-hooks on the attention modules."""
    q, k, handles = {}, {}, []
    for layer in model.model.layers:
        attn = layer.self_attn

        def hook(module, args, kwargs, attn=attn):
            x = kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            shape = (*x.shape[:-1], -1, module.head_dim)
            qs = module.q_proj(x).view(shape).transpose(1, 2)
            ks = module.k_proj(x).view(shape).transpose(1, 2)
            qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
            q[module.layer_idx], k[module.layer_idx] = qs[0], ks[0]

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(ids.reshape(1, -1), use_cache=False)
    for h in handles:
        h.remove()
    return q, k


def test_exact_capture_matches_recomputation(stories, hotpotqa_file):
    model, tok = copy.deepcopy(stories[0]), stories[1]
    n = int(torch.randint(300, 700, ()))
    ids = hotpotqa_token_ids(tok, n, hotpotqa_file, seed=int(torch.randint(0, 1000, ())))
    assert ids.shape == (n,) and ids[0] == tok.bos_token_id
    got = capture_qk(model, ids, chunk_size=int(torch.randint(50, 200, ())))
    ref_q, ref_k = _oracle_qk(model, ids)
    assert got.prefill == "exact causal prefill" and got.num_tokens == n
    for layer in range(model.config.num_hidden_layers):
        # layer 0 is bit-identical; deeper layers differ by fp32 rounding of attention outputs
        torch.testing.assert_close(got.q[layer], ref_q[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.k[layer], ref_k[layer], atol=1e-4, rtol=1e-4)
    assert not hasattr(model, "lckv_binding"), "capture must restore the model"


def test_window_capture_is_local_and_restores_binding(stories):
    import lckv

    model, tok = copy.deepcopy(stories[0]), stories[1]
    ids = torch.tensor(tok.encode("Once upon a time there was a dog. " * 20))
    lckv.enable(model, "streaming", sink=2, window=7)
    wide = capture_qk(model, ids, window=ids.numel(), chunk_size=64)
    exact = capture_qk(model, ids, chunk_size=64)
    narrow = capture_qk(model, ids, window=16, chunk_size=64, layers=[0, 3])
    assert model.lckv_binding.policy == lckv.get_policy("streaming", sink=2, window=7)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(wide.k[layer], exact.k[layer], atol=1e-5, rtol=1e-5)
    assert sorted(narrow.k) == [0, 3]
    torch.testing.assert_close(narrow.k[0], exact.k[0], atol=0, rtol=0)  # layer 0 sees no attention yet
    assert not torch.allclose(narrow.k[3], exact.k[3], atol=1e-3), "a 16-token window must change deeper layers"
    with pytest.raises(ValueError, match="input_ids must have shape"):
        capture_qk(model, ids.reshape(2, -1))
    with pytest.raises(ValueError, match="layers must be indices"):
        capture_qk(model, ids, layers=[5])
