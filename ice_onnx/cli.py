"""The `ice-onnx` command line: a thin Click group over the package's modules.

Each command lives in `ice_onnx/commands/<name>.py` as a `click.Command` named
`command`; adding one is a file plus a line in COMMANDS.
"""

from __future__ import annotations

import importlib
import sys

import click

from ice_onnx import __version__

COMMANDS = ["convert", "inspect", "library_path", "demo", "bench", "eval", "tune"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ice-onnx")
def main() -> None:
    """IceFormer k-nearest-neighbour attention for ONNX models on ONNX Runtime (CPU)."""


for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"ice_onnx.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command whose module is not written yet
        if exc.name != f"ice_onnx.commands.{_name}":
            raise
        continue
    main.add_command(_module.command)


if __name__ == "__main__":
    sys.exit(main())
