"""Running the subgraph that computes the blocks' mask terms and scales, on a few probe inputs.

The subgraph is cut out of the model (`_slice`) and run in ONNX Runtime on small
shapes, two batches, contiguous left and right padding; then, when its constants hold
a position threshold past those lengths (a sliding window of 4096 keys is plain causal
below 4096 tokens), once more just past the largest one: a "long" probe.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
import onnx_ir as ir

from ice_onnx.errors import first_line
from ice_onnx.rewriter.cone import cone
from ice_onnx.rewriter.static_values import constant_array

# An additive value at or below this blocks a key (exp underflows to exactly 0 in float32).
BLOCKING = -1e4
# Dimension values given to the symbolic dims of the probe inputs, one list per probe.
PROBE_DIMS = ([2, 5, 3, 4, 6, 7, 8, 9], [3, 7, 2, 6, 4, 5, 8, 9])
# Ops through which a constant can be a position threshold of a mask (a window, an offset).
THRESHOLD_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Min", "Max", "Clip", "Less", "LessOrEqual",
                           "Greater", "GreaterOrEqual", "Equal", "Range", "Trilu"})
# Larger constants are sentinels (int32 / int64 limits, dtype minima), not lengths.
THRESHOLD_SENTINEL = 2 ** 31 - 1
# The longest sequence a long probe runs at (its masks hold about LONG_PROBE_LIMIT² elements).
LONG_PROBE_LIMIT = 8192


@dataclasses.dataclass
class Probe:
    inputs: dict[str, np.ndarray]
    values: dict[str, np.ndarray]


def run_probes(model: ir.Model, targets: list[ir.Value], long_length: int) -> tuple[list[Probe], str | None]:
    """The small probes (the first strategy that runs them all), then, when the masks hold a
    position threshold past their lengths, one long probe (missing if it does not run)."""
    import onnxruntime as ort

    probe_model, graph_inputs = _slice(model, targets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # failed probe strategies are expected: stay quiet
    try:
        session = ort.InferenceSession(probe_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any ORT failure means "cannot analyse"
        return [], f"mask subgraph does not load in ONNX Runtime: {first_line(exc, 200)}"
    names = [t.name for t in targets]
    every_input = list(model.graph.inputs)

    def run(dims: list[int], strategy: str, seed: int) -> Probe:
        # Roles (tokens, mask, cache) are assigned over all the model's inputs: the
        # token input often has no path to a mask, yet it tells which length is S.
        every_feed = _feeds(every_input, dims, strategy, seed=seed)
        feeds = {value.name: every_feed[value.name] for value in graph_inputs}
        outputs = session.run(names, feeds)
        return Probe(feeds, {t.name: output for t, output in zip(targets, outputs)})

    failure = None
    # Sequence dims all equal first: a model without a KV cache is only meaningful with
    # Sq == Sk even when the exporter gave the two lengths different symbols.
    for strategy in ("equal", "kv_cache", "distinct"):
        try:
            probes = [run(dims, strategy, seed) for seed, dims in enumerate(PROBE_DIMS)]
        except Exception as exc:  # noqa: BLE001
            failure = f"probe run failed: {first_line(exc, 200)}"
            continue
        if long_length > SMALL_PROBE_LENGTH:
            # A model with a cache is probed long through its past (few queries, many keys).
            for long_strategy in dict.fromkeys(["kv_cache", strategy] if _has_cache(every_input) else [strategy]):
                try:
                    probes.append(run(_long_dims(long_strategy, long_length), long_strategy, len(probes)))
                    break
                except Exception:  # noqa: BLE001 - the classification then says what is not verified
                    continue
        return probes, None
    return [], failure


# The key length every small probe strategy reaches (thresholds up to 2 below it are seen).
SMALL_PROBE_LENGTH = max(dims[1] for dims in PROBE_DIMS)


def _long_dims(strategy: str, length: int) -> list[int]:
    """Probe dims whose keys reach `length`: through the past for "kv_cache" (3 new tokens),
    otherwise every sequence dim at least `length`. Batch 1 (the small probes test padding)."""
    if strategy == "kv_cache":
        return [1, 3, length, *range(length + 1, length + 6)]
    return [1, *range(length, length + 7)]


def _has_cache(inputs: list[ir.Value]) -> bool:
    return any(v.shape is not None and v.shape.rank() == 4 and v.dtype is not None and v.dtype.is_floating_point()
               and _symbol(v.shape[2]) for v in inputs)


def position_limits(values: list[ir.Value]) -> tuple[int, int | None]:
    """(threshold, table limit) of the subgraph computing `values`. The threshold: the largest
    integral constant (below the sentinels) it does arithmetic or comparisons with, or the extent
    of a table it reads, less 2: the length past which its pattern may change. The table limit:
    the smallest such extent less 2 (None without a table), past which a table sliced to the keys
    stops matching their length."""
    largest = 0
    found, read = cone(values), cone(values, through_shapes=False)
    # A table the mask reads (GPT-Neo's [1, 1, P, P] causal buffers, sliced by positions) holds its
    # pattern up to its extent.
    tables = [table.shape.dims for table in read.initializers.values() if table.shape is not None]
    tables += [node.attributes["value"].as_tensor().shape.dims for node in read.nodes
               if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes]
    extents = [max(dims) for dims in tables if len(dims) >= 2 and np.prod(dims) > 64]
    for node in found.nodes:
        if node.op_type not in THRESHOLD_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for operand in node.inputs:
            array = constant_array(operand)
            if array is None or array.size > 64 or not np.issubdtype(array.dtype, np.number):
                continue
            magnitudes = np.abs(array[np.isfinite(array)].astype(np.float64))
            # Float positions are rare, float blocking values (-10000, finfo.min) common: a float
            # constant counts only below the blocking magnitude.
            limit = THRESHOLD_SENTINEL if np.issubdtype(array.dtype, np.integer) else -BLOCKING
            candidates = magnitudes[(magnitudes == np.round(magnitudes)) & (magnitudes < limit)]
            largest = max(largest, int(candidates.max(initial=0)))
    if extents:
        return max(largest, max(extents) - 2), min(extents) - 2
    return largest, None


def _slice(model: ir.Model, targets: list[ir.Value]) -> tuple[onnx.ModelProto, list[ir.Value]]:
    """A model computing `targets` from the graph inputs they depend on (nothing else)."""
    needed = cone(targets)
    nodes = [_in_float(ir.serde.serialize_node(n)) for n in model.graph if n in needed.nodes]
    inputs = [v for v in model.graph.inputs if v.name in needed.inputs]
    graph = onnx.helper.make_graph(
        [node for pair in nodes for node in pair],
        "ice_onnx_mask_probe",
        [_in_float(ir.serde.serialize_value(v)) for v in inputs],
        [onnx.helper.make_empty_tensor_value_info(target.name) for target in targets],
        # Materialised: the probe runs from memory, where external data could not be found.
        initializer=[_in_float(ir.serde.serialize_tensor(ir.tensor(v.const_value.numpy(), name=v.name)))
                     for v in needed.initializers.values()],
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    probe = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    return probe, inputs


BFLOAT16 = onnx.TensorProto.BFLOAT16


def _in_float(proto):
    """The probe's copy of a node, input or initializer with bfloat16 computed in float32 (ONNX
    Runtime's CPU provider has no bfloat16 arithmetic, its Python API no bfloat16 arrays). A Cast to
    bfloat16 keeps its rounding: it becomes Cast to bfloat16 then back to float32."""
    if isinstance(proto, onnx.TensorProto):
        if proto.data_type != BFLOAT16:
            return proto
        return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(proto).astype(np.float32), proto.name)
    if isinstance(proto, onnx.ValueInfoProto):
        if proto.type.tensor_type.elem_type == BFLOAT16:
            proto.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return proto
    for attribute in proto.attribute:  # Constant / ConstantOfShape values
        if attribute.type == onnx.AttributeProto.TENSOR:
            attribute.t.CopyFrom(_in_float(attribute.t))
    to = next((a.i for a in proto.attribute if a.name == "to"), None)
    if proto.op_type != "Cast" or to != BFLOAT16:
        return [proto]
    rounded = f"{proto.output[0]}/bfloat16"
    back = onnx.helper.make_node("Cast", [rounded], [proto.output[0]], to=onnx.TensorProto.FLOAT)
    proto.output[0] = rounded
    return [proto, back]


_DIM_EXPRESSION = re.compile(r"^[\w\s+\-*()]+$")


def _feeds(inputs: list[ir.Value], dim_values: list[int], strategy: str, seed: int) -> dict[str, np.ndarray]:
    """Probe inputs whose symbolic dims are given values by `strategy`:

    - "equal": every sequence-like dim the same (Sq == Sk, the only valid choice
      for a model without KV cache, whatever symbols the exporter used);
    - "kv_cache": past length P on the cache tensors' axis 2, S for the first 2-D
      input (the tokens), S + P for other 2-D inputs with their own symbol (the mask);
    - "distinct": every symbol its own value.
    Symbols written as sums ('past_seq+seq') are computed from their parts.
    """
    rng = np.random.default_rng(1234 + seed)
    batch, seq, past = dim_values[0], dim_values[1], dim_values[2]
    names: dict[str, int] = {}
    for value in inputs:  # roles first: batch, past length, token length, mask length
        dims = [_symbol(d) for d in value.shape or []]
        if len(dims) >= 2 and dims[0]:
            names.setdefault(dims[0], batch)
        if strategy == "kv_cache" and len(dims) == 4 and value.dtype is not None and value.dtype.is_floating_point() and dims[2]:
            names.setdefault(dims[2], past)
    if strategy == "kv_cache":
        sequences = [_symbol(v.shape[1]) for v in inputs if v.shape is not None and v.shape.rank() == 2]
        for position, symbol in enumerate(s for s in sequences if s and _evaluate_dim(s, {}) is None):
            names.setdefault(symbol, seq if position == 0 else seq + past)

    def dim_value(dim, axis: int, value: ir.Value) -> int:
        if isinstance(dim, int):
            return dim
        name = _symbol(dim) or f"{value.name}:{axis}"
        if name not in names:
            derived = _evaluate_dim(name, names)
            if derived is not None:
                return derived
            names[name] = dim_values[1 + len(names) % (len(dim_values) - 1)] if strategy == "distinct" else seq
        return names[name]

    # Plain symbols before sums of them.
    order = sorted(range(len(inputs)), key=lambda i: any(_is_sum(d) for d in inputs[i].shape or []))
    shapes = {i: [dim_value(d, axis, inputs[i]) for axis, d in enumerate(inputs[i].shape or [])] for i in order}
    return {value.name: _probe_values(value, shapes[i], rng) for i, value in enumerate(inputs)}


def _symbol(dim) -> str | None:
    if dim is None or isinstance(dim, int):
        return None
    text = str(dim)
    return None if text in ("", "None") else text


def _is_sum(dim) -> bool:
    symbol = _symbol(dim)
    return symbol is not None and any(op in symbol for op in "+-*")


def _evaluate_dim(expression: str, names: dict[str, int]) -> int | None:
    """Dims like 's0 + s1' (dynamo) in terms of dims already assigned."""
    if not _DIM_EXPRESSION.match(expression) or not any(op in expression for op in "+-*"):
        return None
    try:
        return int(eval(expression, {"__builtins__": {}}, dict(names)))  # noqa: S307 - restricted charset
    except Exception:  # noqa: BLE001
        return None


def _probe_values(value: ir.Value, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    dtype = value.dtype.numpy() if value.dtype not in (None, ir.DataType.BFLOAT16) else np.float32
    if np.issubdtype(dtype, np.floating) and len(shape) != 2:
        return rng.standard_normal(shape).astype(dtype)
    if len(shape) == 2:  # attention-mask-like: contiguous padding, first row unpadded
        batch, length = shape
        rows = np.ones(shape, dtype=bool)
        for b in range(1, batch):
            pad = int(rng.integers(1, max(2, length - 1)))
            if rng.random() < 0.5:
                rows[b, :pad] = False
            else:
                rows[b, length - pad :] = False
        return rows.astype(dtype)
    if len(shape) == 1:
        return np.arange(shape[0]).astype(dtype)  # positions
    return np.ones(shape, dtype=dtype)
