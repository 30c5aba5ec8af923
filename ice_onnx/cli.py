"""The `ice-onnx` command line: a thin Click group over the package's modules.

Each command lives in `ice_onnx/commands/<module>.py` as a `click.Command` named
`command`; adding one is a file plus an entry in COMMANDS. A command's module (and with
it onnx, onnxruntime, numpy) is imported only when the command runs or help lists it:
by then SIGINT and SIGTERM are handled (one line, exit 130 / 143, staging folders
removed; ice_onnx/interrupts.py), and held during imports.
"""

from __future__ import annotations

import importlib
import signal
import sys

try:
    import click

    from ice_onnx import __version__
    from ice_onnx.errors import IceError, missing_module
    from ice_onnx.interrupts import Interrupted, interruptible
except KeyboardInterrupt:  # Ctrl-C before the handlers below exist: still one line, no traceback
    sys.stderr.write("ice-onnx: error: interrupted\n")
    raise SystemExit(128 + signal.SIGINT) from None

# command name -> module in ice_onnx/commands
COMMANDS = {"convert": "convert", "inspect": "inspect", "library-path": "library_path", "demo": "demo",
            "bench": "bench", "eval": "eval", "tune": "tune", "triton": "triton"}
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class IceGroup(click.Group):
    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name):
        module_name = COMMANDS.get(name)
        if module_name is None:
            return None
        return importlib.import_module(f"ice_onnx.commands.{module_name}").command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's main, with every failure one line on stderr (`ice-onnx: error: ...`), usage
        errors included, and SIGINT / SIGTERM a clean exit 130 / 143."""
        with interruptible():
            try:
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                if not standalone_mode:
                    return result
                sys.exit(result if isinstance(result, int) else 0)  # an int: ctx.exit's code (--help, --version)
            except NO_ARGS_IS_HELP as exc:  # bare `ice-onnx` (Click >= 8.2): the help, as Click shows it
                failure = exc
            except click.UsageError as exc:
                where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
                failure = IceError(exc.format_message() + where, exc.exit_code)
            except click.ClickException as exc:
                failure = exc if isinstance(exc, IceError) else IceError(exc.format_message(), exc.exit_code)
            except click.Abort:
                failure = IceError("aborted")
            except Interrupted as exc:
                failure = IceError(exc.message, exc.exit_code)
            except ModuleNotFoundError as exc:  # an optional dependency (torch, matplotlib ...) is missing
                failure = missing_module(exc)
        if not standalone_mode:
            raise failure
        failure.show()
        sys.exit(failure.exit_code)


@click.group(cls=IceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ice-onnx")
def main() -> None:
    """IceFormer k-nearest-neighbour attention for ONNX models on ONNX Runtime (CPU)."""


if __name__ == "__main__":
    sys.exit(main())
