"""What a block's mask means, found by evaluating it rather than by reading its graph.

Exporters build masks in dozens of ways (LessOrEqual on Ranges, triangular
constants, Trilu, vmapped index functions, Gather/Expand of `attention_mask`,
`Where(m, 0, -inf)`, `(1 - m) * -10000` ...). Instead of a pattern per spelling,
the subgraph that computes each block's mask terms (and any scale built from
shapes) is cut out of the model and run in ONNX Runtime on a few probe inputs:
small shapes, two batches, contiguous left and right padding. The values are then
compared with the two standard meanings:

- causal: query i sees key j iff j <= i + Sk - Sq (bottom-right aligned);
- key padding: key j of batch b is visible iff `P[b, j] != 0` for a 2-D graph
  input P (the attention mask).

A block whose mask is exactly "causal", "padding" or "both" on every probe gets
`is_causal=1` and a compact [B, 1, 1, Sk] bool mask made from P, so its S×S mask
construction becomes dead and is removed.

Small probes cannot see a pattern that changes only past a larger length: a sliding
window of 4096 keys is plain causal up to 4096 tokens. Every integer constant the mask
subgraph compares or computes positions with is such a possible threshold, so the mask
is also probed just past the largest one (a "long" probe). A causal mask limited to the
last W keys there is a "sliding-window" mask (the contract's `sliding_window` attribute);
a threshold too large to probe past leaves the mask unproven: "general". Anything else is passed through
unchanged ("general"); a float term that is not just 0 / blocking is a score
bias ("bias"): the ranking by q·k is not the ranking by score, so the block is
made always-exact.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
import onnx_ir as ir

from ice_onnx.rewriter.canonicalize import constant_array, constant_scalar
from ice_onnx.rewriter.core import OP_DEFINED_TERMS, AttentionCore, MaskTermKind

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


class MaskKind:
    NONE = "none"
    PADDING = "padding"
    CAUSAL = "causal"
    BOTH = "both"
    GENERAL = "general"
    BIAS = "bias"
    WINDOW = "sliding-window"  # causal, limited to the last `window` keys (and padding)
    # A float term adds NaN or +inf to some scores: those softmax rows are NaN (0 behind a NaN
    # guard), which no mask of the contract reproduces. Left unconverted.
    NOT_FINITE = "not-finite"


@dataclasses.dataclass
class MaskPlan:
    kind: str
    padding_input: str | None = None  # graph input P of a compact key-padding mask
    note: str | None = None  # why a mask could not be analysed
    window: int | None = None  # WINDOW: keys j with i + Sk - Sq - window < j are visible


@dataclasses.dataclass
class Analysis:
    masks: list[MaskPlan]
    scales: list[float | None]  # product of the scale factors; None if not a constant
    note: str | None = None


def analyze(model: ir.Model, cores: list[AttentionCore]) -> Analysis:
    """The mask plan and scale of every core, probing the model once for all of them."""
    targets = _probe_targets(cores)
    limits = [position_limits(_probed_terms(core)) for core in cores]
    long_length = min(max((threshold for threshold, _ in limits), default=0) + 2, LONG_PROBE_LIMIT)
    probes, note = _run_probes(model, targets, long_length) if targets else ([], None)
    masks, shorter = [], {}
    for core, (threshold, table_limit) in zip(cores, limits):
        core_probes = probes
        if table_limit is not None and table_limit + 2 < long_length and not _terms_broadcast(core, probes):
            # Past a table the mask reads, its own terms disagree in shape (GPT-Neo's [1, 1, 64, 64]
            # causal buffer sliced to the keys): the model cannot run there either. Probed at the
            # table's extent instead, the longest it runs.
            if table_limit not in shorter:
                shorter[table_limit] = _run_probes(model, targets, table_limit + 2)[0]
            core_probes, threshold = shorter[table_limit], min(threshold, table_limit)
        masks.append(_classify(core, core_probes, note, threshold))
    scales = [_scale(core, probes) for core in cores]
    return Analysis(masks, scales, note)


def _terms_broadcast(core: AttentionCore, probes: list[Probe]) -> bool:
    return all(_allowed(core, probe)[0] is not None for probe in probes if core.mask_terms)


# --- probing -----------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    inputs: dict[str, np.ndarray]
    values: dict[str, np.ndarray]


def _probed_terms(core: AttentionCore) -> list[ir.Value]:
    return [term.value for term in core.mask_terms if term.kind not in OP_DEFINED_TERMS]


def _probe_targets(cores: list[AttentionCore]) -> list[ir.Value]:
    targets: dict[str, ir.Value] = {}
    for core in cores:
        for value in _probed_terms(core):
            targets[value.name] = value
        for factor in core.scale_factors:
            if constant_scalar(factor.value) is None and not factor.runtime:
                targets[factor.value.name] = factor.value
    return list(targets.values())


def _run_probes(model: ir.Model, targets: list[ir.Value], long_length: int) -> tuple[list[Probe], str | None]:
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
        return [], f"mask subgraph does not load in ONNX Runtime: {_first_line(exc)}"
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
            failure = f"probe run failed: {_first_line(exc)}"
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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --- classification ----------------------------------------------------------------------


def _allowed(core: AttentionCore, probe: Probe) -> tuple[np.ndarray | None, bool]:
    """(which keys each query may see, whether a term is a score bias) for one probe."""
    allowed = None
    is_bias = False
    for term in core.mask_terms:
        if term.kind in OP_DEFINED_TERMS:
            continue  # key lengths are [B, 1, 1, Sk] by definition: cannot make a padding mask anything else
        values = np.asarray(probe.values[term.value.name])
        if term.key_padding_2d:
            values = values[:, None, None, :]
        if term.kind is MaskTermKind.ADDITIVE:
            blocked = values <= BLOCKING
            if not np.all(blocked | (values == 0)):
                is_bias = True
            keep = ~blocked
        else:
            keep = values.astype(bool) if term.kind is MaskTermKind.KEEP else ~values.astype(bool)
        if allowed is not None:
            try:
                np.broadcast_shapes(allowed.shape, keep.shape)
            except ValueError:  # the terms disagree on this probe (a table shorter than the keys)
                return None, is_bias
        allowed = keep if allowed is None else allowed & keep
    return allowed, is_bias


def _adds_nan_or_inf(core: AttentionCore, probe: Probe) -> bool:
    """Whether a float term adds NaN or +inf to a score on this probe (-inf is a blocking value)."""
    for term in core.mask_terms:
        if term.kind is MaskTermKind.ADDITIVE:
            values = np.asarray(probe.values[term.value.name])
            if np.issubdtype(values.dtype, np.floating) and (np.isnan(values).any() or np.isposinf(values).any()):
                return True
    return False


def _classify(core: AttentionCore, probes: list[Probe], note: str | None, threshold: int) -> MaskPlan:
    if not core.mask_terms:
        return MaskPlan(MaskKind.CAUSAL if core.is_causal else MaskKind.NONE)
    if any(term.kind is MaskTermKind.BAND for term in core.mask_terms):
        return MaskPlan(MaskKind.GENERAL)  # a pattern the attributes cannot say: an explicit mask
    if all(term.kind is MaskTermKind.KEY_LENGTHS for term in core.mask_terms):
        return MaskPlan(MaskKind.BOTH if core.is_causal else MaskKind.PADDING)
    if not probes:
        return MaskPlan(MaskKind.GENERAL, note=note)
    if any(_adds_nan_or_inf(core, probe) for probe in probes):
        return MaskPlan(MaskKind.NOT_FINITE)
    per_probe = [_allowed(core, probe) for probe in probes]
    if any(allowed is None for allowed, _ in per_probe):
        return MaskPlan(MaskKind.GENERAL, note="the mask's terms do not broadcast together on a probe: "
                                               "passed through unchanged")
    if any(is_bias for _, is_bias in per_probe):
        return MaskPlan(MaskKind.BIAS)
    if any(term.kind is MaskTermKind.KEY_LENGTHS for term in core.mask_terms):
        return MaskPlan(MaskKind.GENERAL)  # the lengths are not probed: keep every term as is
    key_lengths = {allowed.shape[-1] for allowed, _ in per_probe}
    if max(key_lengths) < threshold + 2 and len(key_lengths) > 1:  # a static length is seen whole
        return MaskPlan(MaskKind.GENERAL, note=f"the mask compares positions with {threshold}: not probed "
                                               f"that far (limit {LONG_PROBE_LIMIT}), passed through unchanged")
    windows = [None, *sorted({w for allowed, _ in per_probe if (w := _window(allowed)) is not None})]
    for causal, source in _hypotheses(core, probes[0]):
        for window in windows if (causal or core.is_causal) and core.rows_are_positions else [None]:
            if all(_fits(allowed, probe, causal, source, window) for (allowed, _), probe in zip(per_probe, probes)):
                causal = causal or core.is_causal
                if window is not None:
                    return MaskPlan(MaskKind.WINDOW, padding_input=source, window=window)
                if source is None:
                    return MaskPlan(MaskKind.CAUSAL if causal else MaskKind.NONE)
                return MaskPlan(MaskKind.BOTH if causal else MaskKind.PADDING, padding_input=source)
    return MaskPlan(MaskKind.GENERAL)


def _hypotheses(core: AttentionCore, probe: Probe):
    """(causal, padding source) forms to test. A compact form from input P claims the mask reads no
    other input's values (and none at all without P): a mask input itself is never "none"."""
    read = cone(_probed_terms(core), through_shapes=False).inputs
    if not read:
        sources = [None]
    elif len(read) == 1 and probe.inputs[next(iter(read))].ndim == 2:
        sources = list(read)
    else:
        return
    # A causal op may still carry a causal mask (And is idempotent); folded query rows are not positions.
    causal_forms = (False, True) if core.rows_are_positions else (False,)
    for source in sources:
        for causal in causal_forms:
            yield causal, source


def _as_4d(allowed: np.ndarray) -> np.ndarray | None:
    return allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape) if allowed.ndim <= 4 else None


def _window(allowed: np.ndarray) -> int | None:
    """W when the last query of the first batch row (never padded) sees only its W latest keys."""
    allowed = _as_4d(allowed)
    if allowed is None or allowed.size == 0:
        return None
    last_row = allowed[0, 0, -1]
    visible = int(last_row.sum())
    return visible if 0 < visible < last_row.shape[-1] else None


def _fits(allowed: np.ndarray, probe: Probe, causal: bool, source: str | None, window: int | None = None) -> bool:
    allowed = _as_4d(allowed)
    if allowed is None:
        return False
    sq, sk = allowed.shape[2], allowed.shape[3]
    expected = np.ones((1, 1, sq, sk), dtype=bool)
    if causal or window is not None:
        if sq == 1 and sk > 1:
            return False  # the probe cannot tell which query row this is
        newest = np.arange(sq)[:, None] + (sk - sq)  # the latest key query i may see (bottom-right)
        keys = np.arange(sk)[None, :]
        if causal:
            expected = expected & (keys <= newest)
        if window is not None:
            expected = expected & (keys > newest - window)
    if source is not None:
        padding = probe.inputs[source] != 0
        if padding.shape[1] != sk or allowed.shape[0] not in (1, padding.shape[0]):
            return False
        expected = expected & padding[:, None, None, :]
    try:
        shape = np.broadcast_shapes(allowed.shape, expected.shape)
    except ValueError:
        return False
    return bool(np.array_equal(np.broadcast_to(allowed, shape), np.broadcast_to(expected, shape)))


def _scale(core: AttentionCore, probes: list[Probe]) -> float | None:
    """The product of the scale factors known before the model runs (runtime ones are applied by the graph)."""
    if core.scale is not None:
        return core.scale
    scale = 1.0
    for factor in core.scale_factors:
        if factor.runtime:
            continue
        value = constant_scalar(factor.value)
        if value is None:
            seen = {float(np.asarray(p.values[factor.value.name]).reshape(-1)[0]) for p in probes
                    if np.asarray(p.values[factor.value.name]).size == 1}
            if len(seen) != 1 or len(probes) < 2:
                return None
            value = seen.pop()
        scale = scale / value if factor.divides else scale * value
    return scale
