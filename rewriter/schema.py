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
        ],
        outputs=[Parameter("Y", "T")],
        type_constraints=[
            ("T", ["tensor(float)"], "float32 query, key, value and output"),
            ("M", ["tensor(bool)", "tensor(float)"], "bool (true = may attend) or additive float mask"),
        ],
        attributes=attributes,
    )
    defs.register_schema(schema)  # the checker and shape inference read the same registry
