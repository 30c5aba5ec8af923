"""The pipeline: load -> match attention -> analyse masks -> replace -> remove dead nodes -> check -> save.

`convert_model` / `inspect_model` work on an in-memory onnx-ir model and know
nothing about files; `convert_file` / `inspect_file` add safe reading and
atomic writing (model_io). Every function returns a ConversionReport.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from ice_onnx.commands.params import INT64_MAX  # node attributes are int64; the CLI bounds its options alike
from ice_onnx.custom_ops import contract
from ice_onnx.errors import first_line
from ice_onnx.rewriter import canonicalize, kv_cache, model_io
from ice_onnx.rewriter.core import AttentionCore, MaskTermKind
from ice_onnx.rewriter.masks import Analysis, MaskKind, MaskPlan, analyze
from ice_onnx.rewriter.report import BlockRecord, ConversionReport
from ice_onnx.rewriter.rules import FAMILIES
from ice_onnx.rewriter.rules.onnx_attention import hidden_size

COMPACT_MASK_KINDS = (MaskKind.PADDING, MaskKind.BOTH, MaskKind.WINDOW)
EMITTED_ATTRIBUTES = ("scale", "is_causal", "top_k", "exact_below", "seed", "compensate")
# Emitted only where a block needs them (nodes without stay as short as before).
EMITTED_WHEN_SET = ("softcap", "sliding_window", "empty_rows")


class NoAttentionError(Exception):
    """The model has no attention block to convert."""


@dataclasses.dataclass
class ConvertOptions:
    top_k: int = contract.Attributes.top_k
    exact_below: int = contract.Attributes.exact_below
    seed: int = contract.Attributes.seed
    compensate: int = contract.Attributes.compensate
    layers: BlockSelection | frozenset[int] | None = None  # block indices to convert (`in`); None = all
    # Per-block settings (a tuning plan): block index -> {"top_k", "exact_below", "compensate"}.
    plan: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)

    def for_block(self, index: int) -> dict[str, int]:
        settings = {"top_k": self.top_k, "exact_below": self.exact_below, "compensate": self.compensate}
        settings.update(self.plan.get(index, {}))
        return settings


PLAN_KEYS = ("top_k", "exact_below", "compensate")
# The smallest value of each plan key and of a block index.
PLAN_MINIMUM = {"index": 0, "top_k": 1, "exact_below": 0, "compensate": 0}


def parse_plan(text: str) -> dict[int, dict[str, int]]:
    """A plan file: {"blocks": [{"index": 0, "top_k": 64}, {"index": 3, "exact_below": 2147483647}, ...]}.

    Values are JSON integers within int64 (compensate 0 or 1); anything else is a ValueError."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise ValueError(f"bad plan: not JSON ({first_line(exc, 120)})") from None
    blocks = document.get("blocks") if isinstance(document, dict) else None
    if not isinstance(blocks, list):
        raise ValueError('bad plan: expected {"blocks": [{"index": 0, ...}, ...]}')
    plan = {}
    for entry in blocks:
        if not isinstance(entry, dict) or "index" not in entry:
            raise ValueError("bad plan: every block is an object with an index")
        unknown = set(entry) - {"index", *PLAN_KEYS}
        if unknown:
            raise ValueError(f"bad plan: unknown plan keys {sorted(unknown)}")
        settings = {key: _plan_integer(key, entry[key]) for key in PLAN_KEYS if key in entry}
        plan[_plan_integer("index", entry["index"])] = settings
    return plan


def _plan_integer(key: str, value) -> int:
    highest = 1 if key == "compensate" else INT64_MAX
    if isinstance(value, bool) or not isinstance(value, int) or not PLAN_MINIMUM[key] <= value <= highest:
        raise ValueError(f"bad plan: {key} must be an integer from {PLAN_MINIMUM[key]} to {highest}, "
                         f"not {str(value)[:40]}")
    return value


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Block indices as ranges (first, last), last None for open-ended: membership is tested
    without building the set, so `0-100000000000` costs nothing."""

    ranges: tuple[tuple[int, int | None], ...]

    def __contains__(self, index: int) -> bool:
        return any(first <= index and (last is None or index <= last) for first, last in self.ranges)


def parse_layers(spec: str) -> BlockSelection:
    """'0-3,6,9-' style block selection (0-based, in graph order; 'N-' = N and after)."""
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        start, dash, end = part.partition("-")
        try:
            first = int(start) if start else 0
            last = (int(end) if end else None) if dash else first
        except ValueError:
            raise ValueError(f"bad layer selection {part[:40]!r} (use e.g. 0-3,6,9-)") from None
        if first < 0 or (last is not None and last < first):
            raise ValueError(f"bad layer range {part[:40]!r}")
        ranges.append((first, last))
    return BlockSelection(tuple(ranges))


# --- matching ------------------------------------------------------------------------


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


def _unmatched_softmax_blocks(model: ir.Model, cores: list[AttentionCore]) -> list[tuple[ir.Node, str]]:
    """(Softmax, why) for each Softmax feeding a MatMul that no rule took, in the main graph, in
    If / Loop / Scan branches and in local functions: attention the rewriter does not convert."""
    covered = {n for core in cores for n in core.nodes}
    found = [(node, _why_unmatched(node)) for node in model.graph if _is_attention_softmax(node) and node not in covered]
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


def _why_unmatched(softmax: ir.Node) -> str:
    scores = softmax.inputs[0]
    if scores.shape is not None and scores.shape.rank() == 3:
        return "Softmax over 3-D scores (heads folded into the batch, [B·H, Sq, Sk]) feeding a MatMul: no rule matches"
    return "Softmax feeding a MatMul that no rule matches"


# Ops between attention's probabilities and their product with V that keep them what they are
# (BLOOM: Cast then Reshape to 3-D; DeBERTa-v2: Reshape; dropout, masking Wheres).
PROBABILITY_CARRIERS = frozenset({"Cast", "Where", "Dropout", "Reshape", "Identity", "Squeeze", "Unsqueeze",
                                  "Expand", "Transpose"})


def _is_attention_softmax(node: ir.Node) -> bool:
    return node.op_type == "Softmax" and node.domain in ("", "ai.onnx") and _feeds_matmul(node.outputs[0], depth=4)


def _feeds_matmul(value: ir.Value, depth: int) -> bool:
    for user, _ in value.uses():
        if user.op_type in ("MatMul", "Einsum") or (depth > 0 and user.op_type in PROBABILITY_CARRIERS
                                                    and _feeds_matmul(user.outputs[0], depth - 1)):
            return True
    return False


# --- the in-memory API -------------------------------------------------------------------


def inspect_model(model: ir.Model, name: str = "model", options: ConvertOptions | None = None) -> ConversionReport:
    """The report `convert_model` would give, without changing the model."""
    report = _plan(model, name, options or ConvertOptions())[0]
    report.dry_run = True
    return report


def convert_model(model: ir.Model, name: str = "model", options: ConvertOptions | None = None) -> ConversionReport:
    """Replace every convertible attention block of `model` (in place) with IceKNNAttention."""
    options = options or ConvertOptions()
    report, plans = _plan(model, name, options)
    if not report.blocks:
        raise NoAttentionError(f"{name}: no attention block found")
    pre_dead = {n for n in model.graph if _is_dead(model.graph, n)}
    emitter = _Emitter(model, options)
    for record, (core, mask, scale) in zip(report.blocks, plans):
        if record.replaced:
            record.node = emitter.replace(core, mask, scale, options.for_block(record.index))
    emitter.redirect()
    _remove_dead(model.graph, pre_dead)
    if report.replaced:
        model.opset_imports[contract.DOMAIN] = contract.VERSION
    return report


def _plan(model: ir.Model, name: str, options: ConvertOptions):
    cores = find_cores(model)
    analysis: Analysis = analyze(model, cores)
    report = ConversionReport(model=name)
    if analysis.note:
        report.notes.append(f"masks not analysed: {analysis.note}")
    plans = []
    for index, (core, mask, scale) in enumerate(zip(cores, analysis.masks, analysis.scales)):
        record = _record(index, core, mask, scale)
        reason = core.unsupported or _unsupported(core, mask, scale, model.opset_imports.get("", 1))
        if reason:
            record.reason = reason
        elif options.layers is not None and index not in options.layers:
            record.reason = "not selected (--layers)"
        else:
            record.replaced = True
            record.always_exact = mask.kind == MaskKind.BIAS
            notes = ["score bias: ranking by q·k is not ranking by score, kept exact"] if record.always_exact else []
            notes += [mask.note] if mask.note else []
            notes += [f"sliding window {mask.window}"] if mask.kind == MaskKind.WINDOW else []
            notes += [f"sliding window {core.sliding_window}"] if core.sliding_window else []
            notes += [f"softcap {core.softcap:g}"] if core.softcap else []
            notes += [f"scores {'divided' if f.divides else 'multiplied'} by graph input {f.value.name!r} "
                      "at run time" for f in core.scale_factors if f.runtime]
            record.reason = "; ".join(notes) or None
        report.blocks.append(record)
        plans.append((core, mask, scale))
    for softmax, reason in _unmatched_softmax_blocks(model, cores):
        report.blocks.append(BlockRecord(
            index=len(report.blocks), family="unknown", output=softmax.outputs[0].name or "",
            nodes=[softmax.name or ""], reason=reason,
        ))
        plans.append((None, None, None))
    return report, plans


def _record(index: int, core: AttentionCore, mask: MaskPlan, scale: float | None) -> BlockRecord:
    # A folded query ([B, Hkv, n_rep·S, D]) has the model's query heads before its Reshape.
    query = core.query if core.rows_are_positions else core.query.producer().inputs[0]
    q_shape = _dims(query, core.query_perm)
    k_shape = _dims(core.key, core.key_perm)
    head_dim = _static(q_shape, 3)
    if core.packed_heads and core.projection is not None:
        head_dim = core.projection[2][0] // core.packed_heads[0]
    elif core.packed_heads and hidden_size(core.query):
        head_dim = hidden_size(core.query) // core.packed_heads[0]
    return BlockRecord(
        index=index,
        family=core.family,
        output=core.output.name or "",
        nodes=[n.name or n.op_type for n in core.nodes],
        q_heads=core.q_heads or _static(q_shape, 1),
        kv_heads=core.kv_heads or _static(k_shape, 1),
        head_dim=head_dim,
        scale=scale,
        mask=mask.kind,
    )


def _dims(value: ir.Value, perm: list[int] | None):
    dims = canonicalize.static_dims(value)
    if dims is None or len(dims) != 4:
        return None
    return [dims[p] for p in perm] if perm else dims


def _static(dims, axis: int) -> int | None:
    return dims[axis] if dims is not None and isinstance(dims[axis], int) else None


# Element types computed in float32 by the op, with Casts around it: float16 / bfloat16
# models keep their type outside the block, and float32 is at least as precise inside.
CAST_TO_FLOAT = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
ATTENTION_TYPES = (ir.DataType.FLOAT, *CAST_TO_FLOAT)


def _unsupported(core: AttentionCore, mask: MaskPlan, scale: float | None, opset: int) -> str | None:
    if mask.kind == MaskKind.NOT_FINITE:
        return "the mask adds NaN or +inf to scores (their softmax rows are NaN): not expressible as a contract mask"
    for role, value in (("query", core.query), ("key", core.key), ("value", core.value), ("output", core.output)):
        dtype = element_type(value)
        if dtype is None:
            return f"the {role}'s element type is unknown"
        if dtype not in ATTENTION_TYPES:
            return f"{dtype.name.lower()} {role}: IceKNNAttention computes in float32 (float16/bfloat16 are cast)"
    for factor in core.scale_factors:
        if factor.runtime and not _is_scalar(factor.value):
            return f"the score scale from graph input {factor.value.name!r} is not one number"
    if scale is None:
        return "the score scale is not a constant"
    if not math.isfinite(scale):
        return f"the score scale is {scale}"
    if core.scale is None and scale <= 0:  # computed from the graph; the contract reads <= 0 as 1/√D
        return f"the score scale is {scale:g} (the contract takes only positive scales)"
    if core.kv_cache is not None and opset < 13:
        return "KV cache emission needs opset 13 or later"
    return None


def _is_scalar(value: ir.Value) -> bool:
    return value.shape is not None and all(dim == 1 for dim in value.shape)


# --- emitting ----------------------------------------------------------------------------


class _Emitter:
    """Builds the IceKNNAttention nodes; shares one compact mask per padding input."""

    def __init__(self, model: ir.Model, options: ConvertOptions):
        self.graph = model.graph
        self.options = options
        self.compact_masks: dict[str, ir.Value] = {}
        self.knn_may_pay: dict[tuple, ir.Value] = {}
        self.prefixes: set[str] = set()
        self.results: list[tuple[ir.Value, ir.Value]] = []  # (replaced output, its new value)  # one If condition per (total length, past length, ...)
        self.inputs = {v.name: v for v in model.graph.inputs}
        self.opset = model.opset_imports.get("", 17)

    def replace(self, core: AttentionCore, mask: MaskPlan, scale: float, settings: dict[str, int]) -> str:
        """Emits the block's new nodes; returns the IceKNNAttention node's name."""
        anchor = core.anchor
        prefix = self._prefix(anchor)
        new_nodes: list[ir.Node] = []
        add = _adder(f"{prefix}/ice", new_nodes)

        query, key, value = core.query, core.key, core.value
        if core.projection is not None:  # packed QKV weights: project and split
            weights, bias, sizes = core.projection
            packed = add("MatMul", [core.query, weights]) if weights is not None else core.query
            if bias is not None:
                packed = add("Add", [packed, bias])
            query, key, value = self._split(prefix, packed, sizes, new_nodes)
        if core.input_bias is not None:
            bias, sizes = core.input_bias
            biases = self._split(prefix, bias, sizes, new_nodes)
            query, key, value = (add("Add", [x, b]) for x, b in zip((query, key, value), biases))
        if core.packed_heads:  # [B, S, H·D] -> [B, H, S, D]
            q_heads, kv_heads = core.packed_heads
            q, k, v = (self._split_heads(add, x, h) for x, h in
                       ((query, q_heads), (key, kv_heads), (value, kv_heads)))
        else:
            q = add("Transpose", [core.query], perm=core.query_perm) if core.query_perm else core.query
            k = add("Transpose", [core.key], perm=core.key_perm) if core.key_perm else core.key
            v = add("Transpose", [core.value], perm=core.value_perm) if core.value_perm else core.value
        for factor in core.scale_factors:  # a scale fed at run time scales Q: (s·q)·k = s·(q·k)
            if factor.runtime:
                q = add("Div" if factor.divides else "Mul", [q, factor.value])
        presents, key_lengths, cache_mask = [], core.key_lengths, None
        if core.kv_cache is not None and core.kv_cache.seqlens_k is not None:
            q, k, v, cache_mask, key_lengths, presents = kv_cache.grouped(add, core.kv_cache, q, k, v, core.packed_heads)
        elif core.kv_cache is not None:
            k, v, presents = kv_cache.append(add, core.kv_cache, k, v)
        # Cast by the source's type: the Transposes just added carry none yet.
        inputs = [_as_float(add, x, element_type(source)) for x, source in ((q, core.query), (k, core.key), (v, core.value))]
        attn_mask = cache_mask if cache_mask is not None else self._mask(core, mask, add, q, k)
        if attn_mask is not None or key_lengths is not None:
            inputs.append(attn_mask)  # None: the optional input left out
        if key_lengths is not None:
            inputs.append(key_lengths)
        is_causal = core.is_causal or mask.kind in (MaskKind.CAUSAL, MaskKind.BOTH, MaskKind.WINDOW)
        windows = [w for w in (core.sliding_window, mask.window if mask.kind == MaskKind.WINDOW else 0) if w]
        # Rows left empty by a window are the kernel's to find (a windowed block runs exactly anyway);
        # otherwise a guard outside the node zeroes them, and the node keeps its kNN path.
        zero_rows_in_node = core.empty_rows_zero and (bool(windows) or core.key_lengths is not None)
        attributes = contract.Attributes(
            scale=float(scale),
            is_causal=int(is_causal),
            top_k=settings["top_k"],
            exact_below=contract.ALWAYS_EXACT if mask.kind == MaskKind.BIAS else settings["exact_below"],
            seed=self.options.seed,
            compensate=settings["compensate"],
            softcap=float(core.softcap),
            sliding_window=min(windows, default=0),  # two windows: a query sees what both allow
            empty_rows="zero" if zero_rows_in_node else "mean",
        )
        # Only what the rewriter decides: index parameters keep the kernel's defaults.
        defaults = contract.Attributes().as_node_attributes()
        chosen = {name: value for name, value in attributes.as_node_attributes().items()
                  if name in EMITTED_ATTRIBUTES or (name in EMITTED_WHEN_SET and value != defaults[name])}
        ice = ir.node(contract.OP_TYPE, inputs, chosen, domain=contract.DOMAIN,
                      name=f"{prefix}/IceKNNAttention")
        new_nodes.append(ice)
        output = ice.outputs[0]
        output.type = ir.TensorType(ir.DataType.FLOAT)  # the contract's only output type
        output.shape = ir.Shape([None] * 4)  # [B, Hq, Sq, Dv]
        if core.empty_rows_zero and attn_mask is not None and not zero_rows_in_node:
            zero = add("Constant", [], value=ir.tensor(0.0, dtype=ir.DataType.FLOAT))
            rows = _rows_with_a_key(add, attn_mask, is_causal, *inputs[:2], opset=self.opset)
            output = add("Where", [rows, output, zero])
        output_type = element_type(core.output)
        if output_type != ir.DataType.FLOAT:  # back to the model's float16 / bfloat16
            output = add("Cast", [output], to=output_type)
        if core.packed_heads:  # [B, H, Sq, Dv] -> [B, Sq, H·Dv]
            merged_shape = add("Constant", [], value=ir.tensor([0, 0, -1], dtype=ir.DataType.INT64))
            output = add("Reshape", [add("Transpose", [output], perm=[0, 2, 1, 3]), merged_shape])
        output.type, output.shape = ir.TensorType(output_type), core.output.shape
        results = [(core.output, output), *presents]  # the op's outputs, now computed in the graph
        for old, new in presents:
            new.type, new.shape = old.type, old.shape
        if core.kv_cache is not None and core.kv_cache.past_key is not None:
            new_nodes, results = self._where_knn_may_pay(core, prefix, new_nodes, results, settings)
        self.graph.insert_before(anchor, new_nodes)
        self.results += results
        return ice.name

    def redirect(self) -> None:
        """Point the users of every replaced output at its new value, once all blocks are emitted: a
        block may read an earlier block's output (its Q), which must not go stale in between."""
        for old, new in self.results:
            _replace_value(self.graph, old, new)

    def _where_knn_may_pay(self, core: AttentionCore, prefix: str, new_nodes: list[ir.Node], results, settings):
        """A fused op with a KV cache reads (GQA: writes in place) its cache faster than the new nodes
        copy it, and where the contract runs exactly anyway (decoding, short prompts) IceKNNAttention
        has nothing to gain. So the new nodes run only where kNN may pay, by the contract's kNN
        conditions on the real keys (keys >= exact_below, (Sq·Hq/Hkv)² >= 16·keys), or while the past
        is empty; elsewhere the original op does: If(then: new nodes, else: the op)."""
        anchor = core.anchor
        for index, node in enumerate(new_nodes):  # names unique across scopes (the If's branches)
            for number, value in enumerate(node.outputs):
                value.name = value.name or f"{prefix}/ice/{index}:{number}"
        then_branch = ir.Graph([], [new for _, new in results], nodes=new_nodes, name=f"{prefix}/ice/then")
        original = ir.Node(anchor.domain, anchor.op_type, list(anchor.inputs), list(anchor.attributes.values()),
                           num_outputs=len(anchor.outputs), name=f"{prefix}/original")
        kept = [original.outputs[anchor.outputs.index(old)] for old, _ in results]
        for (old, _), value in zip(results, kept):
            value.name, value.type, value.shape = f"{old.name}/original", old.type, old.shape
        else_branch = ir.Graph([], kept, nodes=[original], name=f"{prefix}/ice/else")
        condition, may_pay = self._knn_may_pay(core, prefix, settings["exact_below"])
        branch = ir.node("If", [may_pay], {"then_branch": then_branch, "else_branch": else_branch},
                         num_outputs=len(results), name=f"{prefix}/ice/If")
        for (old, _), value in zip(results, branch.outputs):
            value.type, value.shape = old.type, old.shape
        return [*condition, branch], [(old, value) for (old, _), value in zip(results, branch.outputs)]

    def _knn_may_pay(self, core: AttentionCore, prefix: str, exact_below: int) -> tuple[list[ir.Node], ir.Value]:
        """(nodes to add, bool scalar) for `_where_knn_may_pay`; computed once for the layers that share it."""
        cache, query_axis = core.kv_cache, 1 if core.packed_heads else 2
        heads = core.packed_heads or (_static(_dims(core.query, None), 1), _static(_dims(core.key, None), 1))
        groups = heads[0] // heads[1] if None not in heads else None
        key = (_length_symbol(core.query, query_axis), _length_symbol(cache.past_key, 3 if cache.stacked else 2),
               cache.total_length.name if cache.total_length is not None else None, groups, exact_below)
        if key in self.knn_may_pay:
            return [], self.knn_may_pay[key]
        nodes: list[ir.Node] = []
        add = _adder(f"{prefix}/ice/knn_may_pay", nodes)

        seq, keys, buffer = kv_cache.step_lengths(add, cache, core.query, query_axis)
        if groups is None:  # query heads per kv head, from the [B, H, S, D] shapes at run time
            groups = add("Div", [kv_cache.dim(add, core.query, 1), kv_cache.dim(add, core.key, 1)])
        queries = add("Mul", [seq, groups if isinstance(groups, ir.Value) else _int64(add, groups)])
        may_pay = add("And", [add("GreaterOrEqual", [keys, _int64(add, exact_below)]),
                              add("GreaterOrEqual", [add("Mul", [queries, queries]), add("Mul", [keys, _int64(add, 16)])])])
        self.knn_may_pay[key] = add("Or", [may_pay, add("Equal", [buffer, _int64(add, 0)])])
        return nodes, self.knn_may_pay[key]

    def _prefix(self, anchor: ir.Node) -> str:
        """A name prefix for a block's new nodes, unique in the model (ONNX Runtime wants unique node
        names; exported attention nodes may have none)."""
        prefix = anchor.name or "attention"
        if prefix in self.prefixes:
            prefix = f"{prefix}#{len(self.prefixes)}"
        self.prefixes.add(prefix)
        return prefix

    @staticmethod
    def _split_heads(add, value: ir.Value, heads: int) -> ir.Value:
        shape = add("Constant", [], value=ir.tensor([0, 0, heads, -1], dtype=ir.DataType.INT64))
        return add("Transpose", [add("Reshape", [value, shape])], perm=[0, 2, 1, 3])

    def _split(self, prefix: str, packed: ir.Value, sizes: list[int], new_nodes: list) -> list[ir.Value]:
        sizes_value = ir.tensor(sizes, dtype=ir.DataType.INT64)
        if self.opset >= 13:
            constant = ir.node("Constant", [], {"value": sizes_value}, name=f"{prefix}/ice/split_sizes_{len(new_nodes)}")
            split = ir.node("Split", [packed, constant.outputs[0]], {"axis": -1}, num_outputs=3,
                            name=f"{prefix}/ice/Split_{len(new_nodes)}")
            new_nodes += [constant, split]
        else:
            split = ir.node("Split", [packed], {"axis": -1, "split": sizes}, num_outputs=3,
                            name=f"{prefix}/ice/Split_{len(new_nodes)}")
            new_nodes.append(split)
        return list(split.outputs)

    def _mask(self, core: AttentionCore, mask: MaskPlan, add, query: ir.Value, key: ir.Value) -> ir.Value | None:
        if mask.kind in (MaskKind.NONE, MaskKind.CAUSAL) or (mask.kind == MaskKind.WINDOW and mask.padding_input is None):
            return None  # causality and the window are attributes
        if mask.kind in COMPACT_MASK_KINDS and mask.padding_input is not None:
            return self._compact(mask.padding_input)
        def given(term, blocked):  # the graph's mask tensor, padded to the keys when the op pads it
            value = _as_float(add, term.value, element_type(term.value)) if blocked == -np.inf else term.value
            rank = term.value.shape.rank() if term.value.shape is not None else None
            if core.mask_padded_to_keys and rank and not _same_last_dim(term.value, core.key, core.kv_cache):
                value = _padded_to_keys(add, value, rank, key, blocked)
            return value

        keep = [self._key_padding(add, t.value) if t.key_padding_2d else given(t, False)
                for t in core.mask_terms if t.kind is MaskTermKind.KEEP]
        keep += [self._from_lengths(add, t.value, key) for t in core.mask_terms if t.kind is MaskTermKind.KEY_LENGTHS]
        keep += [_band(add, t, query, key) for t in core.mask_terms if t.kind is MaskTermKind.BAND]
        keep += [add("Not", [t.value]) for t in core.mask_terms if t.kind is MaskTermKind.DROP]
        additive = [given(t, -np.inf) for t in core.mask_terms if t.kind is MaskTermKind.ADDITIVE]
        combined_keep = _fold(add, "And", keep)
        combined_add = _fold(add, "Add", additive)
        if combined_add is None:  # typed: what reads the mask (the empty-row guard) tells bool from float
            return _typed(combined_keep, ir.DataType.BOOL)
        if combined_keep is None:
            return _typed(combined_add, ir.DataType.FLOAT)
        blocked = add("Constant", [], value=ir.tensor([float("-inf")], dtype=ir.DataType.FLOAT))
        return _typed(add("Where", [combined_keep, combined_add, blocked]), ir.DataType.FLOAT)

    def _from_lengths(self, add, lengths: ir.Value, key: ir.Value) -> ir.Value:
        """[B, 1, 1, Sk] bool: key j of batch b is real iff j < lengths[b]."""
        limits = add("Unsqueeze", [add("Cast", [lengths], to=ir.DataType.INT64), _int64(add, [1])])
        return self._key_padding(add, add("Less", [_positions(add, key), limits]))

    @staticmethod
    def _key_padding(add, mask: ir.Value) -> ir.Value:
        axes = add("Constant", [], value=ir.tensor([1, 2], dtype=ir.DataType.INT64))
        return add("Unsqueeze", [add("Cast", [mask], to=ir.DataType.BOOL), axes])

    def _compact(self, source: str) -> ir.Value:
        """[B, 1, 1, Sk] bool from the 2-D attention-mask input: built once, before its first user."""
        if source not in self.compact_masks:
            as_bool = ir.node("Cast", [self.inputs[source]], {"to": ir.DataType.BOOL}, name=f"ice/key_padding/{source}/Cast")
            axes = ir.node("Constant", [], {"value": ir.tensor([1, 2], dtype=ir.DataType.INT64)}, name=f"ice/key_padding/{source}/axes")
            unsqueeze = ir.node("Unsqueeze", [as_bool.outputs[0], axes.outputs[0]], name=f"ice/key_padding/{source}/Unsqueeze")
            nodes = [as_bool, axes, unsqueeze]
            unsqueeze.outputs[0].name = f"ice_key_padding_{source}"
            unsqueeze.outputs[0].dtype = ir.DataType.BOOL
            self.graph.insert_before(next(iter(self.graph)), nodes)
            self.compact_masks[source] = unsqueeze.outputs[0]
        return self.compact_masks[source]


def _adder(prefix: str, nodes: list[ir.Node]):
    """add(op_type, inputs, **attributes) -> output: a new node named under `prefix`, appended to `nodes`."""
    def add(op_type: str, inputs, _domain: str = "", **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, domain=_domain, name=f"{prefix}/{op_type}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    return add


def _length_symbol(value: ir.Value, axis: int) -> str:
    """The name of `value`'s dim `axis` when symbolic (values sharing it have equal lengths), else the value's."""
    dim = value.shape[axis] if value.shape is not None and value.shape.rank() > axis else None
    return f"dim:{dim.value}" if isinstance(dim, ir.SymbolicDim) and dim.value else f"value:{value.name}"


def _same_last_dim(mask: ir.Value, key: ir.Value, cache) -> bool:
    """Whether the mask's last dim is visibly the keys' length (no cache, equal dims or symbols)."""
    if cache is not None or mask.shape is None or key.shape is None or key.shape.rank() < 2:
        return False
    ours, theirs = mask.shape[-1], key.shape[2 if key.shape.rank() == 4 else 1]
    return ours == theirs if isinstance(ours, int) or isinstance(theirs, int) else (ours.value is not None and ours.value == theirs.value)


def _padded_to_keys(add, mask: ir.Value, rank: int, key: ir.Value, blocked) -> ir.Value:
    """`mask` (of `rank`) padded at the end of its last axis to the keys' length with `blocked` (False / -inf)."""
    missing = add("Sub", [add("Gather", [add("Shape", [key]), _int64(add, [2])], axis=0),
                          add("Gather", [add("Shape", [mask]), _int64(add, [rank - 1])], axis=0)])
    pads = add("Concat", [_int64(add, [0] * (2 * rank - 1)), missing], axis=0)
    fill = ir.tensor(np.array(blocked, dtype=bool if blocked is False else np.float32))
    return add("Pad", [mask, pads, add("Constant", [], value=fill)])


def _int64(add, values) -> ir.Value:
    return add("Constant", [], value=ir.tensor(values, dtype=ir.DataType.INT64))


def _positions(add, value: ir.Value) -> ir.Value:
    """[S] int64 0 .. S - 1 for the sequence axis (2) of a [B, H, S, D] value."""
    length = add("Gather", [add("Shape", [value]), _int64(add, 2)], axis=0)
    return add("Range", [_int64(add, 0), length, _int64(add, 1)])


def _band(add, term, query: ir.Value, key: ir.Value) -> ir.Value:
    """Bool [Sq, Sk] (or [B, 1, Sq, Sk] with lengths): key j within `term.band` of query i's position."""
    position = add("Unsqueeze", [_positions(add, query), _int64(add, [1])])  # [Sq, 1]
    if term.aligned != "top-left":
        queries = add("Gather", [add("Shape", [query]), _int64(add, [2])], axis=0)
        if term.aligned == "lengths":
            ends = add("Reshape", [add("Cast", [term.value], to=ir.DataType.INT64), _int64(add, [-1, 1, 1, 1])])
        else:
            ends = add("Gather", [add("Shape", [key]), _int64(add, [2])], axis=0)
        position = add("Add", [position, add("Sub", [ends, queries])])
    keys, (left, right) = _positions(add, key), term.band
    bounds = []
    if right is not None:
        bounds.append(add("LessOrEqual", [keys, add("Add", [position, _int64(add, right)])]))
    if left is not None:
        bounds.append(add("GreaterOrEqual", [keys, add("Sub", [position, _int64(add, left)])]))
    return _fold(add, "And", bounds)


def _typed(value: ir.Value, dtype: ir.DataType) -> ir.Value:
    if value.dtype is None:
        value.dtype = dtype
    return value


def _rows_with_a_key(add, mask: ir.Value, causal: bool, query: ir.Value, key: ir.Value, opset: int) -> ir.Value:
    """[..., Sq, 1] bool: whether query i may see any key under `mask` (bool, or float with -inf
    blocking) and, when causal, j <= i + Sk - Sq. Reads the mask once; no Sq×Sk tensor is built."""
    allowed = mask if mask.dtype == ir.DataType.BOOL else add("Not", [add("IsInf", [mask], detect_positive=0)])
    allowed = add("Cast", [allowed], to=ir.DataType.FLOAT)
    # A count, not ReduceMax: ONNX Runtime's symbolic shape inference derives ReduceSum's shape from
    # its axes input, not ReduceMax's (axes an input since opset 18).
    allowed_keys = (add("ReduceSum", [allowed, _int64(add, [-1])], keepdims=1) if opset >= 13
                    else add("ReduceSum", [allowed], axes=[-1], keepdims=1))
    rows = add("Greater", [allowed_keys,
                           add("Constant", [], value=ir.tensor(0.0, dtype=ir.DataType.FLOAT))])
    if not causal:
        return rows
    first = add("ArgMax", [allowed], axis=-1, keepdims=1)  # the first allowed key of each mask row
    lengths = [add("Gather", [add("Shape", [x]), _int64(add, 2)], axis=0) for x in (query, key)]
    newest = add("Add", [_positions(add, query), add("Sub", [lengths[1], lengths[0]])])  # i + Sk - Sq
    return add("And", [rows, add("LessOrEqual", [first, add("Unsqueeze", [newest, _int64(add, [1])])])])


def _as_float(add, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    """`value` (of type `dtype`) as float32, the contract's type: a Cast for float16 / bfloat16."""
    return add("Cast", [value], to=ir.DataType.FLOAT) if dtype in CAST_TO_FLOAT else value


def element_type(value: ir.Value) -> ir.DataType | None:
    """The value's element type; when inference left it unknown (contrib ops, models whose
    inference failed), the nearest floating type among the values computing it: the ops
    attention is built from keep their operands' float type."""
    frontier, seen = [value], set()
    while frontier and len(seen) < 64:  # breadth first, a bounded look upstream
        current = frontier.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.dtype is not None:
            if current is value or current.dtype.is_floating_point():
                return current.dtype
            continue
        producer = current.producer()
        if producer is not None:
            frontier.extend(producer.inputs)
    return None


def _fold(add, op_type: str, values: list[ir.Value]) -> ir.Value | None:
    result = None
    for value in values:
        result = value if result is None else add(op_type, [result, value])
    return result


def _replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every user (and graph output) of `old` at `new`, keeping graph output names."""
    was_output = [i for i, out in enumerate(graph.outputs) if out is old]
    if was_output:
        name = old.name
        old.name = None
        new.name = name
        for i in was_output:
            graph.outputs[i] = new
    ir.convenience.replace_all_uses_with(old, new)


def _is_dead(graph: ir.Graph, node: ir.Node) -> bool:
    outputs = set(graph.outputs)
    return all(not out.uses() and out not in outputs for out in node.outputs)


def _remove_dead(graph: ir.Graph, keep: set[ir.Node]) -> None:
    """Remove nodes left without users by the replacement (not ones that were dead before)."""
    for node in reversed(list(graph)):
        if node not in keep and _is_dead(graph, node):
            graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in graph.outputs and value not in graph.inputs:
            del graph.initializers[name]


# --- files -------------------------------------------------------------------------------


def inspect_file(path: str | os.PathLike, options: ConvertOptions | None = None) -> ConversionReport:
    model, _ = model_io.load(path)
    return inspect_model(model, str(path), options)


def convert_file(
    path: str | os.PathLike,
    output: str | os.PathLike,
    options: ConvertOptions | None = None,
    in_place: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConversionReport:
    """Convert the model at `path` and write it to `output` (atomically, see model_io)."""
    path, output = Path(path), Path(output)
    replaces_input = model_io.check_output(output, path, in_place)
    model, data_files = model_io.load(path)
    report = convert_model(model, str(path), options)
    if not report.replaced:
        raise NoAttentionError(f"{path}: no attention block could be converted")
    _forget_intermediate_shapes(model.graph)

    def validate(written: Path) -> None:
        try:
            model_io.check(written, written.parent)
        except Exception as exc:  # noqa: BLE001
            try:  # an input that is itself inconsistent is a bad model, not a conversion bug
                model_io.check(path, written.parent)
            except Exception as source_problem:  # noqa: BLE001
                raise model_io.ModelFileError(f"{path}: invalid ONNX model ({first_line(source_problem, 200)})") from None
            raise exc

    model_io.save(model, output, data_files, progress, validate=validate,
                  keep=frozenset() if replaces_input else data_files)
    report.output = str(output)
    return report


def _forget_intermediate_shapes(graph: ir.Graph) -> None:
    """Drop the shapes of intermediate values (types stay: ops without inference need them):
    shape inference recomputes them when the file is checked, and stale entries some tools
    write (a [1] constant declared a scalar) would fail it."""
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if not value.is_graph_output() and value.type is not None:
                value.shape = None
