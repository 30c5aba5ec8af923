"""`ice-onnx eval <task>`: task accuracy of the original and converted models side by side.

Built in: `minilm`, `causal-lm` (any ONNX causal LM on real text). Trained models plug in
from the repository's models/ folder (see ice_onnx/evaluation/tasks.py):
models/<task>/evaluate.py exposing `command`.
"""

from __future__ import annotations

from pathlib import Path

import click

from ice_onnx.commands import params
from ice_onnx.commands.bench import _lengths, refuse_unwritable_reports, run_options, write_reports
from ice_onnx.commands.convert import conversion_options, options_from
from ice_onnx.errors import EXIT_BAD_MODEL, EXIT_USAGE, IceError, first_line
from ice_onnx.outputs import refuse_unwritable


class TaskGroup(click.Group):
    """Built-in tasks plus `models/<task>/evaluate.py` plug-ins, loaded only when asked for."""

    def _plugins(self) -> dict:
        from ice_onnx.evaluation.tasks import models_dir, plugin_tasks

        try:
            return plugin_tasks(models_dir())
        except FileNotFoundError:
            return {}

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        folder = self._plugins().get(name)
        if folder is None:
            return None
        from ice_onnx.evaluation.tasks import import_recipe

        module = import_recipe(folder, "evaluate")
        if not isinstance(getattr(module, "command", None), click.Command):
            raise IceError(f"{folder / 'evaluate.py'} has no click command named `command`")
        return module.command


@click.group("eval", cls=TaskGroup)
def command() -> None:
    """Task accuracy of original and converted models, side by side (JSON with --json).

    Tasks and their models come from the installed `ice_onnx.models` (or the folder
    ICE_ONNX_MODELS names, e.g. a checkout's models/).
    """


def _log(message: str) -> None:
    click.echo(message, err=True)


@command.command("minilm")
@click.option("--passages", default=96, show_default=True, type=params.count(min=2),
              help="real English passages (Python docs, license texts).")
@click.option("--tokens", default=512, show_default=True, type=click.IntRange(8, 512),
              help="tokens per passage (the model learned 512 positions).")
@click.option("--top-k", default=32, show_default=True, type=params.attribute(min=1))
@click.option("--exact-below", default=0, show_default=True, type=params.attribute(min=0),
              help="exact attention below this many keys (0: kNN in every layer).")
@click.option("--compensate", type=click.Choice(["on", "off", "both"]), default="both", show_default=True,
              help="tail compensation of the kernel.")
@params.kernel_attributes("probe_rows=0 for kNN without the accuracy guard")
@click.option("--threads", default=2, show_default=True, type=params.count())
@click.option("--batch-size", default=8, show_default=True, type=params.count())
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the exported MiniLM (default: exported by models/minilm into .cache/models).")
@click.option("--backend", type=click.Choice(["auto", "native", "reference"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="write the report here.")
def minilm(passages, tokens, top_k, exact_below, compensate, attributes, threads, batch_size, model_path, backend,
           json_path):
    """all-MiniLM-L6-v2: embedding cosine and nearest-neighbour passage kept."""
    import onnx

    from ice_onnx.evaluation import minilm as task
    from ice_onnx.evaluation.tasks import recipe, side_by_side, variants, write_json

    refuse_unwritable(json_path)  # before the work, not after it
    try:
        minilm_recipe = recipe("minilm")
        if model_path is None:
            if not minilm_recipe.is_built():
                _log("exporting all-MiniLM-L6-v2 (first run only) ...")
            model_path = minilm_recipe.build()
        _log(f"building {passages} passages of {tokens} tokens ...")
        tokenizer = minilm_recipe.module("export").load_tokenizer()
        passages_data = minilm_recipe.module("corpus").build(tokenizer, passages, tokens)
        compared = variants(model_path, top_k=top_k, exact_below=exact_below, compensate=compensate,
                            attributes=attributes, log=_log)
        report = task.evaluate(onnx.load(str(model_path)), compared, passages_data.feeds(), threads=threads,
                               backend=backend, batch_size=batch_size, log=_log)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise IceError(first_line(exc)) from None
    report["model"] = str(model_path)
    report["passage_labels"] = passages_data.labels
    click.echo(f"all-MiniLM-L6-v2, {passages} passages x {tokens} tokens, {threads} thread(s), "
               f"kernel: {report['backend']}")
    click.echo(side_by_side(report["rows"], task.COLUMNS))
    click.echo(f"targets: mean cosine >= {task.TARGET_MEAN_COSINE}, "
               f"nearest neighbour kept >= {task.TARGET_NEIGHBOURS_KEPT:.0%}")
    if json_path:
        write_json(json_path, report)
        _log(f"wrote {json_path}")


@command.command("causal-lm")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(path_type=Path),
              help="the model's tokenizer.json, or a Hugging Face tokenizer folder holding one.")
@click.option("--text", "texts", required=True, multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="a UTF-8 text file, scored from its first token (repeatable).")
@click.option("--lengths", default="2048,4096,8192", show_default=True, callback=_lengths,
              help="comma-separated window lengths in tokens (one forward pass over each text's first L).")
@conversion_options
@params.kernel_attributes("scan_fraction=0.05")
@click.option("--threads", default=2, show_default=True, type=params.count(),
              help="intra-op threads, the same for both models.")
@click.option("--repeats", default=3, show_default=True, type=params.count(),
              help="timed forward passes of each model per window, interleaved (median reported).")
@click.option("--warmup", default=1, show_default=True, type=params.count(min=0),
              help="untimed passes of each model per window first.")
@click.option("--special-tokens/--no-special-tokens", default=True, show_default=True,
              help="let the tokenizer add its special tokens (e.g. a leading BOS).")
@run_options("perplexity ratio and speed-up against length; needs matplotlib")
def causal_lm(model, tokenizer_path, texts, lengths, attributes, threads, repeats, warmup, special_tokens, backend,
              memory_pattern, json_path, plot_path, **conversion):
    """Next-token perplexity, argmax agreement and forward-pass time of MODEL and MODEL converted
    (with the convert options given), per length, on real text."""
    from ice_onnx.custom_ops.contract import UnknownAttributeError
    from ice_onnx.evaluation import causal_lm as task
    from ice_onnx.evaluation.plot import plot_causal_lm
    from ice_onnx.rewriter import ModelFileError

    if not model.is_file():
        raise IceError(f"{model}: no such model file", EXIT_BAD_MODEL)
    for path in (tokenizer_path, *texts):
        if not path.exists():
            raise IceError(f"{path}: no such file", EXIT_USAGE)
    refuse_unwritable_reports(json_path, plot_path)
    options = options_from(**conversion)
    try:
        report = task.run(model, tokenizer_path, list(texts), options, lengths=lengths, threads=threads,
                          repeats=repeats, warmup=warmup, backend=backend, memory_pattern=memory_pattern,
                          special_tokens=special_tokens, attributes=attributes, log=_log)
    except ModelFileError as exc:
        raise IceError(str(exc), EXIT_BAD_MODEL) from None
    except UnknownAttributeError as exc:  # MODEL was converted elsewhere, with a name the kernel ignores
        raise IceError(f"{model}: {exc}", EXIT_BAD_MODEL) from None
    except (ValueError, RuntimeError, OSError) as exc:
        raise IceError(first_line(exc)) from None
    click.echo(task.render(report))
    write_reports(report, json_path, plot_path, plot_causal_lm)
