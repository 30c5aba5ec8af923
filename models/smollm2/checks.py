"""The checks a SmolLM2 export passes before the build keeps it: ONNX Runtime against
PyTorch on real text, and `ice-onnx convert` replacing every attention block with a
converted file that (all calls below exact_below keys, so the exact kernel) gives the
original's outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..exporting import assert_agrees
from .exports import LAYERS, past_names, with_past_feeds

EXPORT_TOLERANCE = 2e-3  # ONNX Runtime vs PyTorch, max abs logit difference (logits ~ +-30)
CONVERTED_TOLERANCE = 1e-3  # converted (exact) vs original ONNX Runtime


def _session(path: Path, converted: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if converted:
        options.register_custom_ops_library(library_path())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_diff(got: np.ndarray, expected: np.ndarray) -> float:
    if got.shape != expected.shape:
        raise RuntimeError(f"shape {got.shape}, expected {expected.shape}")
    return float(np.abs(got - expected).max())


def check_prefill(model, path: Path, ids: np.ndarray) -> tuple[dict, list[dict]]:
    """ONNX Runtime vs PyTorch on `ids`, logits; also returns the feeds it ran."""
    import torch

    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits.numpy()
    feeds = {"input_ids": ids[None]}
    (got,) = _session(path).run(["logits"], feeds)
    assert_agrees(got, expected, EXPORT_TOLERANCE)
    return {"tokens": len(ids), "max_abs_diff_vs_torch": _max_diff(got, expected)}, [feeds]


def check_with_past(model, path: Path, ids: np.ndarray, steps: int = 8) -> tuple[dict, list[dict]]:
    """ONNX Runtime vs PyTorch: the prompt ids[:-steps] with an empty cache, then the last
    tokens one at a time on the growing cache (logits and every present), and the logits
    of every position against one PyTorch forward over all of `ids` without a cache (the
    cache really is used). Also returns the prompt's feeds and the last step's."""
    import torch
    from transformers import DynamicCache

    session = _session(path)
    outputs = ["logits", *past_names("present")]
    with torch.no_grad():
        whole = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits.numpy()
    cache, past, worst, ran, logits = DynamicCache(), None, 0.0, [], []
    for new in [ids[:-steps], *[ids[i:i + 1] for i in range(len(ids) - steps, len(ids))]]:
        feeds = with_past_feeds(new, past)
        ran.append(feeds)
        with torch.no_grad():
            result = model(**{name: torch.from_numpy(feeds[name])
                              for name in ("input_ids", "attention_mask", "position_ids")},
                           cache=cache, use_cache=True)
        expected = [result.logits.numpy()]
        for layer in result.cache.layers:
            expected += [layer.keys.numpy(), layer.values.numpy()]
        got = session.run(outputs, feeds)
        for g, e in zip(got, expected):
            assert_agrees(g, e, EXPORT_TOLERANCE)
            worst = max(worst, _max_diff(g, e))
        past = got[1:]
        logits.append(got[0])
    cached = np.concatenate(logits, axis=1)
    assert_agrees(cached, whole, EXPORT_TOLERANCE)
    return ({"tokens": len(ids), "decode_steps": steps, "max_abs_diff_vs_torch": worst,
             "max_abs_diff_vs_uncached_torch": _max_diff(cached, whole)}, [ran[0], ran[-1]])


def ice_onnx_cli(*args: str) -> str:
    """Run the installed `ice-onnx` command (the venv's, beside this Python) and return its
    output. Through the CLI (and without PYTHONPATH) because a run from the checkout's root
    would import the source folder ice_onnx/, which lacks the rewriter and the native
    library, instead of the installed package."""
    cli = Path(sys.executable).with_name("ice-onnx")
    command = [str(cli)] if cli.is_file() else ["ice-onnx"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([*command, *args], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"ice-onnx {' '.join(args[:1])} failed: {run.stderr.strip()}")
    return run.stdout


def library_path() -> str:
    """The installed custom-op library (`ice-onnx library-path`)."""
    return ice_onnx_cli("library-path").strip()


def convert(path: Path, output: Path, *options: str) -> dict:
    """`ice-onnx convert path -o output [options] --json`: its report."""
    return json.loads(ice_onnx_cli("convert", str(path), "-o", str(output), *options, "--json"))


def check_converted(path: Path, feeds_list: list[dict], tmp: Path) -> dict:
    """Convert with default settings; all 30 blocks replaced; the converted model's outputs
    equal the original's (every call below exact_below keys runs the exact kernel)."""
    converted = tmp / (path.stem + ".ice.onnx")
    report = convert(path, converted)
    if report["attention_blocks"] != LAYERS or report["replaced"] != LAYERS:
        raise RuntimeError(f"{path.name}: {report['replaced']} of {report['attention_blocks']} attention "
                           f"blocks converted, expected {LAYERS} of {LAYERS}")
    original, ice = _session(path), _session(converted, converted=True)
    worst = 0.0
    for feeds in feeds_list:
        for got, expected in zip(ice.run(None, feeds), original.run(None, feeds)):
            worst = max(worst, _max_diff(got, expected))
    del ice
    converted.unlink()
    if worst > CONVERTED_TOLERANCE:
        raise RuntimeError(f"{path.name}: converted model differs from the original by {worst}")
    return {"blocks": report["attention_blocks"], "replaced": report["replaced"],
            "max_abs_diff_converted_vs_original": worst}
