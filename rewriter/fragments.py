"""Pattern fragments the rules share: each matches every spelling of one harmless variation.

Exporters put variations around an attention core (a transposed key, a scaled value, a
no-op Cast, a NaN guard). Rather than rewriting the graph before matching (which would
touch nodes outside attention blocks), each fragment matches all spellings of one thing
and binds what the AttentionCore needs; the functions after them read those bindings.
Scale values are read from constants here, or left for the mask analysis (masks.py) to
compute by running the graph when they are built from shapes
(`Sqrt(Div(1, Sqrt(Cast(Shape(q)[-1]))))`).
"""

from __future__ import annotations

import numpy as np
from onnxscript.rewriter import pattern

from ice_onnx.rewriter.core import ScaleFactor
from ice_onnx.rewriter.static_values import constant_array, constant_scalar


def transposed_key(op, key):
    """Kᵀ as exporters build it: from K in [B, H, S, D] (directly, or through a 3-D
    [B·H, S, D] transpose as dynamo's SDPA decomposition does), from [B, S, H, D], or Kᵀ itself
    laid out [B, H, D, S] by the projection."""
    through_3d = op.Reshape(op.Transpose(op.Reshape(key, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE)
    return pattern.OrValue(
        [
            op.Transpose(key, perm=[0, 1, 3, 2]),
            through_3d,
            op.Transpose(key, perm=[0, 2, 3, 1]),
            key,  # already [B, H, D, S] (SqueezeBERT's Reshape of a Conv): checked 4-D by the rule
        ],
        tag_var="key_layout",
        tag_values=["BHSD", "BHSD", "BSHD", "BHDS"],
    )


def repeated_kv(op, name: str):
    """K or V, possibly repeated to the query heads by Unsqueeze(axis 2) -> Expand -> Reshape.

    Binds `<name>` to the tensor that feeds attention and, when repeated, `<name>_kv`
    to the un-repeated [B, Hkv, S, D] original (the contract takes it as is)."""
    original = pattern.Var(f"{name}_kv")
    axis = pattern.Var(f"{name}_repeat_axis")  # checked by check_constants: Constants come in many spellings
    repeated = op.Reshape(op.Expand(op.Unsqueeze(original, axis), pattern.ANY_VALUE), pattern.ANY_VALUE)
    return pattern.OrValue([repeated, pattern.Var(name)], tag_var=f"{name}_repeated", tag_values=[True, False])


def optionally_scaled(op, x, scale_name: str):
    """x, x·s or x/s, binding `<scale_name>` and the tag `<scale_name>_op`."""
    scale = pattern.Var(scale_name)
    return pattern.OrValue(
        [op.Mul(x, scale), op.Div(x, scale), x],
        tag_var=f"{scale_name}_op",
        tag_values=["Mul", "Div", None],
    )


def optionally_cast(op, x, tag: str):
    """x, or x through one or two Casts (a float32 Softmax in a float16 model, a no-op Cast)."""
    # Every OrValue gets a tag: onnxscript 0.7 cannot commute an untagged one.
    return pattern.OrValue([op.Cast(op.Cast(x)), op.Cast(x), x], tag_var=tag, tag_values=[2, 1, 0])


def optionally_softcapped(op, scores):
    """scores, or cap·tanh(scores / cap) (Gemma 2's logit soft-capping, ONNX Attention's softcap
    body), the division also written as a product with 1 / cap, or a bare tanh: a cap of 1,
    whose division and product an exporter folds away (dynamo does). Binds `softcap_in`,
    `softcap_out`."""
    inner, outer = pattern.Var("softcap_in"), pattern.Var("softcap_out")
    return pattern.OrValue(
        [op.Mul(op.Tanh(op.Div(scores, inner)), outer), op.Mul(op.Tanh(op.Mul(scores, inner)), outer),
         op.Tanh(scores), scores],
        tag_var="softcap_op",
        tag_values=["Div", "Mul", "bare", None],
    )


def softcap(bindings: dict) -> tuple[float, str | None]:
    """(the cap bound by `optionally_softcapped`, 0 without one; why it does not fit, or None)."""
    how = bindings.get("softcap_op")
    if how is None:
        return 0.0, None
    if how == "bare":
        return 1.0, None
    inner, outer = constant_scalar(bindings.get("softcap_in")), constant_scalar(bindings.get("softcap_out"))
    if inner is None or outer is None or not np.isfinite(outer) or outer <= 0 or inner == 0:
        return 0.0, "the score cap is not one positive constant"
    divisor = inner if how == "Div" else 1.0 / inner
    if abs(divisor - outer) > 1e-6 * outer:  # float32 rounding of 1 / cap
        return 0.0, "tanh(s / a)·b with a != b: not a soft cap"
    return float(outer), None


def row_guarded(op, probabilities):
    """Softmax output, optionally with the rows that see no key set to 0: NaN rows (a softmax over
    -inf only), or, as the ONNX Attention function body does, rows whose bias (`guard_bias`) is all -inf."""
    empty = op.Equal(op.ReduceMax(pattern.Var("guard_bias"), pattern.Var("row_axes")), pattern.Var("row_fill"))
    return pattern.OrValue(
        [op.Where(op.IsNaN(probabilities), pattern.Var("nan_fill"), probabilities),
         op.Where(empty, pattern.Var("nan_fill"), probabilities), probabilities],
        tag_var="row_guard",
        tag_values=["nan", "bias", None],
    )


def check_constants(bindings: dict) -> str | None:
    """Why the constants bound by the fragments above do not fit, or None."""
    for name in ("key", "value"):
        if bindings.get(f"{name}_repeated"):
            axis = constant_array(bindings.get(f"{name}_repeat_axis"))
            if axis is None or axis.size != 1 or int(axis.reshape(())) != 2:
                return f"{name} is unsqueezed on an axis other than 2: not a head repeat"
    guard = bindings.get("row_guard")
    if guard and constant_scalar(bindings.get("nan_fill")) != 0.0:
        return "the empty-row guard does not fill with 0"
    if guard == "bias":
        axes = constant_array(bindings.get("row_axes"))
        if axes is None or axes.size != 1 or int(axes.reshape(())) != -1 or constant_scalar(bindings.get("row_fill")) != -np.inf:
            return "the empty-row guard is not 'every key of the row is -inf'"
    return None


def scale_factors(bindings: dict, names: list[str]) -> list[ScaleFactor]:
    """The ScaleFactors bound by `optionally_scaled` fragments called with `names`."""
    factors = []
    for name in names:
        how = bindings.get(f"{name}_op")
        if how is not None:
            factors.append(ScaleFactor(bindings[name], divides=how == "Div"))
    return factors
