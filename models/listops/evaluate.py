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

from ..accuracy import AccuracyTask, against_reference, columns, score
from . import RECIPE
from .task import LRA_MAX_LENGTH, LRA_MIN_LENGTH, Vocab, make_batch

ONNX_FILE = RECIPE.onnx_file
TEST_SEED = 40_000  # fixed: every model is scored on the same expressions


def evaluate_session(session, samples: int = 500, batch_size: int = 1, min_length: int = LRA_MIN_LENGTH,
                     max_length: int = LRA_MAX_LENGTH, vocab: Vocab | None = None, progress=None) -> dict:
    vocab = vocab or Vocab.load()
    tokens = 0

    def batches():
        nonlocal tokens
        for start in range(0, samples, batch_size):
            ids, mask, labels = make_batch(vocab, (TEST_SEED, start), min(batch_size, samples - start),
                                           min_length, max_length)
            tokens += int(mask.sum())
            yield {"input_ids": ids, "attention_mask": mask}, labels

    scored = score(session, batches(), predict=lambda logits: logits.argmax(-1),
                   progress=progress and (lambda done: progress(done, samples)))
    return {"samples": samples, "accuracy": scored.accuracy, "mean_tokens": tokens / samples,
            "seconds_per_sample": scored.seconds / samples, "predictions": scored.predictions,
            "lengths": [min_length, max_length]}


def _rows(label: str, metrics: dict, reference: dict | None = None) -> list[dict]:
    return [against_reference({"model": label, "accuracy": metrics["accuracy"],
                               "seconds": metrics["seconds_per_sample"]}, metrics, reference)]


def _summary(metrics: dict) -> str:
    return (f"accuracy {metrics['accuracy']:.3f} over {metrics['samples']} expressions "
            f"(mean {metrics['mean_tokens']:.0f} tokens), {metrics['seconds_per_sample']:.3f} s each")


TASK = AccuracyTask(
    name="listops", help="ListOps accuracy (MODEL: default the shipped listops.onnx; may be a converted model).",
    doc=__doc__, default_model=ONNX_FILE, seeds={"test_seed": TEST_SEED}, evaluate=evaluate_session,
    rows=_rows, columns=columns(per="sample", seconds_format=".3f"),
    title=f"ListOps, {{samples}} expressions of {LRA_MIN_LENGTH}-{LRA_MAX_LENGTH} tokens, {{threads}} thread(s)",
    summary=_summary, samples=200, standalone_samples=500)
command = TASK.eval_command()

if __name__ == "__main__":
    TASK.standalone()()
