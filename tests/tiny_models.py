"""Random tiny transformers decoders for tests that compare lckv with transformers' own attention."""
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_decoder(kind: str, kv_heads: int, max_positions: int = 256):
    """A 2-layer ``"llama"`` (head_dim 12) or ``"qwen2"`` (head_dim 12 from 48 / 4) decoder with 4 query
    heads and ``kv_heads`` kv heads, vocabulary 97 (pad 0, BOS 1, no EOS), sdpa attention, eval mode.
    Weights come from torch's global generator (seed it for a reproducible model)."""
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=max_positions, initializer_range=0.3,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=12))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.config._attn_implementation = "sdpa"
    return model.eval()
