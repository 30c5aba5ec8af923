"""SIGINT and SIGTERM in the CLI: a clean exit (one line, 130 / 143) that runs every clean-up.

While `interruptible()` is active (the whole of an `ice-onnx` command) both signals raise
Interrupted in the main thread, where Python runs signal handlers, so that the `finally`
blocks on the way out remove staging folders. Inside `signals_held()` a signal is only
recorded and raised when the outermost hold ends: around steps that must not be cut in
two, and around every import, because an exception raised inside the initialisation of a
C extension (onnx's, onnxruntime's) crashes the process or turns into an ImportError.
The hold is kept by the handler, not by a signal mask, since any thread (onnxruntime's
pool included) may be the one the kernel delivers a signal to.
"""

from __future__ import annotations

import builtins
import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
MESSAGES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class Interrupted(BaseException):
    """SIGINT or SIGTERM: a BaseException, so `except Exception` never swallows it; not
    KeyboardInterrupt, which Click turns into "Aborted!" and exit 1."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.exit_code = 128 + signal_number
        self.message = MESSAGES.get(signal_number, "interrupted")


class _Holds(threading.local):
    depth = 0
    pending: int | None = None


_holds = _Holds()


class signals_held:  # noqa: N801 - used as a context manager, like contextlib's
    """A signal arriving inside the block is raised as Interrupted when the outermost hold ends."""

    def __enter__(self) -> None:
        _holds.depth += 1

    def __exit__(self, *exc_info) -> None:
        _holds.depth -= 1
        if _holds.depth == 0 and _holds.pending is not None:
            signal_number, _holds.pending = _holds.pending, None
            _interrupt(signal_number)


def _interrupt(signal_number: int):
    for number in SIGNALS:  # the clean-up on the way out is not itself interrupted
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signal_number)


def _handler(signal_number: int, _frame) -> None:
    if _holds.depth:
        _holds.pending = _holds.pending or signal_number
        return
    _interrupt(signal_number)


@contextlib.contextmanager
def interruptible():
    """SIGINT / SIGTERM raise Interrupted, imports hold them; all restored afterwards (the
    CLI also runs in-process, in tests). Outside the main thread this does nothing: only
    the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    importer = builtins.__import__

    def held_import(*args, **kwargs):
        with signals_held():
            return importer(*args, **kwargs)

    previous = {number: signal.signal(number, _handler) for number in SIGNALS}
    builtins.__import__ = held_import
    try:
        yield
    finally:
        builtins.__import__ = importer
        _holds.pending = None
        for number, handler in previous.items():
            signal.signal(number, handler)
