"""Graph surgery after emission: point users at the new values, drop what became dead."""

from __future__ import annotations

import onnx_ir as ir


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every user (and graph output) of `old` at `new`, keeping graph output names."""
    was_output = [i for i, out in enumerate(graph.outputs) if out is old]
    if was_output:
        name = old.name
        old.name = None
        new.name = name
        for i in was_output:
            graph.outputs[i] = new
    ir.convenience.replace_all_uses_with(old, new)


def dead_nodes(graph: ir.Graph) -> set[ir.Node]:
    return {node for node in graph if _is_dead(graph, node)}


def remove_dead(graph: ir.Graph, keep: set[ir.Node]) -> None:
    """Remove nodes left without users by the replacement (not `keep`, the ones that were dead before)."""
    for node in reversed(list(graph)):
        if node not in keep and _is_dead(graph, node):
            graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in graph.outputs and value not in graph.inputs:
            del graph.initializers[name]


def forget_intermediate_shapes(graph: ir.Graph) -> None:
    """Drop the shapes of intermediate values (types stay: ops without inference need them):
    shape inference recomputes them when the file is checked, and stale entries some tools
    write (a [1] constant declared a scalar) would fail it."""
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if not value.is_graph_output() and value.type is not None:
                value.shape = None


def _is_dead(graph: ir.Graph, node: ir.Node) -> bool:
    outputs = set(graph.outputs)
    return all(not out.uses() and out not in outputs for out in node.outputs)
