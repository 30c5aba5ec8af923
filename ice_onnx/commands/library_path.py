"""`ice-onnx library-path`: where the custom-op library is, for other runtimes to register."""

import click

from ice_onnx.errors import IceError
from ice_onnx.custom_ops.loader import library_path


@click.command("library-path")
def command() -> None:
    """Print the path of the custom-op shared library (for C, C++, C#, Java, JS)."""
    try:
        click.echo(library_path())
    except FileNotFoundError as exc:
        raise IceError(str(exc)) from None
