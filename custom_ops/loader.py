"""Where the native custom-op library lives, and sessions that have it registered."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

LIBRARY_NAME = "libice_onnx_ops.so"


def library_path() -> str:
    """Absolute path of the IceKNNAttention custom-op shared library."""
    path = Path(__file__).resolve().with_name(LIBRARY_NAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"{LIBRARY_NAME} is not next to {Path(__file__).name}: the package was installed "
            "without its native build (reinstall with `pip install .`)"
        )
    return str(path)


def session_options(**options) -> ort.SessionOptions:
    """An onnxruntime.SessionOptions with the library registered and `options` set on it.

    Example: ``session_options(intra_op_num_threads=2)``.
    """
    so = ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    for name, value in options.items():
        if not hasattr(so, name):
            raise AttributeError(f"onnxruntime.SessionOptions has no option {name!r}")
        setattr(so, name, value)
    return so
