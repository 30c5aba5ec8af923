"""The ListOps encoder: a transformers BertForSequenceClassification, small enough for one CPU thread."""
from __future__ import annotations

from transformers import BertConfig, BertForSequenceClassification

from .task import LRA_MAX_LENGTH, NUM_CLASSES

# Hidden 128, 4 layers of 4 heads: LRA's ListOps transformers are of this order (its
# base model: 4 layers, 512 hidden); one thread cannot afford more. Learned absolute
# positions cover the longest LRA sequence plus the <cls> token.
MODEL_KWARGS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=LRA_MAX_LENGTH + 8,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=NUM_CLASSES,
)


def build_model(vocab_size: int, attn_implementation: str = "sdpa", **overrides) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=vocab_size, pad_token_id=0, **{**MODEL_KWARGS, **overrides})
    config._attn_implementation = attn_implementation
    return BertForSequenceClassification(config)
