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
import onnxruntime as ort
import torch

from ..export_cli import assert_agrees, export_main
from .model import build_model
from .task import Vocab, make_batch
from .train import CHECKPOINT

HERE = Path(__file__).resolve().parent
from .evaluate import ONNX_FILE


class NextTokenLogits(torch.nn.Module):
    """The causal LM restricted to the last position's logits (what prompt processing needs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, logits_to_keep=1, use_cache=False).logits


def load_trained(checkpoint: Path = CHECKPOINT):
    vocab = Vocab.load()
    model = build_model(len(vocab))
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return model.eval(), vocab


def export(model, vocab: Vocab, output: Path) -> None:
    wrapper = NextTokenLogits(model).eval()
    example = torch.from_numpy(np.stack([p.ids for p in make_batch(vocab, 0, 2, 128)]))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=32768)
    program = torch.onnx.export(
        wrapper, (example,), dynamo=True, input_names=["input_ids"], output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
    )
    program.optimize()
    tmp = output.with_suffix(".tmp.onnx")
    program.save(str(tmp))
    check_against_torch(wrapper, vocab, tmp)
    tmp.replace(output)


@torch.no_grad()
def check_against_torch(wrapper, vocab: Vocab, path: Path, tolerance: float = 1e-3) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 300), (3, 1000)):
        ids = np.stack([p.ids for p in make_batch(vocab, 1, batch, length)])
        expected = wrapper(torch.from_numpy(ids)).numpy()
        (got,) = session.run(["logits"], {"input_ids": ids})
        assert_agrees(got, expected, tolerance)


def main(argv=None) -> None:
    export_main(argv, __doc__, CHECKPOINT, ONNX_FILE, load_trained, export)

if __name__ == "__main__":
    main()
