"""Finding attention: every block a rule recognises, and the Softmax-into-MatMul blocks none does.

The rules (rules/) each describe what they match as an AttentionCore; a node covered by
one block is not offered to the rules again. What looks like attention but matched no rule
is listed too, with why, so the report accounts for every attention block of the model.
"""

from __future__ import annotations

import onnx_ir as ir

from ice_onnx.rewriter.core import AttentionCore
from ice_onnx.rewriter.rules import FAMILIES

# Ops between attention's probabilities and their product with V that keep them what they are
# (BLOOM: Cast then Reshape to 3-D; DeBERTa-v2: Reshape; dropout, masking Wheres).
PROBABILITY_CARRIERS = frozenset({"Cast", "Where", "Dropout", "Reshape", "Identity", "Squeeze", "Unsqueeze",
                                  "Expand", "Transpose"})


def find_cores(model: ir.Model) -> list[AttentionCore]:
    """Every attention block the rules recognise, in graph order."""
    cores: list[AttentionCore] = []
    covered: set[ir.Node] = set()
    for node in model.graph:
        if node in covered:
            continue
        for family in FAMILIES:
            core = family.match(model, node)
            if core is not None:
                cores.append(core)
                covered.update(core.nodes)
                break
    return cores


def unmatched_softmax_blocks(model: ir.Model, cores: list[AttentionCore]) -> list[tuple[ir.Node, str]]:
    """(Softmax, why) for each Softmax feeding a MatMul that no rule took, in the main graph, in
    If / Loop / Scan branches and in local functions: attention the rewriter does not convert."""
    covered = {n for core in cores for n in core.nodes}
    found = [(node, _why_unmatched(model, node)) for node in model.graph
             if _is_attention_softmax(node) and node not in covered]
    for node in model.graph:
        for attribute in node.attributes.values():
            graphs = ([attribute.as_graph()] if attribute.type == ir.AttributeType.GRAPH
                      else list(attribute.as_graphs()) if attribute.type == ir.AttributeType.GRAPHS else [])
            for graph in graphs:
                found += [(inner, f"inside a {node.op_type} branch ({node.name or node.op_type}): not converted")
                          for inner in ir.traversal.RecursiveGraphIterator(graph)
                          if _is_attention_softmax(inner) and inner not in covered]
    for function in model.functions.values():
        found += [(inner, f"inside local function {function.domain}.{function.name}: not converted")
                  for inner in ir.traversal.RecursiveGraphIterator(function) if _is_attention_softmax(inner)]
    return found


def _why_unmatched(model: ir.Model, softmax: ir.Node) -> str:
    scores = softmax.inputs[0]
    if scores.shape is not None and scores.shape.rank() == 3:
        return "Softmax over 3-D scores (heads folded into the batch, [B·H, Sq, Sk]) feeding a MatMul: no rule matches"
    # A rule whose pattern fits around the product but whose check refuses it knows why.
    for product in _products_fed(softmax.outputs[0], depth=4):
        for family in FAMILIES:
            refusal = getattr(family, "refusal", None)
            reason = refusal(model, product) if refusal else None
            if reason:
                return f"{family.FAMILY} form, refused: {reason}"
    return "Softmax feeding a MatMul that no rule matches"


def _is_attention_softmax(node: ir.Node) -> bool:
    return node.op_type == "Softmax" and node.domain in ("", "ai.onnx") and any(_products_fed(node.outputs[0], depth=4))


def _products_fed(value: ir.Value, depth: int):
    """The MatMul / Einsum nodes `value` reaches directly or through up to `depth` carriers."""
    for user, _ in value.uses():
        if user.op_type in ("MatMul", "Einsum"):
            yield user
        elif depth > 0 and user.op_type in PROBABILITY_CARRIERS:
            yield from _products_fed(user.outputs[0], depth - 1)
