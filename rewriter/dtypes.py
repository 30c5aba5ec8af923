"""The element-type policy: the op computes in float32; float16 / bfloat16 blocks get Casts around it.

Models in float16 or bfloat16 keep their type outside the block, and float32 is at least
as precise inside. Other types (float64, integers) are not converted.
"""

from __future__ import annotations

import onnx_ir as ir

CAST_TO_FLOAT = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
ATTENTION_TYPES = (ir.DataType.FLOAT, *CAST_TO_FLOAT)


def element_type(value: ir.Value) -> ir.DataType | None:
    """The value's element type; when inference left it unknown (contrib ops, models whose
    inference failed), the nearest floating type among the values computing it: the ops
    attention is built from keep their operands' float type."""
    frontier, seen = [value], set()
    while frontier and len(seen) < 64:  # breadth first, a bounded look upstream
        current = frontier.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.dtype is not None:
            if current is value or current.dtype.is_floating_point():
                return current.dtype
            continue
        producer = current.producer()
        if producer is not None:
            frontier.extend(producer.inputs)
    return None


def unconvertible_type(role: str, value: ir.Value) -> str | None:
    """Why the block's `role` value (query, key, value, output) cannot go through the op, or None."""
    dtype = element_type(value)
    if dtype is None:
        return f"the {role}'s element type is unknown"
    if dtype not in ATTENTION_TYPES:
        return f"{dtype.name.lower()} {role}: IceKNNAttention computes in float32 (float16/bfloat16 are cast)"
    return None


def as_float(add, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    """`value` (of type `dtype`) as float32, the contract's type: a Cast for float16 / bfloat16."""
    return add("Cast", [value], to=ir.DataType.FLOAT) if dtype in CAST_TO_FLOAT else value
