"""Export the trained ListOps encoder to ONNX with torch.onnx's dynamo exporter.

    python -m models.listops.export [--checkpoint checkpoints/last.pt] [--output listops.onnx]

Inputs `input_ids` and `attention_mask` int64 (batch, sequence), both axes dynamic;
output `logits` (batch, 10). Checked against PyTorch in ONNX Runtime before writing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import export_cli
from .evaluate import ONNX_FILE
from .model import build_model
from .task import Vocab, make_batch
from .train import CHECKPOINT


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def load_trained(checkpoint: Path = CHECKPOINT):
    return export_cli.load_trained(checkpoint, build_model, Vocab)


def export(model, vocab: Vocab, output: Path) -> None:
    def expressions(seed: int, batch: int, low: int, high: int) -> dict[str, np.ndarray]:
        ids, mask, _ = make_batch(vocab, seed, batch, low, high)
        return {"input_ids": ids, "attention_mask": mask}

    # The second check batch mixes lengths, so it is padded.
    export_cli.export_checked(Logits(model).eval(), expressions(0, 2, 20, 200),
                              [expressions(1, 1, 500, 2000), expressions(1, 3, 50, 400)], output, max_sequence=4096)


def main(argv=None) -> None:
    export_cli.export_main(argv, __doc__, CHECKPOINT, ONNX_FILE, load_trained, export)


if __name__ == "__main__":
    main()
