"""`ice-onnx inspect`: list the attention blocks of a model and what convert would do, without writing."""

from __future__ import annotations

import click

from ice_onnx.commands.convert import report_errors
from ice_onnx.rewriter import inspect_file


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(model: str, as_json: bool) -> None:
    """Print one line per attention block of MODEL: family, heads, scale, mask kind, convertible or why not."""
    with report_errors():
        report = inspect_file(model)
    click.echo(report.to_json() if as_json else report.to_text())
