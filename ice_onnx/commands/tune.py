"""`ice-onnx tune`: the cheapest per-block plan that keeps the model's output within a budget."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ice_onnx.commands import params
from ice_onnx.commands.convert import report_errors
from ice_onnx.errors import EXIT_BAD_MODEL, EXIT_USAGE, IceError, first_line
from ice_onnx.outputs import refuse_unwritable, write_text
from ice_onnx.tuning.candidates import DEFAULT_SPEC
from ice_onnx.tuning.metrics import METRICS


@click.command("tune")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", "calib", required=True, metavar="INPUTS",
              help="Calibration inputs: an .npz of named arrays (axis 0 = samples), a folder of NAME.npy, "
                   "or random:SEQ_LEN.")
@click.option("--budget", type=float, help="cosine metrics: the floor (default 0.99); max-abs: the ceiling.")
@click.option("--metric", type=click.Choice(list(METRICS)), default="cosine", show_default=True,
              help="cosine: each sample's whole output; row-cosine: its worst row; max-abs: largest error. "
                   "The worst calibration sample decides.")
@click.option("--candidates", default=DEFAULT_SPEC, show_default=True,
              help="Settings to try per block: 'exact' and KEY=V1,V2 lists (top_k, compensate=on,off).")
@click.option("--seq-len", type=params.count(), help="Sequence length for --calib random.")
@click.option("--samples", default=4, show_default=True, type=params.count(),
              help="Samples for --calib random.")
@click.option("--exact-below", type=params.attribute(min=0),
              help="exact_below of the blocks given kNN (default: the calibrated number of keys, so they "
                   "run kNN from that length up).")
@click.option("--output-name", "output_names", multiple=True, metavar="NAME",
              help="Judge only this model output (repeatable; default all).")
@click.option("--batch-size", default=4, show_default=True, type=params.count(),
              help="Calibration samples per run.")
@click.option("--rows-per-head", default=32, show_default=True, type=params.count(),
              help="Query rows sampled per head for the per-layer statistics.")
@click.option("--threads", default=1, show_default=True, type=params.count())
@click.option("--backend", type=click.Choice(["auto", "native", "reference"]), default="auto", show_default=True)
@click.option("-o", "--output", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write PLAN.json (default: MODEL with .plan.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan document (with the measurements) as JSON.")
def command(model, calib, budget, metric, candidates, seq_len, samples, exact_below, output_names, batch_size,
            rows_per_head, threads, backend, plan_path, as_json) -> None:
    """Choose per-block kNN settings for MODEL within a fidelity budget; write PLAN.json.

    Apply the plan with `ice-onnx convert MODEL --plan PLAN.json`. Progress goes to stderr.
    """
    from ice_onnx.custom_ops.contract import UnknownAttributeError
    from ice_onnx.tuning import BudgetError, TuneSettings, load_calibration, plan_document, tune
    from ice_onnx.tuning.tuner import render_table

    if not model.is_file():
        raise IceError(f"{model}: no such model file", EXIT_BAD_MODEL)
    plan_path = plan_path or model.with_name(model.name.removesuffix(".onnx") + ".plan.json")
    refuse_unwritable(plan_path)  # before the work, not after it
    settings = TuneSettings(budget=budget, metric=metric, candidates=candidates, exact_below=exact_below,
                            outputs=tuple(output_names), batch_size=batch_size, rows_per_head=rows_per_head,
                            threads=threads, backend=backend)
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    with report_errors(failure="tuning failed"):  # the model's own failures: exit 3 / 4, others one line
        try:
            settings.resolved()  # bad budget / metric / candidates fail before any work
            feeds = load_calibration(calib, _load_graph(model), seq_len=seq_len, samples=samples)
            result = tune(model, feeds, settings, log=log)
        except UnknownAttributeError as exc:  # MODEL holds IceKNNAttention nodes with a name the kernel ignores
            raise IceError(f"{model}: {exc}", EXIT_BAD_MODEL) from None
        except BudgetError as exc:
            raise IceError(str(exc)) from None
        except ValueError as exc:  # calibration inputs, budget, metric, candidates, output names
            raise IceError(first_line(exc), EXIT_USAGE) from None
    document = plan_document(result)
    write_text(plan_path, json.dumps(document, indent=2) + "\n")
    click.echo(json.dumps(document, indent=2) if as_json else render_table(result))
    log(f"wrote {plan_path}; apply it with: ice-onnx convert {model} --plan {plan_path}")


def _load_graph(model: Path):
    """The model's graph (no external weights) for its input names, or a one-line error."""
    import onnx

    from ice_onnx.rewriter import ModelFileError

    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # not protobuf, truncated, ...
        raise ModelFileError(f"{model}: not a readable ONNX model ({first_line(exc)})") from None
