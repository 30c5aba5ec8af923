"""Architectures from the sweep (models/fixtures/sweep.py) whose attention has a form no committed
fixture has, freshly exported and converted: the converted file computes what the export does.

Oracle: ONNX Runtime on the unconverted export, fed the sweep's inputs (lengths past the window,
padding at the end, at the start and in holes; a decode step and a chunk over a cache longer than
the window). Each case names what its blocks must be converted as, so a rewriter that stops
recognising the form (and leaves the block) fails here too.
"""

from __future__ import annotations

import numpy as np
import pytest

from ice_onnx.rewriter import ConvertOptions, convert_file

pytest.importorskip("torch", reason="the exports need PyTorch")
pytest.importorskip("transformers", reason="the exports need transformers")

ALWAYS_EXACT = 2147483647

# (architecture, with a cache, attention implementation, exporter, the mask of each converted block)
CASES = [
    # ALiBi added to the scores as a per-head bias over key positions (MPT's eager attention).
    ("mpt", True, "eager", "ts17", ["bias", "bias"]),
    # A sliding layer then a global one; a decode step over a cache three times the window.
    ("gemma3", True, "sdpa", "ts17", ["sliding-window", "both"]),
    # One K/V head for all query heads, K and V sliced from one fused projection.
    ("gpt_bigcode", True, "eager", "ts17", ["both", "both"]),
    # The dynamo exporter's SDPA: blocked keys at finfo.min and an IsNaN guard that never fires, so
    # a left-padded prompt's padding queries (no key they may see) average V over all keys.
    ("mistral", False, "sdpa", "dynamo", ["sliding-window", "sliding-window"]),
    # Gemma 2 capping its scores at 1: dynamo folds the division and product by 1, leaving a bare
    # Tanh between the scaled scores and the mask (large random weights: the cap changes the output).
    ("gemma2", True, "eager", "dynamo", ["sliding-window", "both"]),
]


@pytest.mark.parametrize("family, past, attn, exporter, masks", CASES, ids=[f"{c[0]}_{c[3]}" for c in CASES])
def test_converted_export_computes_what_the_export_does(family, past, attn, exporter, masks, tmp_path):
    from models.fixtures import sweep

    arch = sweep.DECODERS[family](attn, past)
    arch.test_shapes = sweep.PAST_SHAPES[1:] if past else sweep.SHAPES[1:]  # the long shapes only
    original, converted = tmp_path / "model.onnx", tmp_path / "converted.onnx"
    sweep.PRODUCERS[exporter].produce(arch, original)
    report = convert_file(original, converted, ConvertOptions(exact_below=ALWAYS_EXACT))
    assert [block.mask for block in report.blocks if block.replaced] == masks, report.to_text()

    reference, candidate = sweep.session(original, converted=False), sweep.session(converted, converted=True)
    checked = 0
    for _, dims, feed in sweep.feeds(arch):
        for expected, got in zip(reference.run(None, feed), candidate.run(None, feed)):
            scale = max(1.0, float(np.max(np.abs(expected))))
            np.testing.assert_allclose(got, expected, atol=sweep.TOLERANCE * scale, rtol=0, err_msg=f"at {dims}")
        checked += 1
    assert checked == 3 * len(arch.test_shapes)  # trailing, leading and scattered padding at each shape
