"""`ice-onnx bench`: time and fidelity of a converted model against its original."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ice_onnx.commands import params
from ice_onnx.errors import EXIT_BAD_MODEL, IceError, first_line, require_module
from ice_onnx.outputs import refuse_unwritable, write_text


def _lengths(ctx, param, value: str) -> list[int]:
    try:
        lengths = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 1024,4096") from None
    if not lengths or min(lengths) < 1 or max(lengths) > params.INT32_MAX:
        raise click.BadParameter(f"give at least one length, each from 1 to {params.INT32_MAX}")
    return lengths


def run_options(plot: str):
    """--backend, --memory-pattern, --json and --plot, for the commands that run an original and a
    converted model side by side (`bench`, `eval causal-lm`); `plot` says what the PNG shows."""
    def decorate(command):
        options = [
            click.option("--backend", type=click.Choice(["auto", "native", "reference"]), default="auto",
                         show_default=True, help="kernel for the converted model (reference: the slow numpy oracle)."),
            click.option("--memory-pattern/--no-memory-pattern", default=True, show_default=True,
                         help="ONNX Runtime's memory pattern planning and CPU arena, for both models; off lets a "
                              "dense model run at lengths whose planned S x S buffers do not fit (e.g. 16K tokens in "
                              "24 GiB), and frees each run's buffers before the other model runs."),
            click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                         help="write the report here."),
            click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
                         help=f"write a PNG ({plot})."),
        ]
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def refuse_unwritable_reports(json_path: Path | None, plot_path: Path | None) -> None:
    """Before the work: `run_options`' outputs can be written, and --plot has matplotlib."""
    refuse_unwritable(json_path)
    refuse_unwritable(plot_path)
    if plot_path:
        require_module("matplotlib")


def write_reports(report: dict, json_path: Path | None, plot_path: Path | None, plot) -> None:
    """`run_options`' --json and --plot outputs (refused before the work if unwritable);
    `plot(report, path)` draws the PNG."""
    if json_path:
        write_text(json_path, json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        try:
            plot(report, plot_path)
        except ValueError as exc:  # nothing ran that could be plotted
            raise IceError(str(exc)) from None
        click.echo(f"wrote {plot_path}", err=True)


@click.command("bench")
@click.argument("original", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("converted", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seq-len", "seq_lens", default="1024,4096", show_default=True, callback=_lengths,
              help="Comma-separated sequence lengths.")
@click.option("--batch", default=1, show_default=True, type=params.count())
@click.option("--threads", default=2, show_default=True, type=params.count(),
              help="intra-op threads, the same for both models.")
@click.option("--top-k", type=params.attribute(min=1), help="keys per query (conversion, or override).")
@click.option("--exact-below", type=params.attribute(min=0), help="exact attention below this many keys.")
@click.option("--compensate/--no-compensate", default=None,
              help="tail compensation on/off (default: as converted).")
@click.option("--repeat", default=5, show_default=True, type=params.count(),
              help="timed runs of each model per length (median reported).")
@click.option("--layers/--no-layers", "layer_stats", default=True, show_default=True,
              help="per-layer mass captured, recall of the exact top-k and output error.")
@click.option("--rows-per-head", default=64, show_default=True, type=params.count(),
              help="query rows sampled per head for the per-layer statistics.")
@run_options("speed-up and fidelity against length")
def command(original, converted, seq_lens, batch, threads, top_k, exact_below, compensate, repeat,
            layer_stats, rows_per_head, backend, memory_pattern, json_path, plot_path) -> None:
    """Run ORIGINAL and CONVERTED (converted on the fly if absent) on the same inputs.

    Reports per length the end-to-end time ratio (median of interleaved repeats), output
    fidelity and per-layer retrieval statistics. Progress goes to stderr.
    """
    from ice_onnx.custom_ops.contract import UnknownAttributeError
    from ice_onnx.evaluation import bench

    refuse_unwritable_reports(json_path, plot_path)
    settings = bench.BenchSettings(
        seq_lens=seq_lens, batch=batch, threads=threads, repeat=repeat, top_k=top_k,
        exact_below=exact_below, compensate=None if compensate is None else int(compensate),
        backend=backend, layer_stats=layer_stats, rows_per_head=rows_per_head, memory_pattern=memory_pattern)
    try:
        report = bench.run(original, converted, settings, log=lambda m: click.echo(m, err=True))
    except UnknownAttributeError as exc:  # the kernel would ignore the name: not a model it can run as meant
        raise IceError(f"{converted}: {exc}", EXIT_BAD_MODEL) from None
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise IceError(first_line(exc)) from None
    click.echo(bench.render_table(report))
    from ice_onnx.evaluation.plot import plot_bench

    write_reports(report, json_path, plot_path, plot_bench)
