"""What the kernel did on the runs in between: which path each call took, how many heads
ran kNN or were sent to exact attention by the guard, and how many keys the index gave
each query row.

The counters live in the native library (custom_ops/src/run_stats.h). They are read
through ctypes from the same library file ONNX Runtime registers (`loader.library_path()`,
which honours $ICE_ONNX_KERNEL_LIBRARY): a second dlopen of one file returns the same
handle, so these are the counters the sessions add to. They are process-wide: sessions
running at the same time, in other threads, add to the same counters.

    from ice_onnx.custom_ops.run_stats import run_stats

    with run_stats() as stats:
        session.run(None, feeds)
    assert stats.knn_calls == 1 and stats.guarded_heads == 0
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from contextlib import contextmanager
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class RunStats:
    """Counter values (since the last reset), named as in run_stats.h."""

    exact_calls: int = 0
    knn_calls: int = 0
    exact_heads: int = 0  # (batch, query-head) pairs attended exactly, in either kind of call
    knn_heads: int = 0  # pairs attended through the index
    guarded_heads: int = 0  # pairs of kNN calls the guard sent to exact attention
    knn_rows: int = 0  # query rows attended through the index
    keys_scored: int = 0  # keys the index gave those rows, summed
    keys_scored_max: int = 0  # most keys the index gave one row
    keys_visible: int = 0  # keys those rows may see, summed

    @property
    def calls(self) -> int:
        return self.exact_calls + self.knn_calls

    @property
    def mean_keys_scored(self) -> float:
        """Keys the index gave a kNN row, on average (0.0 without kNN rows)."""
        return self.keys_scored / self.knn_rows if self.knn_rows else 0.0

    @property
    def scored_fraction(self) -> float:
        """Share of the visible keys the index gave kNN rows (0.0 without kNN rows)."""
        return self.keys_scored / self.keys_visible if self.keys_visible else 0.0


class Recorder:
    """What `run_stats()` yields: the counters of the runs inside the block, readable
    while it runs (`current()`) and, once it has ended, as attributes."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library
        self._final: RunStats | None = None

    def current(self) -> RunStats:
        return self._final if self._final is not None else _read(self._library)

    def _finish(self) -> None:
        self._final = _read(self._library)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.current(), name)

    def __repr__(self) -> str:
        return f"Recorder({self.current()})"


@contextmanager
def run_stats(library: str | None = None) -> Iterator[Recorder]:
    """Resets the counters, then yields a Recorder of the runs inside the block.

    `library`: the library file to read (default: the one `loader.library_path()` names,
    the one sessions register). Blocks do not nest: each starts from zero."""
    handle = _library(library)
    handle.IceOnnxStatsReset()
    recorder = Recorder(handle)
    try:
        yield recorder
    finally:
        recorder._finish()


def read(library: str | None = None) -> RunStats:
    """The counters now (since the last reset)."""
    return _read(_library(library))


def reset(library: str | None = None) -> None:
    _library(library).IceOnnxStatsReset()


def _read(handle: ctypes.CDLL) -> RunStats:
    count = handle.IceOnnxStatsCount()
    values = (ctypes.c_int64 * count)()
    got = handle.IceOnnxStatsRead(values, count)
    by_name = {handle.IceOnnxStatsName(i).decode(): values[i] for i in range(got)}
    known = {field.name for field in dataclasses.fields(RunStats)}
    # A library with counters this module does not know yet still reads; one that lacks
    # a known counter is a build mismatch and must not read as zero.
    missing = known - by_name.keys()
    if missing:
        raise RuntimeError(f"the op library has no run counter {', '.join(sorted(missing))}: "
                           "it is older than this package")
    return RunStats(**{name: by_name[name] for name in known})


def _library(path: str | None) -> ctypes.CDLL:
    if path is None:
        from ice_onnx.custom_ops.loader import library_path

        path = library_path()
    return _open(str(path))


@functools.lru_cache(maxsize=None)
def _open(path: str) -> ctypes.CDLL:
    # Kept open for the process: the counters must outlive any one session's handle.
    handle = ctypes.CDLL(path)
    handle.IceOnnxStatsCount.restype = ctypes.c_int64
    handle.IceOnnxStatsName.restype = ctypes.c_char_p
    handle.IceOnnxStatsName.argtypes = [ctypes.c_int64]
    handle.IceOnnxStatsRead.restype = ctypes.c_int64
    handle.IceOnnxStatsRead.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    handle.IceOnnxStatsReset.restype = None
    return handle
