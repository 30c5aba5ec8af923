"""What the trained models' export recipes share: loading the trained checkpoint, the
dynamo export with dynamic batch and sequence axes, the check that the written ONNX file
agrees with PyTorch, and the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


def cache_folder(env_var: str, name: str) -> Path:
    """Where a recipe keeps what it builds: $env_var, the checkout's .cache/<name>, or
    ~/.cache/ice-onnx/<name> when installed (no checkout around the package)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / name
    return Path.home() / ".cache" / "ice-onnx" / name


def assert_agrees(got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Raise unless the ONNX output `got` matches PyTorch's `expected` in shape and to `tolerance`."""
    error = np.abs(got - expected).max()
    if got.shape != expected.shape or error > tolerance:
        raise RuntimeError(f"ONNX export disagrees with PyTorch: shape {got.shape}, max error {error}")


def load_trained(checkpoint: Path, build_model: Callable, vocab_type):
    """The trained model (in eval mode) and its vocabulary, from a training checkpoint."""
    import torch

    vocab = vocab_type.load()
    model = build_model(len(vocab))
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return model.eval(), vocab


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


def export_main(argv, doc: str, checkpoint: Path, onnx_file: Path,
                load_trained: Callable, export: Callable) -> None:
    """`python -m models.<task>.export [--checkpoint C] [--output O]`: load, export, check, write."""
    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=checkpoint)
    parser.add_argument("--output", type=Path, default=onnx_file)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, vocab = load_trained(args.checkpoint)
    export(model, vocab, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")
