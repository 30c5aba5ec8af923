"""Accuracy tasks of the trained recipes: what their `evaluate.py` modules share.

A recipe's evaluate module defines how its model is scored (`evaluate_session`, built on
`score`), its table rows and a one-line summary, and declares them in an `AccuracyTask`;
the task makes both of its command lines:

- `task.eval_command()`: `ice-onnx eval <name> [MODEL]`, the original and (with --convert)
  its converted variants side by side, a JSON report with --json;
- `task.standalone()`: `python -m <recipe>.evaluate [MODEL]`, one model file with plain
  ONNX Runtime, or with the ice-onnx ops (--ice).

Plain Click, so a recipe imports it without the installed ice_onnx package (the eval
command imports `ice_onnx.evaluation` only when it runs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import click
import numpy as np

COMPENSATION_CHOICES = ("on", "off", "both")


@dataclass
class Score:
    """Answers of one model on one set of prompts."""

    correct: int = 0
    seconds: float = 0.0  # inside session.run only
    predictions: list[int] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples


def score(session, batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray]],
          predict: Callable[[np.ndarray], np.ndarray], progress: Callable[[int], None] | None = None) -> Score:
    """Run `session` on each (feeds, answers) of `batches`; `predict(logits)` gives one
    answer per row. `progress(done)` is told the prompts scored so far."""
    result = Score()
    for feeds, answers in batches:
        begin = time.perf_counter()
        (logits,) = session.run(["logits"], feeds)
        result.seconds += time.perf_counter() - begin
        predicted = predict(logits)
        result.correct += int((predicted == answers).sum())
        result.predictions.extend(int(p) for p in predicted)
        if progress:
            progress(result.samples)
    return result


def against_reference(row: dict, metrics: dict, reference: dict | None) -> dict:
    """`row`, plus with `reference` (the original's metrics) the share of its accuracy kept
    and the share of prompts where both models give the same answer."""
    if reference is not None:
        row["kept"] = metrics["accuracy"] / reference["accuracy"] if reference["accuracy"] else None
        row["agreement"] = float(np.mean(np.equal(metrics["predictions"], reference["predictions"])))
    return row


def columns(*extra: tuple[str, str, str], per: str, seconds_format: str) -> list[tuple[str, str, str]]:
    """The table columns: model, `extra`, accuracy, kept, same answer, seconds `per` prompt."""
    return [("model", "model", ""), *extra, ("accuracy", "accuracy", ".3f"), ("kept", "kept", ".1%"),
            ("agreement", "same answer", ".1%"), ("seconds", f"s/{per}", seconds_format)]


def echo_progress(done: int, total: int, label: str = "") -> None:
    click.echo(f"\r{label}{done}/{total}", nl=done == total, err=True)


def comparison_options(command):
    """The options every trained-model task shares: threads, batching, conversion settings, JSON."""
    options = [
        click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1)),
        click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1)),
        click.option("--convert/--no-convert", default=True, show_default=True,
                     help="also convert MODEL with ice-onnx and compare side by side."),
        click.option("--top-k", default=32, show_default=True, type=click.IntRange(min=1)),
        click.option("--exact-below", default=0, show_default=True, type=click.IntRange(min=0)),
        click.option("--compensate", type=click.Choice(COMPENSATION_CHOICES), default="on", show_default=True),
        click.option("--attribute", "attributes", multiple=True, metavar="NAME=VALUE",
                     help="then set this kernel attribute on every converted block, e.g. probe_rows=0 "
                          "(custom_ops/CONTRACT.md; repeatable)."),
        click.option("--backend", type=click.Choice(["auto", "native", "reference"]), default="auto",
                     show_default=True),
        click.option("--memory-pattern/--no-memory-pattern", default=True, show_default=True,
                     help="ONNX Runtime's memory pattern planning; off lets the dense original run at lengths "
                          "whose planned S x S buffers do not fit (e.g. 16K tokens in 24 GiB)."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="write the metrics here."),
    ]
    return _decorate(command, options)


def _decorate(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def _verbatim(doc: str) -> str:
    """`doc` as click help with its line breaks kept (it shows commands)."""
    return "\n\n".join("\b\n" + paragraph for paragraph in doc.strip().split("\n\n"))


@dataclass(frozen=True)
class AccuracyTask:
    """One trained recipe's accuracy task, from which both command lines are made."""

    name: str  # ice-onnx eval <name>
    help: str  # the eval command's help
    doc: str  # the standalone command's help (the evaluate module's docstring)
    default_model: Path
    seeds: dict  # the task's fixed data seeds, recorded in every report
    evaluate: Callable[..., dict]  # evaluate(session, samples=, batch_size=, progress=, **options) -> metrics
    rows: Callable[..., list[dict]]  # rows(label, metrics, reference=None): the table's rows of one model
    columns: list[tuple[str, str, str]]
    title: str  # formatted with samples, threads and the task's options
    summary: Callable[[dict], str]  # one model's metrics in words (standalone)
    samples: int  # default --samples of the eval command
    standalone_samples: int  # and of the standalone one
    samples_help: str | None = None
    options: tuple = ()  # the task's own click options (e.g. --lengths), in both commands

    def _run(self, session, samples: int, batch_size: int, options: dict) -> dict:
        return self.evaluate(session, samples=samples, batch_size=batch_size, progress=echo_progress, **options)

    def _common(self, command, samples: int):
        model = click.argument("model", required=False,
                               type=click.Path(exists=True, dir_okay=False, path_type=Path))
        samples = click.option("--samples", default=samples, show_default=True, type=click.IntRange(min=1),
                               help=self.samples_help)
        return _decorate(command, [model, *self.options, samples])

    def eval_command(self) -> click.Command:
        """`ice-onnx eval <name> [MODEL]` (MODEL: default the shipped model; may be a converted model)."""

        def command(model, samples, batch_size, threads, convert, top_k, exact_below, compensate, attributes,
                    backend, memory_pattern, json_path, **options):
            compare_and_report(
                model or self.default_model, lambda session: self._run(session, samples, batch_size, options),
                title=self.title.format(samples=samples, threads=threads, **options), rows=self.rows,
                columns=self.columns, seeds=self.seeds, threads=threads, convert=convert, top_k=top_k,
                exact_below=exact_below, compensate=compensate, attributes=attributes, backend=backend,
                json_path=json_path, memory_pattern=memory_pattern)

        return click.command(self.name, help=self.help)(self._common(comparison_options(command), self.samples))

    def standalone(self) -> click.Command:
        """`python -m <recipe>.evaluate [MODEL] [task options] [--samples N] [--batch-size B]
        [--threads T] [--ice] [--output JSON]`: one model file's metrics, recorded with the
        model, the threads, --ice and the task's seeds."""

        def command(model, samples, batch_size, threads, ice, output, **options):
            model = model or self.default_model
            metrics = self._run(make_session(model, ice, threads), samples, batch_size, options)
            metrics.update(model=str(model), threads=threads, ice=ice, **self.seeds)
            click.echo(self.summary(metrics))
            if output:
                output.write_text(json.dumps(metrics, indent=1) + "\n")

        command = _decorate(command, [
            click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1)),
            click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1)),
            click.option("--ice", is_flag=True, help="register the ice-onnx custom ops (a converted model)"),
            click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="write the metrics here"),
        ])
        return click.command(help=_verbatim(self.doc))(self._common(command, self.standalone_samples))


def compare_and_report(model: Path, evaluate: Callable, *, title: str, rows: Callable, columns, seeds: dict,
                       threads: int, convert: bool, top_k: int, exact_below: int, compensate: str, backend: str,
                       json_path: Path | None, memory_pattern: bool = True, attributes: tuple = ()) -> None:
    """The body of an `ice-onnx eval <task>` command: score MODEL and, with --convert, its
    converted variants (`evaluate(session)` gives a model's metrics); print `title` and the
    table of `rows(label, metrics[, reference])`; write the report, with the task's fixed
    data `seeds`, to --json."""
    from ice_onnx.evaluation.runtime import KERNEL_COLUMNS, parse_attributes
    from ice_onnx.evaluation.tasks import compare_with_variants, side_by_side, write_json

    try:
        attributes = parse_attributes(attributes)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    original, converted = compare_with_variants(
        model, evaluate, convert=convert, top_k=top_k, exact_below=exact_below, compensate=compensate,
        threads=threads, backend=backend, memory_pattern=memory_pattern, attributes=attributes,
        log=lambda message: click.echo(message, err=True))
    report = {"model": str(model), "threads": threads, **seeds, "original": original}
    table = rows(model.name, original)
    if convert:
        report["converted"] = [{"settings": variant.settings, **metrics} for variant, metrics in converted]
        for variant, metrics in converted:
            # What the kernel did is one figure per model, on each of its rows.
            kernel = {key: metrics[key] for key, _, _ in KERNEL_COLUMNS if key in metrics}
            table += [{**row, **kernel} for row in rows(variant.label, metrics, original)]
        columns = [*columns, *KERNEL_COLUMNS]
    click.echo(title)
    click.echo(side_by_side(table, columns))
    if json_path:
        write_json(json_path, report)
        click.echo(f"wrote {json_path}", err=True)


def make_session(model_path: Path, ice: bool, threads: int):
    """An ONNX Runtime CPU session on `model_path`; with `ice`, the ice-onnx custom ops registered."""
    import onnxruntime as ort

    if ice:
        import ice_onnx  # registers the IceFormer custom-op library

        options = ice_onnx.session_options()
    else:
        options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
