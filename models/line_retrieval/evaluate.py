"""Line-retrieval accuracy per context length, measured with ONNX Runtime.

    python -m models.line_retrieval.evaluate models/line_retrieval/line_retrieval.onnx \
        --lengths 1024,2048,4096,8192,16384 --samples 100 --output metrics.json
    python -m models.line_retrieval.evaluate converted.onnx --ice   # registers ice-onnx ops
    ice-onnx eval line-retrieval [MODEL] --lengths 4096 --samples 50   # original vs converted

The model takes `input_ids` (batch, sequence) and returns `logits` whose last position
scores the next token; a prediction is right when its arg-max is the queried number.
Prompts come from `task.make_batch` with a fixed seed per length, so the original and a
converted model are scored on the same prompts. `evaluate_session` is the library entry
point; `command` is the `ice-onnx eval line-retrieval` plug-in.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from ..eval_cli import compare_and_report, comparison_options, evaluate_main
from .task import Vocab, make_batch

ONNX_FILE = Path(__file__).resolve().with_name("line_retrieval.onnx")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
EVAL_SEED = 20_240_000  # fixed: every model is scored on the same prompts


def evaluation_prompts(vocab: Vocab, length: int, samples: int):
    """samples single-question prompts of about `length` tokens (deterministic)."""
    return make_batch(vocab, (EVAL_SEED, length), samples, length, num_questions=1)


def evaluate_session(
    session: ort.InferenceSession,
    lengths=DEFAULT_LENGTHS,
    samples: int = 100,
    batch_size: int = 1,
    vocab: Vocab | None = None,
    progress=None,
) -> dict:
    """Accuracy and mean latency per length: {"lengths": {L: {...}}}."""
    vocab = vocab or Vocab.load()
    results = {}
    for length in lengths:
        prompts = evaluation_prompts(vocab, length, samples)
        correct, seconds, predictions = 0, 0.0, []
        for start in range(0, samples, batch_size):
            chunk = prompts[start:start + batch_size]
            ids = np.stack([p.ids for p in chunk])
            begin = time.perf_counter()
            logits = session.run(["logits"], {"input_ids": ids})[0]
            seconds += time.perf_counter() - begin
            predicted = logits[:, -1].argmax(-1)
            answers = np.array([p.answers[-1] for p in chunk])
            correct += int((predicted == answers).sum())
            predictions.extend(int(x) for x in predicted)
            if progress:
                progress(length, start + len(chunk), samples)
        results[length] = {
            "tokens": int(len(prompts[0].ids)),
            "samples": samples,
            "accuracy": correct / samples,
            "seconds_per_prompt": seconds / samples,
            "predictions": predictions,
        }
    return {"lengths": results}


def accuracy_rows(label: str, metrics: dict, reference: dict | None = None) -> list[dict]:
    """Table rows for one model; with `reference` (the original's metrics), the accuracy
    kept and the share of prompts where both give the same answer."""
    rows = []
    for length, r in metrics["lengths"].items():
        row = {"model": label, "length": length, "tokens": r["tokens"], "accuracy": r["accuracy"],
               "seconds": r["seconds_per_prompt"]}
        if reference is not None:
            base = reference["lengths"][length]
            row["kept"] = r["accuracy"] / base["accuracy"] if base["accuracy"] else None
            row["agreement"] = float(np.mean(np.equal(r["predictions"], base["predictions"])))
        rows.append(row)
    return rows


COLUMNS = [("model", "model", ""), ("tokens", "tokens", "d"), ("accuracy", "accuracy", ".3f"),
           ("kept", "kept", ".1%"), ("agreement", "same answer", ".1%"), ("seconds", "s/prompt", ".2f")]


def _echo_progress(length: int, done: int, total: int) -> None:
    click.echo(f"\r{length:>6} tokens: {done}/{total}", nl=done == total, err=True)


@click.command("line-retrieval")
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), show_default=True,
              help="comma-separated context lengths in tokens.")
@click.option("--samples", default=100, show_default=True, type=click.IntRange(min=1), help="prompts per length.")
@comparison_options
def command(model, lengths, samples, batch_size, threads, **comparison):
    """Line retrieval accuracy per context length (MODEL: default the shipped line_retrieval.onnx).

    MODEL may itself be a converted model: its IceKNNAttention ops are registered.
    """
    lengths = [int(x) for x in lengths.split(",")]
    compare_and_report(
        model or ONNX_FILE,
        lambda session: evaluate_session(session, lengths, samples, batch_size, progress=_echo_progress),
        title=f"line retrieval, {samples} prompts per length, {threads} thread(s)",
        rows=accuracy_rows, columns=COLUMNS, seeds={"eval_seed": EVAL_SEED}, threads=threads, **comparison)


def _summary(metrics: dict) -> str:
    return "\n".join(f"{length:>6} tokens ({r['tokens']}): accuracy {r['accuracy']:.3f} "
                     f"over {r['samples']} prompts, {r['seconds_per_prompt']:.2f} s/prompt"
                     for length, r in metrics["lengths"].items())


def main(argv=None) -> None:
    """Standalone: one model file, plain ONNX Runtime (or with the ice-onnx ops: --ice)."""
    evaluate_main(
        argv, __doc__, ONNX_FILE, samples=100, seeds={"eval_seed": EVAL_SEED},
        task_options=lambda parser: parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS))),
        evaluate=lambda session, args: evaluate_session(
            session, [int(x) for x in args.lengths.split(",")], args.samples, args.batch_size,
            progress=_echo_progress),
        summary=_summary)


if __name__ == "__main__":
    main()
