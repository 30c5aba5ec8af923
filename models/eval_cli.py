"""What the trained models' `ice-onnx eval <task>` commands share: their options.

Plain Click, so a recipe imports it without the installed ice_onnx package."""

from __future__ import annotations

from pathlib import Path

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
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="write the metrics here."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
