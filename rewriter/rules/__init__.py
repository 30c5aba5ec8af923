"""One module per attention family; each exposes FAMILY and match(model, node) -> AttentionCore | None.

A rule that recognises a block it cannot convert still returns a core, with
`unsupported` saying why, so the report lists every attention block.
"""

from ice_onnx.rewriter.rules import onnx_attention, sdpa

FAMILIES = [sdpa, onnx_attention]
