"""ListOps accuracy measured with ONNX Runtime.

    python -m models.listops.evaluate models/listops/listops.onnx --samples 500 --output metrics.json
    python -m models.listops.evaluate converted.onnx --ice        # registers ice-onnx ops
    ice-onnx eval listops [MODEL] --samples 200                   # original vs converted

The model takes `input_ids` and `attention_mask` (batch, sequence) and returns `logits`
(batch, 10). Test expressions follow LRA's generation rules and lengths (500..2000
tokens) with a fixed seed, apart from the training seeds, so every model is scored on
the same expressions. `evaluate_session` is the library entry point.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from ..eval_cli import compare_and_report, comparison_options, evaluate_main
from .task import LRA_MAX_LENGTH, LRA_MIN_LENGTH, Vocab, make_batch

ONNX_FILE = Path(__file__).resolve().with_name("listops.onnx")
TEST_SEED = 40_000  # fixed: every model is scored on the same expressions


def evaluate_session(session: ort.InferenceSession, samples: int = 500, batch_size: int = 1,
                     min_length: int = LRA_MIN_LENGTH, max_length: int = LRA_MAX_LENGTH,
                     vocab: Vocab | None = None, progress=None) -> dict:
    vocab = vocab or Vocab.load()
    correct, seconds, predictions, tokens = 0, 0.0, [], 0
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        ids, mask, labels = make_batch(vocab, (TEST_SEED, start), count, min_length, max_length)
        begin = time.perf_counter()
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        seconds += time.perf_counter() - begin
        predicted = logits.argmax(-1)
        correct += int((predicted == labels).sum())
        predictions.extend(int(p) for p in predicted)
        tokens += int(mask.sum())
        if progress:
            progress(start + count, samples)
    return {"samples": samples, "accuracy": correct / samples, "mean_tokens": tokens / samples,
            "seconds_per_sample": seconds / samples, "predictions": predictions,
            "lengths": [min_length, max_length]}


def _row(label: str, metrics: dict, reference: dict | None = None) -> dict:
    row = {"model": label, "accuracy": metrics["accuracy"], "seconds": metrics["seconds_per_sample"]}
    if reference is not None:
        row["kept"] = metrics["accuracy"] / reference["accuracy"] if reference["accuracy"] else None
        row["agreement"] = float(np.mean(np.equal(metrics["predictions"], reference["predictions"])))
    return row


COLUMNS = [("model", "model", ""), ("accuracy", "accuracy", ".3f"), ("kept", "kept", ".1%"),
           ("agreement", "same answer", ".1%"), ("seconds", "s/sample", ".3f")]


def _echo_progress(done: int, total: int) -> None:
    click.echo(f"\r{done}/{total}", nl=done == total, err=True)


@click.command("listops")
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--samples", default=200, show_default=True, type=click.IntRange(min=1))
@comparison_options
def command(model, samples, batch_size, threads, **comparison):
    """ListOps accuracy (MODEL: default the shipped listops.onnx; may be a converted model)."""
    compare_and_report(
        model or ONNX_FILE,
        lambda session: evaluate_session(session, samples, batch_size, progress=_echo_progress),
        title=f"ListOps, {samples} expressions of {LRA_MIN_LENGTH}-{LRA_MAX_LENGTH} tokens, {threads} thread(s)",
        rows=lambda label, metrics, reference=None: [_row(label, metrics, reference)], columns=COLUMNS,
        seeds={"test_seed": TEST_SEED}, threads=threads, **comparison)


def _summary(metrics: dict) -> str:
    return (f"accuracy {metrics['accuracy']:.3f} over {metrics['samples']} expressions "
            f"(mean {metrics['mean_tokens']:.0f} tokens), {metrics['seconds_per_sample']:.3f} s each")


def main(argv=None) -> None:
    """Standalone: one model file, plain ONNX Runtime (or with the ice-onnx ops: --ice)."""
    evaluate_main(
        argv, __doc__, ONNX_FILE, samples=500, seeds={"test_seed": TEST_SEED},
        evaluate=lambda session, args: evaluate_session(session, args.samples, args.batch_size,
                                                        progress=_echo_progress),
        summary=_summary)


if __name__ == "__main__":
    main()
