"""The fallback demo: convert the shipped long-context model, answer line-retrieval
questions over a long record with the original and the converted model, and show the
answers, the speed-up and the accuracy kept."""

from __future__ import annotations

import statistics
import time

import click

from ice_onnx.errors import IceError

DEFAULT_TOKENS, DEFAULT_QUESTIONS, DEFAULT_TOP_K = 4096, 5, 32


def _line_retrieval():
    """The shipped line-retrieval recipe's evaluate and task modules (models/line_retrieval)."""
    from ice_onnx.evaluation.tasks import recipe

    line_retrieval = recipe("line-retrieval")
    if not line_retrieval.is_built():
        raise IceError(f"the shipped model {line_retrieval.model_path().name} is missing from this installation "
                       "(train and export it: python -m models.line_retrieval.train, python -m models build "
                       "line-retrieval)")
    return line_retrieval.module("evaluate"), line_retrieval.module("task")


def _timed(session, ids):
    begin = time.perf_counter()
    logits = session.run(["logits"], {"input_ids": ids[None, :]})[0]
    return int(logits[0, -1].argmax()), time.perf_counter() - begin


def run(tokens: int, questions: int, threads: int, top_k: int, say) -> None:
    """Print the table of answers, the accuracy of each model and the median time per prompt."""
    import onnx

    from ice_onnx.evaluation.runtime import convert, open_session

    evaluate, task = _line_retrieval()
    vocab = task.Vocab.load()

    say(f"[1/3] converting {evaluate.ONNX_FILE.name} (kNN attention from 0 keys, top_k={top_k}) ...")
    try:
        converted = convert(evaluate.ONNX_FILE, top_k=top_k, exact_below=0, log=say)
    except RuntimeError as exc:
        raise IceError(str(exc)) from None
    sessions = {"original": open_session(onnx.load(str(evaluate.ONNX_FILE)), threads),
                "ice-onnx": open_session(converted, threads)}

    prompts = evaluate.evaluation_prompts(vocab, tokens, questions)
    say(f"[2/3] warming up both sessions on a {len(prompts[0].ids)}-token prompt ...")
    for session in sessions.values():
        _timed(session, prompts[0].ids)

    rows = []
    with click.progressbar(prompts, label="[3/3] answering", file=click.get_text_stream("stderr")) as bar:
        for prompt in bar:
            row = {"expected": vocab.decode([prompt.answers[-1]]),
                   "question": vocab.decode(prompt.ids[-5:])}
            for name, session in sessions.items():  # alternate, so load on the machine hits both alike
                answer, seconds = _timed(session, prompt.ids)
                row[name] = (vocab.decode([answer]), seconds)
            rows.append(row)

    click.echo(f"\nline retrieval: {len(rows)} questions, each over a record of {len(prompts[0].ids)} tokens "
               f"({threads} thread(s))\n")
    click.echo(f"{'question':34} {'expected':>8} {'original':>9} {'ice-onnx':>9}")
    for row in rows:
        click.echo(f"{row['question']:34} {row['expected']:>8} {row['original'][0]:>9} {row['ice-onnx'][0]:>9}")
    accuracy = {name: sum(r[name][0] == r["expected"] for r in rows) / len(rows) for name in sessions}
    seconds = {name: statistics.median(r[name][1] for r in rows) for name in sessions}
    kept = accuracy["ice-onnx"] / accuracy["original"] if accuracy["original"] else float("nan")
    click.echo(f"\naccuracy   original {accuracy['original']:.0%}   ice-onnx {accuracy['ice-onnx']:.0%}"
               f"   (kept {kept:.0%})")
    click.echo(f"time/prompt original {seconds['original']:.2f} s   ice-onnx {seconds['ice-onnx']:.2f} s"
               f"   (speed-up {seconds['original'] / seconds['ice-onnx']:.2f}x, median)")
