"""Valid random inputs for a model at a given batch size and sequence length.

Shapes come from the graph inputs: fixed dims are kept, symbolic ones are resolved by
name and position (batch-like, past-length-like, otherwise the sequence length).
Values follow the usual meaning of transformer input names.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

DEFAULT_VOCAB = 1000


def input_feeds(model: onnx.ModelProto, batch: int, seq_len: int, *, past_len: int = 0,
                seed: int = 0) -> dict[str, np.ndarray]:
    """One array per graph input (initializers excluded), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    feeds = {}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor = info.type.tensor_type
        shape = [_resolve_dim(dim, axis, info.name, batch, seq_len, past_len)
                 for axis, dim in enumerate(tensor.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[info.name] = _values(model, info.name, shape, dtype, past_len, rng)
    return feeds


def _resolve_dim(dim, axis: int, input_name: str, batch: int, seq_len: int, past_len: int) -> int:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value
    name = dim.dim_param.lower()
    if "batch" in name:
        return batch
    if "past" in name and "+" not in name and "total" not in name:
        return past_len
    if not name and "past" in input_name.lower() and axis == 2:  # [B, H, past, D] caches
        return past_len
    if "total" in name or ("past" in name and "+" in name):
        return past_len + seq_len
    return batch if axis == 0 else seq_len


def _values(model, name: str, shape: list[int], dtype, past_len: int, rng) -> np.ndarray:
    lower = name.lower()
    if dtype == np.bool_:
        return np.ones(shape, dtype=bool)
    if np.issubdtype(dtype, np.integer):
        if "attention_mask" in lower or lower.endswith("mask"):
            return np.ones(shape, dtype=dtype)
        if "position" in lower:
            positions = np.arange(past_len, past_len + shape[-1], dtype=dtype)
            return np.broadcast_to(positions, shape).copy()
        if "ids" in lower and "type" not in lower:
            return rng.integers(0, vocab_size(model, name), size=shape).astype(dtype)
        return np.zeros(shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def vocab_size(model: onnx.ModelProto, input_name: str) -> int:
    """Rows of the embedding table the input indexes (first Gather on it), else a default."""
    tables = {init.name: init.dims for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name:
            dims = tables.get(node.input[0])
            if dims:
                return int(dims[0])
    return DEFAULT_VOCAB
