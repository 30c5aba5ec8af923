"""`ice-onnx eval <task>`: task accuracy of the original and converted models side by side.

Built in: `minilm`. Trained models plug in from the repository's models/ folder
(see ice_onnx/evaluation/tasks.py): models/<task>/evaluate.py exposing `command`.
"""

from __future__ import annotations

from pathlib import Path

import click

from ice_onnx.errors import IceError


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
@click.option("--passages", default=96, show_default=True, type=click.IntRange(min=2),
              help="real English passages (Python docs, license texts).")
@click.option("--tokens", default=512, show_default=True, type=click.IntRange(8, 512),
              help="tokens per passage (the model learned 512 positions).")
@click.option("--top-k", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--exact-below", default=0, show_default=True, type=click.IntRange(min=0),
              help="exact attention below this many keys (0: kNN in every layer).")
@click.option("--compensate", type=click.Choice(["on", "off", "both"]), default="both", show_default=True,
              help="tail compensation of the kernel.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the exported MiniLM (default: exported by models/minilm into .cache/models).")
@click.option("--backend", type=click.Choice(["auto", "native", "reference"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="write the report here.")
def minilm(passages, tokens, top_k, exact_below, compensate, threads, batch_size, model_path, backend, json_path):
    """all-MiniLM-L6-v2: embedding cosine and nearest-neighbour passage kept."""
    import onnx

    from ice_onnx.evaluation import minilm as task
    from ice_onnx.evaluation.tasks import models_dir, side_by_side, variants, write_json

    try:
        export, corpus = task.load_recipe(models_dir())
        if model_path is None:
            if not export.default_path().is_file():
                _log("exporting all-MiniLM-L6-v2 (first run only) ...")
            model_path = export.export()
        _log(f"building {passages} passages of {tokens} tokens ...")
        passages_data = corpus.build(export.load_tokenizer(), passages, tokens)
        compared = variants(model_path, top_k=top_k, exact_below=exact_below, compensate=compensate, log=_log)
        report = task.evaluate(onnx.load(str(model_path)), compared, passages_data.feeds(), threads=threads,
                               backend=backend, batch_size=batch_size, log=_log)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise IceError(str(exc).splitlines()[0]) from None
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
