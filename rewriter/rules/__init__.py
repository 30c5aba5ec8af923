"""One module per attention family; each exposes FAMILY, PATTERNS and to_core(match)."""

from ice_onnx.rewriter.rules import sdpa

FAMILIES = [sdpa]
