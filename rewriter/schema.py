"""An onnx OpSchema for IceKNNAttention, so onnx.checker and shape inference know the op.

It mirrors the contract (custom_ops/contract.py): inputs, attributes and their types.
Registered once per process, on first use.
"""

from __future__ import annotations

import functools

from onnx import defs

from ice_onnx.custom_ops import contract

_ATTRIBUTE_TYPES = {
    float: defs.OpSchema.AttrType.FLOAT,
    int: defs.OpSchema.AttrType.INT,
    str: defs.OpSchema.AttrType.STRING,
}


@functools.cache
def register() -> None:
    if defs.has(contract.OP_TYPE, contract.DOMAIN):
        return
    Parameter = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attributes = [
        defs.OpSchema.Attribute(name, _ATTRIBUTE_TYPES[type(default)], f"see CONTRACT.md (default {default})",
                                required=False)
        for name, default in contract.Attributes().as_node_attributes().items()
    ]
    schema = defs.OpSchema(
        contract.OP_TYPE,
        contract.DOMAIN,
        contract.VERSION,
        doc="k-nearest-neighbour (IceFormer) attention; see custom_ops/CONTRACT.md",
        inputs=[
            Parameter("Q", "T"),
            Parameter("K", "T"),
            Parameter("V", "T"),
            Parameter("attn_mask", "M", param_option=optional),
            Parameter("key_lengths", "L", param_option=optional),
        ],
        outputs=[Parameter("Y", "T")],
        type_constraints=[
            ("T", ["tensor(float)"], "float32 query, key, value and output"),
            ("M", ["tensor(bool)", "tensor(float)"], "bool (true = may attend) or additive float mask"),
            ("L", ["tensor(int32)", "tensor(int64)"], "[B] real keys per batch element (a shared KV buffer)"),
        ],
        attributes=attributes,
    )
    defs.register_schema(schema)  # the checker and shape inference read the same registry


def register_runtime_ops(model) -> None:
    """Teach onnx the default-domain ops only ONNX Runtime defines (SimplifiedLayerNormalization,
    ...: its transformer fusions and genai's builder emit them), mirroring ORT's own schemas, so
    the checker and shape inference accept the valid models that use them."""
    wanted = {node.op_type for node in _all_nodes(model.graph) if node.domain in ("", "ai.onnx")}
    missing = {name for name in wanted if not defs.has(name)}
    if not missing:
        return
    from onnxruntime.capi import onnxruntime_pybind11_state as runtime

    for source in runtime.get_all_operator_schema():
        if source.name in missing and source.domain in ("", "ai.onnx") and not defs.has(source.name):
            defs.register_schema(_mirror(source))


def _mirror(source) -> defs.OpSchema:
    Parameter = defs.OpSchema.FormalParameter
    options = {0: defs.OpSchema.FormalParameterOption.Single, 1: defs.OpSchema.FormalParameterOption.Optional,
               2: defs.OpSchema.FormalParameterOption.Variadic}

    def parameters(formals):
        return [Parameter(p.name, p.typeStr, param_option=options[int(p.option.value)], is_homogeneous=p.isHomogeneous,
                          min_arity=0 if int(p.option.value) == 2 else 1) for p in formals]

    attributes = [defs.OpSchema.Attribute(a.name, defs.OpSchema.AttrType(int(a.type.value)), a.description,
                                          required=a.required) for a in source.attributes.values()]
    return defs.OpSchema(
        source.name, "", source.since_version, doc="ONNX Runtime operator (mirrored by ice-onnx)",
        inputs=parameters(source.inputs), outputs=parameters(source.outputs),
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), t.description) for t in source.type_constraints],
        attributes=attributes)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)
