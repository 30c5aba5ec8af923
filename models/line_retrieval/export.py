"""Export the trained line-retrieval model to ONNX with torch.onnx's dynamo exporter.

    python -m models.line_retrieval.export [--checkpoint checkpoints/last.pt] [--output line_retrieval.onnx]

The graph takes `input_ids` int64 (batch, sequence), both axes dynamic, and returns
`logits` (batch, 1, vocab): the next-token scores after the last prompt token, i.e. the
prompt-processing pass (no KV cache). The export is checked against PyTorch in ONNX
Runtime before it is written. (The TorchScript exporter, dynamo=False, fails on
transformers 5's mask construction: aten::diff has no opset-17 symbolic.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import exporting
from . import RECIPE
from .task import Vocab, make_batch


class NextTokenLogits(torch.nn.Module):
    """The causal LM restricted to the last position's logits (what prompt processing needs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, logits_to_keep=1, use_cache=False).logits


def export(model, vocab: Vocab, output: Path) -> None:
    def prompts(seed: int, batch: int, length: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.stack([p.ids for p in make_batch(vocab, seed, batch, length)])}

    exporting.export_checked(NextTokenLogits(model).eval(), prompts(0, 2, 128),
                             [prompts(1, 1, 300), prompts(1, 3, 1000)], output, max_sequence=32768)


if __name__ == "__main__":
    exporting.main(RECIPE, __doc__)
