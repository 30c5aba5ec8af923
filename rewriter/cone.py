"""The cone of some values: the nodes computing them, and the graph inputs and initializers they read."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

@dataclasses.dataclass
class Cone:
    """What computes some values: the nodes, and the graph inputs and initializers they read."""

    nodes: set[ir.Node]
    inputs: set[str]
    initializers: dict[str, ir.Value]


# Ops that read only the shape of their input, not its values.
SHAPE_OPS = frozenset({"Shape", "Size"})


def cone(values: list[ir.Value], through_shapes: bool = True) -> Cone:
    """`through_shapes=False`: what the values' *contents* depend on (a Shape's input is not read)."""
    found = Cone(set(), set(), {})
    stack, seen = list(values), set()
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        producer = value.producer()
        if producer is None:
            if value.is_graph_input():
                found.inputs.add(value.name)
            elif value.const_value is not None:
                found.initializers[value.name] = value
            continue
        if producer not in found.nodes:
            found.nodes.add(producer)
            if through_shapes or producer.op_type not in SHAPE_OPS:
                stack.extend(producer.inputs)
            stack.extend(_outer_scope_values(producer))
    return found


def _outer_scope_values(node: ir.Node) -> list[ir.Value]:
    """Values of the enclosing graph that a node's subgraphs (If/Loop/Scan) read."""
    found = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.as_graphs())
        for graph in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                for value in inner.inputs:
                    if value is not None and value.graph is not None and value.graph is not graph and value.graph is not inner.graph:
                        found.append(value)
    return found
