"""The KV cache of a fused attention op, written out in standard ONNX ops around IceKNNAttention.

The contract has no cache: the op gets the full K/V. What the fused op did inside
(append the new keys to the past ones, rotate Q/K, return the present cache) is
emitted before it, so one converted file still serves prompt processing and
one-token decoding, and its present outputs are what the original returned.

- ONNX `Attention` / com.microsoft `Attention`: present = Concat(past, new) on the
  sequence axis; the op's own mask (and is_causal, bottom-right) applies unchanged.
- com.microsoft `GroupQueryAttention`: a BNSH buffer (shared with past, or not)
  where batch b's T_b = seqlens_k[b] + 1 tokens live at rows [0, T_b), the new ones
  at [P_b, T_b) with P_b = T_b - S, or P_b = 0 on the first prompt (S equal to
  total_sequence_length, right padded). The new rows are scattered into the buffer
  (present), which the op reads in place with the contract's `key_lengths` = P_b + S
  (T_b, or S on a padded first prompt): the kernel decides kNN or exact from the keys
  that exist, not from the buffer's length (onnxruntime-genai's is 8192 slots), and its
  `is_causal`, aligned at key_lengths - S = P_b, with a [B, 1, 1, L] key mask "j < T_b"
  is exactly "key j <= P_b + i and j < T_b" for every batch at once.
"""

from __future__ import annotations

import onnx_ir as ir

from ice_onnx.rewriter.core import KVCache
from ice_onnx.rewriter.node_builder import Add, dim, int64

INT64 = ir.DataType.INT64


def _scalar(add: Add, value: ir.Value) -> ir.Value:
    return add("Squeeze", [value, int64(add, [0])])


def append(add: Add, cache: KVCache, key: ir.Value, value: ir.Value):
    """(full K, full V, [(present output, its new value)]) for a Concat-style cache; K/V in BNSH."""
    past_key, past_value = cache.past_key, cache.past_value
    if cache.stacked and past_key is not None:  # [2, B, H, P, D]
        past_key, past_value = (add("Squeeze", [add("Gather", [cache.past_key, int64(add, [i])], axis=0),
                                                int64(add, [0])]) for i in (0, 1))
    if past_key is not None:
        key = add("Concat", [past_key, key], axis=2)
        value = add("Concat", [past_value, value], axis=2)
    presents = []
    if cache.stacked and cache.present_key is not None:
        axis0 = int64(add, [0])
        stacked = add("Concat", [add("Unsqueeze", [key, axis0]), add("Unsqueeze", [value, axis0])], axis=0)
        presents.append((cache.present_key, stacked))
    elif not cache.stacked:
        presents += [(old, new) for old, new in ((cache.present_key, key), (cache.present_value, value)) if old is not None]
    return key, value, presents


def grouped(add: Add, cache: KVCache, query: ir.Value, key: ir.Value, value: ir.Value, heads: tuple[int, int]):
    """GroupQueryAttention's cache. Q/K/V in BNSH (new tokens only).

    Returns (Q, K, V, key mask [B, 1, 1, L] bool, key lengths [B], [(present output, its new
    value)]): K/V are the present buffers, read in place (O(L) only for the scatter of the new rows
    and the key mask), and the key lengths the tokens up to this step's last, so the kernel decides
    kNN or exact from the keys that exist, not from the buffer's slots."""
    one, zero = int64(add, [1]), int64(add, [0])
    seq = dim(add, query, 2)  # S
    total = add("Reshape", [add("Cast", [cache.total_length], to=INT64), one])
    lengths = add("Add", [add("Cast", [cache.seqlens_k], to=INT64), one])  # T_b, [B]
    first_prompt = add("Equal", [seq, total])
    start = add("Where", [first_prompt, zero, add("Sub", [lengths, seq])])  # P_b, [B]
    if cache.rotary is not None:
        cos, sin, interleaved = cache.rotary
        steps = add("Range", [_scalar(add, zero), _scalar(add, seq), _scalar(add, one)])
        positions = add("Add", [add("Unsqueeze", [start, one]), add("Unsqueeze", [steps, zero])])  # [B, S]
        query, key = (_rotate(add, x, positions, cos, sin, interleaved, h) for x, h in zip((query, key), heads))
    past_length = dim(add, cache.past_key, 2)
    buffer = add("Max", [total, past_length])  # L, the present length
    rows = add("Unsqueeze", [add("Range", [_scalar(add, zero), _scalar(add, buffer), _scalar(add, one)]), zero])  # [1, L]
    offset = add("Sub", [rows, add("Unsqueeze", [start, one])])  # row - P_b, [B, L]
    is_new = add("And", [add("GreaterOrEqual", [offset, zero]), add("Less", [offset, seq])])
    source_row = add("Clip", [offset, _scalar(add, zero), _scalar(add, add("Sub", [seq, one]))])
    presents, buffers = [], []
    for new, past, present in ((key, cache.past_key, cache.present_key), (value, cache.past_value, cache.present_value)):
        full_shape = add("Concat", [dim(add, past, 0), dim(add, past, 1), buffer, dim(add, past, 3)], axis=0)
        scattered = add("GatherElements", [new, _per_row(add, source_row, full_shape)], axis=2)
        padding = add("Concat", [zero, zero, zero, zero, zero, zero, add("Sub", [buffer, past_length]), zero], axis=0)
        padded_past = add("Pad", [past, padding])
        filled = add("Where", [_per_row(add, is_new, None), scattered, padded_past])
        if present is not None:
            presents.append((present, filled))
        buffers.append(filled)
    # Batch b's query i sits at P_b + i: the contract aligns causality at key_lengths - S, so
    # key_lengths = P_b + S (the end of this step's tokens; T_b but on a right-padded first prompt,
    # where it is S). The key mask keeps the keys j < T_b, so that padding queries see the real keys
    # as the op's do.
    step_ends = add("Add", [start, seq])  # [B]
    real = add("Less", [rows, add("Unsqueeze", [lengths, one])])  # [B, L]
    key_mask = add("Unsqueeze", [real, int64(add, [1, 2])])  # [B, 1, 1, L]
    return query, buffers[0], buffers[1], key_mask, step_ends, presents


def step_lengths(add: Add, cache: KVCache, query: ir.Value, query_axis: int):
    """(new tokens S, keys after the step, rows of the past buffer) as int64 [1] tensors."""
    seq = dim(add, query, query_axis)
    buffer = dim(add, cache.past_key, 3 if cache.stacked else 2)
    if cache.total_length is None:
        return seq, add("Add", [buffer, seq]), buffer
    # GQA: the real length, whatever the buffer's (shared, max-length).
    return seq, add("Reshape", [add("Cast", [cache.total_length], to=INT64), int64(add, [1])]), buffer


def _per_row(add: Add, per_row: ir.Value, shape: ir.Value | None) -> ir.Value:
    """[B, L] -> [B, 1, L, 1], expanded to `shape` when given (GatherElements wants full indices)."""
    indices = add("Unsqueeze", [per_row, int64(add, [1, 3])])
    return add("Expand", [indices, shape]) if shape is not None else indices


def _rotate(add: Add, x: ir.Value, positions: ir.Value, cos: ir.Value, sin: ir.Value, interleaved: bool,
            heads: int) -> ir.Value:
    """com.microsoft.RotaryEmbedding on BNSH x at the given [B, S] positions (what GQA does inside)."""
    rotary_dim = 2 * cos.shape[-1] if cos.shape is not None and isinstance(cos.shape[-1], int) else 0
    return add("RotaryEmbedding", [x, positions, cos, sin], _domain="com.microsoft", interleaved=int(interleaved),
               num_heads=heads, rotary_embedding_dim=rotary_dim)
