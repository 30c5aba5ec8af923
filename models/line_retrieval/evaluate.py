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

import click
import numpy as np

from ..accuracy import AccuracyTask, against_reference, columns, score
from . import RECIPE
from .task import Vocab, make_batch

ONNX_FILE = RECIPE.onnx_file
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
EVAL_SEED = 20_240_000  # fixed: every model is scored on the same prompts


def evaluation_prompts(vocab: Vocab, length: int, samples: int):
    """samples single-question prompts of about `length` tokens (deterministic)."""
    return make_batch(vocab, (EVAL_SEED, length), samples, length, num_questions=1)


def evaluate_session(session, lengths=DEFAULT_LENGTHS, samples: int = 100, batch_size: int = 1,
                     vocab: Vocab | None = None, progress=None) -> dict:
    """Accuracy and mean latency per length: {"lengths": {L: {...}}}."""
    vocab = vocab or Vocab.load()
    results = {}
    for length in lengths:
        prompts = evaluation_prompts(vocab, length, samples)
        chunks = [prompts[start:start + batch_size] for start in range(0, samples, batch_size)]
        batches = (({"input_ids": np.stack([p.ids for p in chunk])}, np.array([p.answers[-1] for p in chunk]))
                   for chunk in chunks)
        scored = score(session, batches, predict=lambda logits: logits[:, -1].argmax(-1),
                       progress=progress and (lambda done: progress(done, samples, f"{length:>6} tokens: ")))
        results[length] = {"tokens": int(len(prompts[0].ids)), "samples": samples, "accuracy": scored.accuracy,
                           "seconds_per_prompt": scored.seconds / samples, "predictions": scored.predictions}
    return {"lengths": results}


def accuracy_rows(label: str, metrics: dict, reference: dict | None = None) -> list[dict]:
    """Table rows for one model, a row per length; with `reference` (the original's
    metrics), the accuracy kept and the share of the same answers."""
    return [against_reference({"model": label, "length": length, "tokens": r["tokens"], "accuracy": r["accuracy"],
                               "seconds": r["seconds_per_prompt"]},
                              r, reference and reference["lengths"][length])
            for length, r in metrics["lengths"].items()]


def _summary(metrics: dict) -> str:
    return "\n".join(f"{length:>6} tokens ({r['tokens']}): accuracy {r['accuracy']:.3f} "
                     f"over {r['samples']} prompts, {r['seconds_per_prompt']:.2f} s/prompt"
                     for length, r in metrics["lengths"].items())


def _lengths(ctx, param, value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated integers, e.g. 1024,4096") from None


TASK = AccuracyTask(
    name="line-retrieval",
    help="Line retrieval accuracy per context length (MODEL: default the shipped line_retrieval.onnx).\n\n"
         "MODEL may itself be a converted model: its IceKNNAttention ops are registered.",
    doc=__doc__, default_model=ONNX_FILE, seeds={"eval_seed": EVAL_SEED}, evaluate=evaluate_session,
    rows=accuracy_rows, columns=columns(("tokens", "tokens", "d"), per="prompt", seconds_format=".2f"),
    title="line retrieval, {samples} prompts per length, {threads} thread(s)", summary=_summary,
    samples=100, standalone_samples=100, samples_help="prompts per length.",
    options=(click.option("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), show_default=True,
                          callback=_lengths, help="comma-separated context lengths in tokens."),))
command = TASK.eval_command()

if __name__ == "__main__":
    TASK.standalone()()
