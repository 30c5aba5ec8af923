"""`ice-onnx library-path`: where the custom-op library is, for other runtimes to register."""

import click

from ice_onnx.custom_ops.loader import library_path
from ice_onnx.errors import IceError


@click.command("library-path")
def command() -> None:
    """Print the path of the custom-op shared library (for C, C++, C#, Java, JS)."""
    try:
        click.echo(library_path())
    except (FileNotFoundError, RuntimeError) as exc:  # none built, or ICE_ONNX_KERNEL_LIBRARY names no file
        raise IceError(str(exc)) from None
