"""Reading one fused attention node: its optional inputs, the outputs something reads, its
attributes, and the facts the fused-op rules share (hidden size, default scale, equal lengths)."""

from __future__ import annotations

import onnx_ir as ir


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def output_is_read(node: ir.Node, index: int) -> bool:
    """Whether output `index` is read, by a node or as a graph output."""
    if len(node.outputs) <= index:
        return False
    output = node.outputs[index]
    return bool(output.uses()) or output.is_graph_output()


def attribute(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.value


def output_if_read(node: ir.Node, index: int) -> ir.Value | None:
    return node.outputs[index] if output_is_read(node, index) else None


def hidden_size(value: ir.Value | None) -> int | None:
    """The static last dim of a [B, S, hidden] value, from its shape or its projection's weights."""
    if value is None:
        return None
    if value.shape is not None and value.shape.rank() and isinstance(value.shape[-1], int):
        return value.shape[-1]
    producer = value.producer()
    if producer is not None and producer.op_type in ("MatMul", "Add") and producer.domain in ("", "ai.onnx"):
        for operand in producer.inputs:
            if operand is not None and operand.const_value is not None and operand.shape.rank() >= 1:
                return operand.shape[-1]
    return None


def default_scale(scale: float | None) -> float:
    """A fused op's scale attribute, or 0 (the contract's 'use 1/√D') when the op leaves it to the default."""
    if scale is not None and scale > 0:
        return float(scale)
    return 0.0


def same_length(q: ir.Value, k: ir.Value, packed: bool) -> bool:
    axis = 1 if packed else 2
    if q.shape is None or k.shape is None or q.shape.rank() <= axis or k.shape.rank() <= axis:
        return q is k
    dq, dk = q.shape[axis], k.shape[axis]
    if isinstance(dq, int) or isinstance(dk, int):
        return dq == dk
    return dq.value is not None and dq.value == dk.value
