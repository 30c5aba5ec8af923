"""`ice-onnx convert`: replace the attention blocks of a model with IceKNNAttention."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from ice_onnx.commands import params
from ice_onnx.custom_ops import contract
from ice_onnx.errors import (EXIT_BAD_MODEL, EXIT_CANNOT_WRITE, EXIT_FAILURE, EXIT_NO_ATTENTION, EXIT_USAGE, IceError,
                             first_line)
from ice_onnx.rewriter import (ConvertOptions, ModelFileError, ModelWriteError, NoAttentionError, OutputIsInputError,
                               convert_file, parse_layers, parse_plan)
from ice_onnx.rewriter.model_io import data_files

# Above this many bytes the CLI shows a progress bar while writing weights.
PROGRESS_THRESHOLD = 64 * 2**20


@contextlib.contextmanager
def report_errors(failure: str = "conversion failed"):
    """Turn the rewriter's failures into one-line CLI errors with documented exit codes; any
    other exception becomes `failure: <its first line>` (exit 1). IceErrors pass through, so
    a command can map its own exceptions inside the block."""
    try:
        yield
    except IceError:
        raise
    except NoAttentionError as exc:
        raise IceError(str(exc), EXIT_NO_ATTENTION) from None
    except OutputIsInputError as exc:
        raise IceError(str(exc), EXIT_USAGE) from None
    except ModelWriteError as exc:
        raise IceError(str(exc), EXIT_CANNOT_WRITE) from None
    except ModelFileError as exc:
        raise IceError(str(exc), EXIT_BAD_MODEL) from None
    except Exception as exc:  # noqa: BLE001 - never a traceback for a bad model
        raise IceError(f"{failure}: {first_line(exc)}", EXIT_FAILURE) from None


def conversion_options(command):
    """The options that say how blocks are converted: --top-k, --exact-below, --seed,
    --no-compensate, --probe-rows, --max-error, --layers, --plan. `ice-onnx eval causal-lm` takes them too; the
    command's function gets them as keyword arguments for `options_from`."""
    options = [
        click.option("--top-k", type=params.attribute(min=1), default=ConvertOptions.top_k, show_default=True,
                     help="Keys per query in kNN mode."),
        click.option("--exact-below", type=params.attribute(min=0), default=ConvertOptions.exact_below,
                     show_default=True, help="Exact attention when fewer keys than this."),
        click.option("--seed", type=params.attribute(), default=ConvertOptions.seed, show_default=True,
                     help="Seed of the index."),
        click.option("--no-compensate", is_flag=True, help="Pure top-k: no estimate of the keys left out."),
        click.option("--probe-rows", type=click.IntRange(0, contract.MAX_PROBE_ROWS),
                     help="Accuracy guard: rows per head run both ways before kNN (0 = no guard; "
                          f"default: the kernel's, {contract.Attributes.probe_rows})."),
        click.option("--max-error", type=params.FiniteFloat(min=0.0),
                     help="Accuracy guard: the probed rows' relative error above which a head retrieves more "
                          f"keys, then runs exactly (default: the kernel's, {contract.Attributes.max_error})."),
        click.option("--layers", "layers_spec", metavar="SPEC",
                     help="Blocks to convert, e.g. 0-3,6,9- (0-based, graph order)."),
        click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False),
                     help='Per-block settings, JSON: {"blocks": [{"index": 0, "top_k": 64}, ...]} (e.g. from a '
                          'tuner).'),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def options_from(top_k, exact_below, seed, no_compensate, probe_rows, max_error, layers_spec,
                 plan_file) -> ConvertOptions:
    """The ConvertOptions of `conversion_options`' values; a bad --layers or --plan is a usage error."""
    try:
        layers = parse_layers(layers_spec) if layers_spec else None
        plan = parse_plan(open(plan_file, encoding="utf-8").read()) if plan_file else {}
    except (ValueError, OSError) as exc:
        raise IceError(str(exc), EXIT_USAGE) from None
    return ConvertOptions(top_k=top_k, exact_below=exact_below, seed=seed, compensate=0 if no_compensate else 1,
                          layers=layers, plan=plan, probe_rows=probe_rows, max_error=max_error)


@click.command("convert")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Where to write the converted model "
              "(default: MODEL with .ice.onnx; for a genai folder, MODEL.ice).")
@conversion_options
@click.option("--in-place", is_flag=True, help="Allow the output to overwrite the input.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model, output, in_place, as_json, **conversion) -> None:
    """Convert MODEL: every attention block becomes one IceKNNAttention node. MODEL may be an
    onnxruntime-genai model folder (with genai_config.json): the output is then a folder genai
    loads as it is (the converted decoder, the op library, the config naming it)."""
    options = options_from(**conversion)
    if os.path.isdir(model):
        report = _convert_genai_folder(model, output, in_place, options)
    else:
        if output is not None and os.path.isdir(output):
            raise IceError(f"{output}: a folder (the output of a model file is a file)", EXIT_USAGE)
        if output is None:
            output = model if in_place else _default_output(model)
        with report_errors(), _progress(model) as progress:
            report = convert_file(model, output, options, in_place=in_place, progress=progress)
    click.echo(report.to_json() if as_json else report.to_text())


def _convert_genai_folder(folder: str, output: str | None, in_place: bool, options: ConvertOptions):
    from ice_onnx.serving import genai

    if not genai.is_model_folder(folder):
        raise IceError(f"{folder}: a folder without {genai.CONFIG_FILE} (convert takes an ONNX model file or an "
                       "onnxruntime-genai model folder)", EXIT_USAGE)
    if output is None:
        output = folder if in_place else genai.default_output(folder)
    with report_errors():
        decoder = os.path.join(folder, genai.read_config(Path(folder))[1])
        with _progress(decoder) as progress:
            return genai.convert_folder(folder, output, options, in_place=in_place, progress=progress).report


def _default_output(model: str) -> str:
    stem = model[: -len(".onnx")] if model.endswith(".onnx") else model
    return stem + ".ice.onnx"


@contextlib.contextmanager
def _progress(model: str):
    """A progress bar on stderr while a large model's weights are written, on a terminal only:
    elsewhere stderr carries nothing but the one-line error, if any."""
    try:
        large = os.path.getsize(model) > PROGRESS_THRESHOLD or bool(data_files(model))
    except OSError:
        large = False
    if not large or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=1, label="writing", file=sys.stderr) as bar:
        def advance(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)
        yield advance
