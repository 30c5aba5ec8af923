"""What the trained models' evaluate modules share: the options and the body of their
`ice-onnx eval <task>` commands, and their standalone `python -m models.<task>.evaluate`.

Plain Click and argparse, so a recipe imports it without the installed ice_onnx package."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import click

COMPENSATION_CHOICES = ("on", "off", "both")


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
        click.option("--backend", type=click.Choice(["auto", "native", "reference"]), default="auto",
                     show_default=True),
        click.option("--memory-pattern/--no-memory-pattern", default=True, show_default=True,
                     help="ONNX Runtime's memory pattern planning; off lets the dense original run at lengths "
                          "whose planned S x S buffers do not fit (e.g. 16K tokens in 24 GiB)."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="write the metrics here."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def compare_and_report(model: Path, evaluate: Callable, *, title: str, rows: Callable, columns, seeds: dict,
                       threads: int, convert: bool, top_k: int, exact_below: int, compensate: str, backend: str,
                       json_path: Path | None, memory_pattern: bool = True) -> None:
    """The body of an `ice-onnx eval <task>` command: score MODEL and, with --convert, its
    converted variants (`evaluate(session)` gives a model's metrics); print `title` and the
    table of `rows(label, metrics[, reference])`; write the report, with the task's fixed
    data `seeds`, to --json."""
    from ice_onnx.evaluation.tasks import compare_with_variants, side_by_side, write_json

    original, converted = compare_with_variants(
        model, evaluate, convert=convert, top_k=top_k, exact_below=exact_below, compensate=compensate,
        threads=threads, backend=backend, memory_pattern=memory_pattern,
        log=lambda message: click.echo(message, err=True))
    report = {"model": str(model), "threads": threads, **seeds, "original": original}
    table = rows(model.name, original)
    if convert:
        report["converted"] = [{"settings": variant.settings, **metrics} for variant, metrics in converted]
        for variant, metrics in converted:
            table += rows(variant.label, metrics, original)
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


def evaluate_main(argv, doc: str, onnx_file: Path, *, samples: int, evaluate: Callable, summary: Callable[[dict], str],
                  seeds: dict, task_options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """`python -m models.<task>.evaluate [MODEL] [task options] [--samples N] [--batch-size B]
    [--threads T] [--ice] [--output JSON]`: score one model file (default `onnx_file`) with
    plain ONNX Runtime, or with the ice-onnx ops (--ice).

    `evaluate(session, args)` returns the metrics; they are recorded with the model, the
    threads, --ice and `seeds` (the task's fixed data seeds), `summary(metrics)` is
    printed and --output gets them as JSON."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?", default=onnx_file)
    if task_options is not None:
        task_options(parser)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ice", action="store_true", help="register the ice-onnx custom ops")
    parser.add_argument("--output", type=Path, help="metrics JSON to write")
    args = parser.parse_args(argv)

    session = make_session(args.model, args.ice, args.threads)
    metrics = evaluate(session, args)
    metrics.update(model=str(args.model), threads=args.threads, ice=args.ice, **seeds)
    print(summary(metrics))
    if args.output:
        args.output.write_text(json.dumps(metrics, indent=1) + "\n")
