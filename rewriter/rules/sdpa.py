"""Decomposed scaled dot-product attention, as TorchScript and dynamo exporters write it.

    MatMul(q[·s], Kᵀ[·s]) [Cast] [·s | /s] [c·tanh(· / c)] [Where(mask, ·, -big)] [+ bias] [+ mask]
      [Where(mask, ·, -big)] [Cast]
      -> Softmax(axis=-1) [Cast] [IsNaN guard | empty-row guard] [Cast] -> MatMul(·, V)

with Kᵀ from K in [B, H, S, D] or [B, S, H, D] and K/V optionally repeated to the
query heads (grouped-query attention).
"""

from __future__ import annotations

import numpy as np
from onnxscript.rewriter import pattern

from ice_onnx.rewriter import fragments, static_values
from ice_onnx.rewriter.core import AttentionCore, Layout, Masking, MaskTerm, MaskTermKind, Scores

FAMILY = "decomposed-sdpa"
SCALES = ["query_scale", "key_scale", "score_scale"]
# A Where fill at or below this blocks a key as surely as -inf (exp underflows to 0).
BLOCKING_FILL = -1e4


def _pattern(op):
    query = fragments.optionally_scaled(op, pattern.Var("query"), "query_scale")
    key_t = fragments.optionally_scaled(op, fragments.transposed_key(op, fragments.repeated_kv(op, "key")), "key_scale")
    scores = fragments.optionally_scaled(op, fragments.optionally_cast(op, op.MatMul(query, key_t), "product_casts"),
                                     "score_scale")
    scores = fragments.optionally_softcapped(op, scores)
    scores = _optionally_where_masked(op, scores, "early_")  # GPT-Neo: the causal Where before the mask add
    for name in ("bias_a", "bias_b"):
        scores = pattern.OrValue(
            [op.Add(scores, pattern.Var(name)), scores], tag_var=f"{name}_added", tag_values=[True, False]
        )
    scores = _optionally_where_masked(op, scores, "")
    probabilities = fragments.optionally_cast(op, op.Softmax(fragments.optionally_cast(op, scores, "score_casts")),
                                          "softmax_casts")
    probabilities = fragments.optionally_cast(op, fragments.row_guarded(op, probabilities), "probability_casts")
    return op.MatMul(probabilities, fragments.repeated_kv(op, "value"))


def _optionally_where_masked(op, scores, prefix: str):
    """scores, Where(keep, scores, fill) or Where(drop, fill, scores); tag `<prefix>where_mask`."""
    return pattern.OrValue(
        [
            op.Where(pattern.Var(f"{prefix}keep"), scores, pattern.Var(f"{prefix}keep_fill")),
            op.Where(pattern.Var(f"{prefix}drop"), pattern.Var(f"{prefix}drop_fill"), scores),
            scores,
        ],
        tag_var=f"{prefix}where_mask",
        tag_values=["keep", "drop", None],
    )


def _check(context, **bindings) -> pattern.MatchResult:
    result = pattern.MatchResult()
    softmax = next(n for n in context.nodes if n.op_type == "Softmax")
    attribute = softmax.attributes.get("axis")
    default_axis = -1 if _opset(context) >= 13 else 1  # before opset 13 Softmax flattened from axis 1
    axis = attribute.as_int() if attribute is not None else default_axis
    rank = softmax.inputs[0].shape.rank() if softmax.inputs[0].shape is not None else None
    if axis != -1 and not (rank is not None and axis == rank - 1):
        return result.fail(f"Softmax over axis {axis}, not the key axis")
    problem = fragments.check_constants(bindings) or fragments.softcap(bindings)[1]
    if problem:
        return result.fail(problem)
    for prefix in ("early_", ""):
        where = bindings.get(f"{prefix}where_mask")
        if where is not None:
            fill = static_values.constant_scalar(bindings.get(f"{prefix}{where}_fill"))
            if fill is None or not fill <= BLOCKING_FILL:  # `not <=`: a NaN fill is no blocking value either
                return result.fail("Where fill is not a blocking constant")
    if bindings.get("key_layout") in ("BSHD", "BHDS") and bindings.get("key_repeated"):
        return result.fail(f"repeated K in {bindings['key_layout']} layout")
    if bindings.get("key_layout") == "BHDS":  # any right operand: only a 4-D one with a 4-D query is Kᵀ
        ranks = [static_values.static_dims(bindings.get(name)) for name in ("query", "key", "value")]
        if any(dims is None or len(dims) != 4 for dims in ranks):
            return result.fail("the product's right operand is not a 4-D Kᵀ")
    added = [bindings[name] for name in ("bias_a", "bias_b") if bindings.get(f"{name}_added")]
    if bindings.get("row_guard") == "bias" and added != [bindings.get("guard_bias")]:
        return result.fail("the empty-row guard reads another bias than the one the scores add")
    return result


def _opset(context) -> int:
    return context.model.opset_imports.get("", 17)


def to_core(match) -> AttentionCore:
    b = match.bindings
    terms = [MaskTerm(MaskTermKind.ADDITIVE, b[name]) for name in ("bias_a", "bias_b") if b.get(f"{name}_added")]
    for prefix in ("early_", ""):  # a blocked score stays blocked whatever is added to it later
        if b.get(f"{prefix}where_mask") == "keep":
            terms.append(MaskTerm(MaskTermKind.KEEP, b[f"{prefix}keep"]))
        elif b.get(f"{prefix}where_mask") == "drop":
            terms.append(MaskTerm(MaskTermKind.DROP, b[f"{prefix}drop"]))
    return AttentionCore(
        family=FAMILY,
        output=match.outputs[0],
        query=b["query"],
        key=b["key_kv"] if b.get("key_repeated") else b["key"],
        value=b["value_kv"] if b.get("value_repeated") else b["value"],
        nodes=list(match.nodes),
        layout=Layout(key_perm={"BSHD": [0, 2, 1, 3], "BHDS": [0, 1, 3, 2]}.get(b.get("key_layout"))),
        scores=Scores(factors=fragments.scale_factors(b, SCALES), softcap=fragments.softcap(b)[0]),
        masking=Masking(
            terms=terms,
            empty_rows_zero=_guard_can_fire(b, terms),
            rows_are_positions=not _reshaped_from_4d(b["query"]),
        ),
        unsupported=None
        if b.get("key_repeated") == b.get("value_repeated")
        else "only one of K and V is repeated to the query heads",
    )


def _guard_can_fire(b: dict, terms: list[MaskTerm]) -> bool:
    """Whether the empty-row guard zeroes anything: an IsNaN guard finds NaN rows only if a mask
    term can make every score of a row -inf. Masks that are Where(·, 0, finfo.min) alone (the
    dynamo exporter's SDPA) never do: an all-blocked row is then the softmax of equal scores,
    uniform over all keys, which is the contract's mean of V."""
    guard = b.get("row_guard")
    if guard != "nan":
        return bool(guard)
    return not all(term.kind == MaskTermKind.ADDITIVE and _finite_where(term.value) for term in terms)


def _finite_where(value) -> bool:
    """value is Where(condition, a, b) with both branches finite constants."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Where" or producer.domain not in ("", "ai.onnx"):
        return False
    branches = [static_values.constant_array(branch) for branch in producer.inputs[1:]]
    return all(branch is not None and np.isfinite(branch).all() for branch in branches)


def _reshaped_from_4d(value) -> bool:
    producer = value.producer()
    if producer is None or producer.op_type != "Reshape" or producer.domain not in ("", "ai.onnx"):
        return False
    dims = static_values.static_dims(producer.inputs[0])
    return dims is not None and len(dims) == 4


# Every commuted spelling (Add(mask, scores) as well as Add(scores, mask), ...).
PATTERNS = pattern.RewriteRule(_pattern, lambda op, **_: None, _check, name=FAMILY).commute()


def refusal(model, node) -> str | None:
    """Why the pattern, matched around `node` (the product with V), fails its check; None when it
    does not match at all (or matches: then `match` takes it)."""
    if node.op_type != "MatMul":
        return None
    tracer = pattern.MatchingTracer()
    for candidate in PATTERNS:
        candidate.match(model, model.graph, node, check_nodes_are_removable=False, tracer=tracer)
    for matches in tracer.best_matches_map.values():
        for info in matches:
            if info.status == pattern.MatchStatus.CONDITION_FAILED and info.match_result.reason:
                return info.match_result.reason
    return None


def match(model, node) -> AttentionCore | None:
    if node.op_type != "MatMul":
        return None
    for candidate in PATTERNS:
        # Intermediate values may have other users (a Shape of K feeding Expand...): the
        # pipeline removes only what becomes dead, so removability is not required here.
        found = candidate.match(model, model.graph, node, check_nodes_are_removable=False)
        if found:
            return to_core(found)
    return None
