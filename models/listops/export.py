"""Export the trained ListOps encoder to ONNX with torch.onnx's dynamo exporter.

    python -m models.listops.export [--checkpoint checkpoints/last.pt] [--output listops.onnx]

Inputs `input_ids` and `attention_mask` int64 (batch, sequence), both axes dynamic;
output `logits` (batch, 10). Checked against PyTorch in ONNX Runtime before writing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..export_cli import assert_agrees, export_main
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
    vocab = Vocab.load()
    model = build_model(len(vocab))
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return model.eval(), vocab


def export(model, vocab: Vocab, output: Path) -> None:
    wrapper = Logits(model).eval()
    ids, mask, _ = make_batch(vocab, 0, 2, 20, 200)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=4096)
    axes = {0: batch, 1: sequence}
    program = torch.onnx.export(
        wrapper, (torch.from_numpy(ids), torch.from_numpy(mask)), dynamo=True,
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_shapes={"input_ids": axes, "attention_mask": axes},
    )
    program.optimize()
    tmp = output.with_suffix(".tmp.onnx")
    program.save(str(tmp))
    check_against_torch(wrapper, vocab, tmp)
    tmp.replace(output)


@torch.no_grad()
def check_against_torch(wrapper, vocab: Vocab, path: Path, tolerance: float = 1e-3) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, (low, high) in ((1, (500, 2000)), (3, (50, 400))):  # the second batch is padded
        ids, mask, _ = make_batch(vocab, 1, batch, low, high)
        expected = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        (got,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        assert_agrees(got, expected, tolerance)


def main(argv=None) -> None:
    export_main(argv, __doc__, CHECKPOINT, ONNX_FILE, load_trained, export)

if __name__ == "__main__":
    main()
