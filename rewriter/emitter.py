"""The one place IceKNNAttention nodes are written: each block's core, mask plan and settings
become the op's inputs in the contract's layout, its attributes, and its output in the model's.

Around the node, in standard ONNX ops: the input projection and head split of fused ops,
a run-time score scale, the KV cache a fused op kept inside (kv_cache.py), the attn_mask
(mask_inputs.py), Casts for float16 / bfloat16, and the empty-row guard of ops whose
masked-out rows output 0. Users of the replaced outputs are redirected only after every
block is emitted (`redirect`).
"""

from __future__ import annotations

import onnx_ir as ir

from ice_onnx.custom_ops import contract
from ice_onnx.rewriter import kv_cache, static_values, surgery
from ice_onnx.rewriter.core import AttentionCore
from ice_onnx.rewriter.dtypes import as_float, element_type
from ice_onnx.rewriter.mask_inputs import MaskInputs, rows_with_a_key
from ice_onnx.rewriter.masks import MaskKind, MaskPlan
from ice_onnx.rewriter.node_builder import Add, adder, int64
from ice_onnx.rewriter.options import ConvertOptions

EMITTED_ATTRIBUTES = ("scale", "is_causal", "top_k", "exact_below", "seed", "compensate")
# Emitted only where a block needs them (nodes without stay as short as before).
EMITTED_WHEN_SET = ("softcap", "sliding_window", "empty_rows")
# Emitted only where the user set them (ConvertOptions, a plan): otherwise the kernel's defaults hold.
GUARD_ATTRIBUTES = ("probe_rows", "max_error")


class Emitter:
    """Builds the IceKNNAttention nodes of one model."""

    def __init__(self, model: ir.Model, options: ConvertOptions):
        self.graph = model.graph
        self.options = options
        self.masks = MaskInputs(model.graph)
        self.knn_may_pay: dict[tuple, ir.Value] = {}  # one If condition per (lengths, heads, exact_below)
        self.prefixes: set[str] = set()
        self.results: list[tuple[ir.Value, ir.Value]] = []  # (replaced output, its new value)
        self.opset = model.opset_imports.get("", 17)

    def replace(self, core: AttentionCore, mask: MaskPlan, scale: float, settings: dict[str, int | float]) -> str:
        """Emits the block's new nodes; returns the IceKNNAttention node's name."""
        anchor = core.anchor
        prefix = self._prefix(anchor)
        new_nodes: list[ir.Node] = []
        add = adder(f"{prefix}/ice", new_nodes)

        q, k, v = self._in_contract_layout(core, prefix, add, new_nodes)
        cache, presents, key_lengths, cache_mask = core.kv_cache, [], core.masking.key_lengths, None
        if cache is not None and cache.seqlens_k is not None:
            q, k, v, cache_mask, key_lengths, presents = kv_cache.grouped(add, cache, q, k, v, core.layout.packed_heads)
        elif cache is not None:
            k, v, presents = kv_cache.append(add, cache, k, v)
        # Cast by the source's type: the Transposes just added carry none yet.
        inputs = [as_float(add, x, element_type(source)) for x, source in ((q, core.query), (k, core.key), (v, core.value))]
        attn_mask = cache_mask if cache_mask is not None else self.masks.build(add, core, mask, q, k)
        if attn_mask is not None or key_lengths is not None:
            inputs.append(attn_mask)  # None: the optional input left out
        if key_lengths is not None:
            inputs.append(key_lengths)
        attributes = self._attributes(core, mask, scale, settings)
        ice = ir.node(contract.OP_TYPE, inputs, _node_attributes(attributes, settings.keys() & set(GUARD_ATTRIBUTES)),
                      domain=contract.DOMAIN, name=f"{prefix}/IceKNNAttention")
        new_nodes.append(ice)
        output = ice.outputs[0]
        output.type = ir.TensorType(ir.DataType.FLOAT)  # the contract's only output type
        output.shape = ir.Shape([None] * 4)  # [B, Hq, Sq, Dv]
        if core.masking.empty_rows_zero and attn_mask is not None and attributes.empty_rows != "zero":
            zero = add("Constant", [], value=ir.tensor(0.0, dtype=ir.DataType.FLOAT))
            rows = rows_with_a_key(add, attn_mask, bool(attributes.is_causal), *inputs[:2], opset=self.opset)
            output = add("Where", [rows, output, zero])
        output = self._in_model_layout(core, add, output)
        results = [(core.output, output), *presents]  # the op's outputs, now computed in the graph
        for old, new in presents:
            new.type, new.shape = old.type, old.shape
        if core.kv_cache is not None and core.kv_cache.past_key is not None:
            new_nodes, results = self._where_knn_may_pay(core, prefix, new_nodes, results, settings)
        self.graph.insert_before(anchor, new_nodes)
        self.results += results
        return ice.name

    def _attributes(self, core: AttentionCore, mask: MaskPlan, scale: float, settings: dict) -> contract.Attributes:
        """The node's attributes: the block's semantics in the contract's terms, and the settings."""
        masking = core.masking
        is_causal = masking.is_causal or mask.kind in (MaskKind.CAUSAL, MaskKind.BOTH, MaskKind.WINDOW)
        windows = [w for w in (masking.sliding_window, mask.window if mask.kind == MaskKind.WINDOW else 0) if w]
        # Rows left empty by a window are the kernel's to find (a windowed block runs exactly anyway);
        # otherwise a guard outside the node zeroes them, and the node keeps its kNN path.
        zero_rows_in_node = masking.empty_rows_zero and (bool(windows) or masking.key_lengths is not None)
        return contract.Attributes(
            scale=float(scale),
            is_causal=int(is_causal),
            top_k=settings["top_k"],
            exact_below=contract.ALWAYS_EXACT if mask.kind == MaskKind.BIAS else settings["exact_below"],
            seed=self.options.seed,
            compensate=settings["compensate"],
            softcap=float(core.scores.softcap),
            sliding_window=min(windows, default=0),  # two windows: a query sees what both allow
            empty_rows="zero" if zero_rows_in_node else "mean",
            **{name: settings[name] for name in GUARD_ATTRIBUTES if name in settings},
        )

    def redirect(self) -> None:
        """Point the users of every replaced output at its new value, once all blocks are emitted: a
        block may read an earlier block's output (its Q), which must not go stale in between."""
        for old, new in self.results:
            surgery.replace_value(self.graph, old, new)

    def _in_contract_layout(self, core: AttentionCore, prefix: str, add: Add, new_nodes: list[ir.Node]):
        """Q, K, V as [B, H, S, D]: projected and split (packed weights), biased, heads split
        (packed heads) or transposed, Q scaled by a scale the model is fed at run time."""
        layout, (query, key, value) = core.layout, (core.query, core.key, core.value)
        if layout.projection is not None:  # packed QKV weights: project and split
            projection = layout.projection
            packed = add("MatMul", [query, projection.weights]) if projection.weights is not None else query
            if projection.bias is not None:
                packed = add("Add", [packed, projection.bias])
            query, key, value = self._split(prefix, packed, projection.sizes, new_nodes)
        if layout.input_bias is not None:
            bias, sizes = layout.input_bias
            biases = self._split(prefix, bias, sizes, new_nodes)
            query, key, value = (add("Add", [x, b]) for x, b in zip((query, key, value), biases))
        if layout.packed_heads:  # [B, S, H·D] -> [B, H, S, D]
            q_heads, kv_heads = layout.packed_heads
            q, k, v = (_split_heads(add, x, h) for x, h in ((query, q_heads), (key, kv_heads), (value, kv_heads)))
        else:  # 4-D already: at most a Transpose each
            q, k, v = (add("Transpose", [x], perm=perm) if perm else x for x, perm in
                       ((query, layout.query_perm), (key, layout.key_perm), (value, layout.value_perm)))
        for factor in core.scores.factors:  # a scale fed at run time scales Q: (s·q)·k = s·(q·k)
            if factor.runtime:
                q = add("Div" if factor.divides else "Mul", [q, factor.value])
        return q, k, v

    @staticmethod
    def _in_model_layout(core: AttentionCore, add: Add, output: ir.Value) -> ir.Value:
        """The op's float32 [B, H, Sq, Dv] output in the replaced value's type and layout."""
        output_type = element_type(core.output)
        if output_type != ir.DataType.FLOAT:  # back to the model's float16 / bfloat16
            output = add("Cast", [output], to=output_type)
        if core.layout.packed_heads:  # [B, H, Sq, Dv] -> [B, Sq, H·Dv]
            merged_shape = add("Constant", [], value=ir.tensor([0, 0, -1], dtype=ir.DataType.INT64))
            output = add("Reshape", [add("Transpose", [output], perm=[0, 2, 1, 3]), merged_shape])
        output.type, output.shape = ir.TensorType(output_type), core.output.shape
        return output

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
        cache, query_axis = core.kv_cache, 1 if core.layout.packed_heads else 2
        heads = core.layout.packed_heads or (static_values.static_dim(static_values.bhsd_dims(core.query, None), 1),
                                      static_values.static_dim(static_values.bhsd_dims(core.key, None), 1))
        groups = heads[0] // heads[1] if None not in heads else None
        key = (_length_symbol(core.query, query_axis), _length_symbol(cache.past_key, 3 if cache.stacked else 2),
               cache.total_length.name if cache.total_length is not None else None, groups, exact_below)
        if key in self.knn_may_pay:
            return [], self.knn_may_pay[key]
        nodes: list[ir.Node] = []
        add = adder(f"{prefix}/ice/knn_may_pay", nodes)

        seq, keys, buffer = kv_cache.step_lengths(add, cache, core.query, query_axis)
        if groups is None:  # query heads per kv head, from the [B, H, S, D] shapes at run time
            groups = add("Div", [kv_cache.dim(add, core.query, 1), kv_cache.dim(add, core.key, 1)])
        queries = add("Mul", [seq, groups if isinstance(groups, ir.Value) else int64(add, groups)])
        may_pay = add("And", [add("GreaterOrEqual", [keys, int64(add, exact_below)]),
                              add("GreaterOrEqual", [add("Mul", [queries, queries]), add("Mul", [keys, int64(add, 16)])])])
        self.knn_may_pay[key] = add("Or", [may_pay, add("Equal", [buffer, int64(add, 0)])])
        return nodes, self.knn_may_pay[key]

    def _prefix(self, anchor: ir.Node) -> str:
        """A name prefix for a block's new nodes, unique in the model (ONNX Runtime wants unique node
        names; exported attention nodes may have none)."""
        prefix = anchor.name or "attention"
        if prefix in self.prefixes:
            prefix = f"{prefix}#{len(self.prefixes)}"
        self.prefixes.add(prefix)
        return prefix

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


def _node_attributes(attributes: contract.Attributes, chosen_by_user) -> dict:
    """Only what the rewriter decides or the user chose: index parameters keep the kernel's defaults."""
    defaults = contract.Attributes().as_node_attributes()
    return {name: value for name, value in attributes.as_node_attributes().items()
            if name in EMITTED_ATTRIBUTES or name in chosen_by_user
            or (name in EMITTED_WHEN_SET and value != defaults[name])}


def _split_heads(add: Add, value: ir.Value, heads: int) -> ir.Value:
    shape = add("Constant", [], value=ir.tensor([0, 0, heads, -1], dtype=ir.DataType.INT64))
    return add("Transpose", [add("Reshape", [value, shape])], perm=[0, 2, 1, 3])


def _length_symbol(value: ir.Value, axis: int) -> str:
    """The name of `value`'s dim `axis` when symbolic (values sharing it have equal lengths), else the value's."""
    dim = value.shape[axis] if value.shape is not None and value.shape.rank() > axis else None
    return f"dim:{dim.value}" if isinstance(dim, ir.SymbolicDim) and dim.value else f"value:{value.name}"
