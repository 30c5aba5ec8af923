"""Exporting a trained recipe: loading its checkpoint, the dynamo export with dynamic batch
and sequence axes, the check that the written ONNX file agrees with PyTorch, and the
`python -m <recipe>.export` command line.

A trained recipe's `export.py` holds its differences only: a function
`export(model, vocab, output)` that wraps the model (what the graph returns) and calls
`export_checked` with its example and check inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

import numpy as np


def assert_agrees(got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Raise unless the ONNX output `got` matches PyTorch's `expected` in shape and to `tolerance`."""
    error = np.abs(got - expected).max()
    if got.shape != expected.shape or error > tolerance:
        raise RuntimeError(f"ONNX export disagrees with PyTorch: shape {got.shape}, max error {error}")


def load_trained(recipe, checkpoint: Path):
    """The recipe's trained model (in eval mode) and its vocabulary, from a training checkpoint."""
    import torch

    vocab = recipe.module("task").Vocab.load()
    model = recipe.module("model").build_model(len(vocab))
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return model.eval(), vocab


def export_trained(recipe, checkpoint: Path, output: Path) -> None:
    """Export the recipe's checkpoint to `output` through its `export.export`."""
    import torch

    torch.set_num_threads(1)
    model, vocab = load_trained(recipe, checkpoint)
    recipe.module("export").export(model, vocab, output)


def export_checked(wrapper, example: dict[str, np.ndarray], checks: Iterable[dict[str, np.ndarray]],
                   output: Path, max_sequence: int, tolerance: float = 1e-3) -> None:
    """Export `wrapper` (a module whose forward takes the named int64 (batch, sequence)
    inputs of `example` and returns the logits) with torch.onnx's dynamo exporter, both
    axes dynamic up to `max_sequence` tokens, and write it to `output` only once ONNX
    Runtime agrees with PyTorch on every input set of `checks`: a failed export never
    replaces a good file."""
    import torch

    names = list(example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_sequence)
    program = torch.onnx.export(
        wrapper, tuple(torch.from_numpy(example[name]) for name in names), dynamo=True,
        input_names=names, output_names=["logits"],
        dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
    )
    program.optimize()
    tmp = output.with_suffix(".tmp.onnx")
    program.save(str(tmp))
    check_against_torch(wrapper, tmp, checks, tolerance)
    tmp.replace(output)


def check_against_torch(wrapper, path: Path, checks: Iterable[dict[str, np.ndarray]], tolerance: float) -> None:
    """Raise unless the ONNX file at `path` gives `wrapper`'s logits on every input set of `checks`."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for feeds in checks:
            expected = wrapper(**{name: torch.from_numpy(value) for name, value in feeds.items()}).numpy()
            (got,) = session.run(["logits"], feeds)
            assert_agrees(got, expected, tolerance)


def main(recipe, doc: str, argv=None) -> None:
    """`python -m <recipe>.export [--checkpoint C] [--output O]`: load, export, check, write."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=recipe.checkpoint)
    parser.add_argument("--output", type=Path, default=recipe.onnx_file)
    args = parser.parse_args(argv)
    export_trained(recipe, args.checkpoint, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")
