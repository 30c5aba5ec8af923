"""The model: a transformers LlamaForCausalLM small enough to train on one CPU thread."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Why this size: retrieval needs an induction-style circuit (a head that tags each
# number with its line key, and a head that matches the question's key against those
# tags), which 2-4 layers carry; hidden 128 with 4 heads of 32 keeps a 4K-token training
# step near 2 s on one thread. Grouped-query attention (4 query heads sharing 2 KV heads)
# and rotary positions are what the IceFormer rewriter has to handle on real LLMs.
# rope_theta 1e6 (not Llama's 1e4) leaves the slowest rotary pairs nearly still over
# 16K tokens, so content matching in those pairs does not depend on distance.
# Input embeddings start at unit scale (Llama's default 0.02 is for much larger models):
# with 0.02 a number's identity was 2 % of the residual stream by layer 2 and never got
# copied to the output. Untied, so the output head keeps its small scale. At unit scale
# the 4096 keys share no direction, and a head cannot learn "attend to the key" until
# they do (Adam moves each rarely seen row ~1e-3 a step); so each token class (keys,
# numbers, each structural word) starts with a common random vector of the same scale
# added to every member's own.
# The other weights start at std hidden^-1/2 (Llama's 0.02 suits width ~4096): at 0.02
# each head wrote ~2 % of the unit-scale residual, and the retrieval head could not see
# the key a first-layer head had copied next to each number.
EMBEDDING_INIT_STD = 1.0
MODEL_KWARGS = dict(
    initializer_range=128 ** -0.5,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16384,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)


def build_model(vocab_size: int, attn_implementation: str = "sdpa", **overrides) -> LlamaForCausalLM:
    kwargs = {**MODEL_KWARGS, **overrides}
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=None, eos_token_id=None, **kwargs)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


@torch.no_grad()
def initialize_embeddings(model, token_classes, std: float = EMBEDDING_INIT_STD, class_std: float | None = None):
    """Input embeddings = own N(0, std²) vector + the token class's shared N(0, class_std²) vector."""
    class_std = std if class_std is None else class_std
    table = model.model.embed_tokens.weight
    table.normal_(0.0, std)
    classes = torch.as_tensor(token_classes)
    if class_std > 0:
        shared = torch.randn(int(classes.max()) + 1, table.shape[1]) * class_std
        table += shared[classes]
