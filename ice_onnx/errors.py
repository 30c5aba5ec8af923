"""Errors the CLI reports as one line on stderr with a documented exit code."""

from __future__ import annotations

import click

# Exit codes (documented in README): 0 ok, 1 any other failure, 2 usage error (Click's
# own, and contradictory options), 3 the model has no attention block to convert,
# 4 the input is not a readable, valid ONNX model, 5 the output cannot be written.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_ATTENTION = 3
EXIT_BAD_MODEL = 4
EXIT_CANNOT_WRITE = 5


class IceError(click.ClickException):
    """A user-facing failure: one line on stderr, a documented exit code, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"ice-onnx: error: {self.format_message()}", err=True, file=file)
