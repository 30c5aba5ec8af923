"""What the trained models' export recipes share: the command line and the check
that the written ONNX file agrees with PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np


def assert_agrees(got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Raise unless the ONNX output `got` matches PyTorch's `expected` in shape and to `tolerance`."""
    error = np.abs(got - expected).max()
    if got.shape != expected.shape or error > tolerance:
        raise RuntimeError(f"ONNX export disagrees with PyTorch: shape {got.shape}, max error {error}")


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
