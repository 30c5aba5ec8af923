"""Export the trained ListOps encoder to ONNX with torch.onnx's dynamo exporter.

    python -m models.listops.export [--checkpoint checkpoints/last.pt] [--output listops.onnx]

Inputs `input_ids` and `attention_mask` int64 (batch, sequence), both axes dynamic;
output `logits` (batch, 10). Checked against PyTorch in ONNX Runtime before writing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import exporting
from . import RECIPE
from .task import Vocab, make_batch


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export(model, vocab: Vocab, output: Path) -> None:
    def expressions(seed: int, batch: int, low: int, high: int) -> dict[str, np.ndarray]:
        ids, mask, _ = make_batch(vocab, seed, batch, low, high)
        return {"input_ids": ids, "attention_mask": mask}

    # The second check batch mixes lengths, so it is padded.
    exporting.export_checked(Logits(model).eval(), expressions(0, 2, 20, 200),
                             [expressions(1, 1, 500, 2000), expressions(1, 3, 50, 400)], output, max_sequence=4096)


if __name__ == "__main__":
    exporting.main(RECIPE, __doc__)
