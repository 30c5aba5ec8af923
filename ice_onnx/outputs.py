"""The small text outputs of the commands (plans, JSON reports, plots): refused before the work
when they cannot be written, and written whole or not at all.

A FIFO, a device or a socket given as the output is never opened (writing into a FIFO with no
reader blocks for ever) and never replaced; a directory is Click's usage error (`dir_okay=False`).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ice_onnx.errors import EXIT_CANNOT_WRITE, IceError


def refuse_unwritable(path: Path | None) -> None:
    """Exit 5 now, before any work, if `path` could not be written at the end (None: no output)."""
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise IceError(f"cannot write {path}: {exc.strerror or exc}", EXIT_CANNOT_WRITE) from None
    if mode is not None and not stat.S_ISREG(mode):
        raise IceError(f"{path}: not a regular file (refusing to replace it)", EXIT_CANNOT_WRITE)
    folder = Path(os.path.realpath(path)).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise IceError(f"cannot write {path}: its folder is missing or not writable", EXIT_CANNOT_WRITE)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename (a failure leaves the old file as it was)."""
    refuse_unwritable(path)  # again: the path may have changed while the command worked
    target = Path(os.path.realpath(path))  # through a symlink: replace its target, keep the link
    staged = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(staged, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(staged, target)
    except OSError as exc:
        raise IceError(f"cannot write {path}: {exc.strerror or exc}", EXIT_CANNOT_WRITE) from None
    finally:
        staged.unlink(missing_ok=True)
