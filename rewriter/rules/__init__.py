"""One module per attention family; each exposes match(model, node) -> AttentionCore | None.

A rule that recognises a block it cannot convert still returns a core, with
`unsupported` saying why, so the report lists every attention block; a rule whose
pattern fits a block its check refuses may also expose refusal(model, node) -> str | None,
the reason the report then gives for that block. A new family is
one module here, added to FAMILIES, plus its test.
"""

from ice_onnx.rewriter.rules import ms_attention, onnx_attention, sdpa

FAMILIES = [sdpa, onnx_attention, ms_attention]
