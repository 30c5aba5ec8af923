"""Where the native custom-op library lives, and sessions that have it registered."""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

LIBRARY_NAME = "libice_onnx_ops.so"
# Names a build to use instead of the installed one (a sanitizer or a development build).
LIBRARY_ENV = "ICE_ONNX_KERNEL_LIBRARY"
DISTRIBUTION = "ice-onnx"


def library_path() -> str:
    """Absolute path of the IceKNNAttention custom-op shared library.

    In this order: the file $ICE_ONNX_KERNEL_LIBRARY names; the library beside this module
    (an installed package); from a checkout, the installed distribution's copy, then the one
    `pip install .` builds in build/<wheel tag>/. Raises FileNotFoundError when there is none,
    RuntimeError when $ICE_ONNX_KERNEL_LIBRARY names no file (never a silent substitute)."""
    chosen = os.environ.get(LIBRARY_ENV)
    if chosen:
        path = Path(chosen).resolve()
        if not path.is_file():
            raise RuntimeError(f"{LIBRARY_ENV}={chosen}: no such file")
        return str(path)
    for path in _candidates():
        if path.is_file():
            return str(path.resolve())
    raise FileNotFoundError(f"{LIBRARY_NAME} not found: build and install the package (`make install` or "
                            f"`pip install .`), or set {LIBRARY_ENV} to a build of it")


def _candidates():
    here = Path(__file__).resolve().parent
    yield here / LIBRARY_NAME
    if not (here / "CMakeLists.txt").is_file():  # an installed package: nothing else is ours
        return
    try:
        yield Path(metadata.distribution(DISTRIBUTION).locate_file(f"ice_onnx/custom_ops/{LIBRARY_NAME}"))
    except metadata.PackageNotFoundError:
        pass
    # scikit-build-core's build-dir (pyproject.toml): build/{wheel_tag}; the wheel is py3-none.
    yield from sorted(here.parent.glob(f"build/py3-none-*/custom_ops/{LIBRARY_NAME}"))


def session_options(**options) -> ort.SessionOptions:
    """An onnxruntime.SessionOptions with the library registered and `options` set on it.

    Example: ``session_options(intra_op_num_threads=2)``.
    """
    return build_session_options([library_path()], **options)


def build_session_options(libraries: Iterable[str] = (), **options) -> ort.SessionOptions:
    """An onnxruntime.SessionOptions with each custom-op library in `libraries` registered and
    `options` set on it; a name SessionOptions lacks is an AttributeError, not a silent no-op."""
    so = ort.SessionOptions()
    for library in libraries:
        so.register_custom_ops_library(library)
    for name, value in options.items():
        if not hasattr(so, name):
            raise AttributeError(f"onnxruntime.SessionOptions has no option {name!r}")
        setattr(so, name, value)
    return so
