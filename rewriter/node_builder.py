"""Building the small standard-ONNX subgraphs the emitter writes around IceKNNAttention.

Every helper takes `add(op_type, inputs, **attributes) -> output`, which names and
collects the new node (see `adder`), so a block's nodes are inserted in one place and
in the order they were built.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

Add = Callable[..., ir.Value]


def adder(prefix: str, nodes: list[ir.Node]) -> Add:
    """add(op_type, inputs, **attributes) -> output: a new node named under `prefix`, appended to `nodes`."""
    def add(op_type: str, inputs, _domain: str = "", **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, domain=_domain, name=f"{prefix}/{op_type}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    return add


def int64(add: Add, values) -> ir.Value:
    return add("Constant", [], value=ir.tensor(values, dtype=ir.DataType.INT64))


def dim(add: Add, value: ir.Value, axis: int) -> ir.Value:
    """value.shape[axis] as an int64 [1] tensor."""
    return add("Gather", [add("Shape", [value]), int64(add, [axis])], axis=0)


def positions(add: Add, value: ir.Value) -> ir.Value:
    """[S] int64 0 .. S - 1 for the sequence axis (2) of a [B, H, S, D] value."""
    length = add("Gather", [add("Shape", [value]), int64(add, 2)], axis=0)
    return add("Range", [int64(add, 0), length, int64(add, 1)])


def fold(add: Add, op_type: str, values: list[ir.Value]) -> ir.Value | None:
    """values[0] op values[1] op ...; None for no values."""
    result = None
    for value in values:
        result = value if result is None else add(op_type, [result, value])
    return result


def typed(value: ir.Value, dtype: ir.DataType) -> ir.Value:
    """`value`, given `dtype` when it has no type yet (new nodes carry none until inference)."""
    if value.dtype is None:
        value.dtype = dtype
    return value
