"""The model: a transformers LlamaForCausalLM small enough to train on one CPU thread."""
from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

# Why this size: retrieval needs an induction-style circuit (a head that tags each
# number with its line key, and a head that matches the question's key against those
# tags), which 2-4 layers carry; hidden 128 with 4 heads of 32 keeps a 4K-token training
# step near 2 s on one thread. Grouped-query attention (4 query heads sharing 2 KV heads)
# and rotary positions are what the IceFormer rewriter has to handle on real LLMs.
# rope_theta 1e6 (not Llama's 1e4) leaves the slowest rotary pairs nearly still over
# 16K tokens, so content matching in those pairs does not depend on distance.
MODEL_KWARGS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16384,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)


def build_model(vocab_size: int, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
    kwargs = {**MODEL_KWARGS, **overrides}
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=None, eos_token_id=None, **kwargs)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)
