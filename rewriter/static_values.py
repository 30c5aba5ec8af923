"""What a value is known to be before the model runs: its contents when constant, its dims when static."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or Constant output, else None (also for an initializer that is a
    graph input: the caller may feed another value)."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type in ("Cast", "CastLike") and producer.domain in ("", "ai.onnx"):
        # A constant cast to the model's type (float16 exports: Cast(-inf), Cast(√D), CastLike(-inf, x)).
        source = constant_array(producer.inputs[0])
        if producer.op_type == "CastLike":
            to = producer.inputs[1].dtype if len(producer.inputs) > 1 and producer.inputs[1] is not None else None
        else:
            to = ir.DataType(producer.attributes["to"].as_int()) if "to" in producer.attributes else None
        if source is None or to is None or not to.is_floating_point():
            return None
        return source.astype(to.numpy())  # rounded to that type, as the model computes it
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        for attr in producer.attributes.values():
            if attr.name == "value":
                return attr.as_tensor().numpy()
            if attr.name == "value_float":
                return np.array(attr.as_float(), dtype=np.float32)
            if attr.name == "value_int":
                return np.array(attr.as_int(), dtype=np.int64)
    return None


def constant_scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def attribute_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def static_dims(value: ir.Value | None, depth: int = 12) -> list[int | None] | None:
    """The dims of `value` known statically, or None when its rank is unknown: from its shape,
    else through the Transpose / Reshape (with a partly constant target) / elementwise / Concat /
    Slice ops (rotary embedding) that exporters put between a projection and attention
    (TorchScript's Reshapes are built with Concat(Unsqueeze(Gather(Shape)), Constant heads,
    Constant head size))."""
    if value is None:
        return None
    own = list(value.shape) if value.shape is not None else None
    known = [d if isinstance(d, int) else None for d in own] if own is not None else None
    if (known is not None and None not in known) or depth == 0:
        return known
    producer = value.producer()
    derived = None
    if producer is not None and producer.domain in ("", "ai.onnx"):
        if producer.op_type == "Transpose":
            source, perm = static_dims(producer.inputs[0], depth - 1), attribute_ints(producer, "perm")
            if source is not None and perm is not None and len(perm) == len(source):
                derived = [source[p] for p in perm]
        elif producer.op_type == "Reshape" and len(producer.inputs) > 1:
            target = _partial_constant(producer.inputs[1], depth - 1)
            if target is not None:
                derived = _reshaped(static_dims(producer.inputs[0], depth - 1), target)
        elif producer.op_type in ("Mul", "Div", "Add", "Sub", "Neg", "Cast", "Identity"):
            derived = _broadcast([static_dims(x, depth - 1) for x in producer.inputs])
        elif producer.op_type == "Slice":  # rotate_half's halves: the sliced axes become unknown
            derived = _sliced(static_dims(producer.inputs[0], depth - 1), producer.inputs)
        elif producer.op_type == "Concat" and "axis" in producer.attributes:
            derived = _concatenated([static_dims(x, depth - 1) for x in producer.inputs],
                                    producer.attributes["axis"].as_int())
    if known is None:
        return derived
    if derived is None or len(derived) != len(known):
        return known
    return [k if k is not None else d for k, d in zip(known, derived)]


def _broadcast(operands: list[list[int | None] | None]) -> list[int | None] | None:
    """Numpy broadcasting of partly known dims (None when an operand's rank is unknown)."""
    if not operands or any(dims is None for dims in operands):
        return None
    rank = max(len(dims) for dims in operands)
    result = []
    for axis in range(-rank, 0):
        sizes = {dims[axis] for dims in operands if len(dims) >= -axis}
        known = sizes - {None, 1}
        result.append(known.pop() if len(known) == 1 else (1 if sizes == {1} else None))
    return result


def _sliced(source: list[int | None] | None, inputs) -> list[int | None] | None:
    axes = constant_array(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    if axes is None and len(inputs) <= 3:  # no axes input: the first len(starts) axes
        starts = constant_array(inputs[1])
        axes = None if starts is None else np.arange(starts.size)
    if source is None or axes is None:
        return None
    sliced = {int(a) % len(source) for a in axes.reshape(-1)}
    return [None if axis in sliced else dim for axis, dim in enumerate(source)]


def _concatenated(operands: list[list[int | None] | None], axis: int) -> list[int | None] | None:
    ranks = {len(dims) for dims in operands if dims is not None}
    if len(ranks) != 1:
        return None
    rank = ranks.pop()
    axis = axis % rank if -rank <= axis < rank else None
    known = [dims for dims in operands if dims is not None]
    if axis is None:
        return None
    result = []
    for i in range(rank):
        if i == axis:
            sizes = [dims[i] for dims in operands] if len(known) == len(operands) else [None]
            result.append(None if None in sizes else sum(sizes))
        else:
            result.append(next((dims[i] for dims in known if dims[i] is not None), None))
    return result


def _reshaped(source: list[int | None] | None, target: list[int | None]) -> list[int | None]:
    """Reshape's output dims from a partly known target; a -1 is solved when the dims it merges are
    known: the target's leading unknowns (batch, sequence, copied from the input) match the input's."""
    dims = [d if d is not None and d > 0 else None for d in target]
    if target.count(-1) != 1 or source is None:
        return dims
    lead = next((i for i, d in enumerate(target) if d is not None and d > 0 or d == -1), len(target))
    rest_in, rest_out = source[lead:], [d for d in target[lead:] if d != -1]
    if None in rest_in or None in rest_out:
        return dims
    product_in, product_out = int(np.prod(rest_in)), int(np.prod(rest_out))
    if product_out and product_in % product_out == 0:
        dims[target.index(-1)] = product_in // product_out
    return dims


def _partial_constant(value: ir.Value | None, depth: int) -> list[int | None] | None:
    """A 1-D int tensor's elements where they are constants (None elsewhere), or None if its length is unknown."""
    array = constant_array(value)
    if array is not None:
        return [int(x) for x in array.reshape(-1)]
    producer = value.producer() if value is not None else None
    if producer is None or depth == 0 or producer.domain not in ("", "ai.onnx"):
        return None
    if producer.op_type == "Concat":
        parts = [_partial_constant(x, depth - 1) for x in producer.inputs]
        return None if any(p is None for p in parts) else [d for part in parts for d in part]
    if producer.op_type in ("Unsqueeze", "Cast") and producer.inputs[0] is not None:
        scalar = constant_array(producer.inputs[0])
        if producer.inputs[0].shape is not None and producer.inputs[0].shape.rank() == 0 or (
                scalar is not None and scalar.ndim == 0):
            return [int(scalar) if scalar is not None else None]
        if producer.op_type == "Cast":
            return _partial_constant(producer.inputs[0], depth - 1)
    if value.shape is not None and value.shape.rank() == 1 and isinstance(value.shape[0], int):
        return [None] * value.shape[0]
    return None


def bhsd_dims(value: ir.Value, perm: list[int] | None) -> list[int | None] | None:
    """The static dims of a 4-D value brought to [B, H, S, D] by `perm` (None: already there)."""
    dims = static_dims(value)
    if dims is None or len(dims) != 4:
        return None
    return [dims[p] for p in perm] if perm else dims


def static_dim(dims: list[int | None] | None, axis: int) -> int | None:
    return dims[axis] if dims is not None and isinstance(dims[axis], int) else None
