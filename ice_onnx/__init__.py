"""ice-onnx: IceFormer k-nearest-neighbour attention for ONNX Runtime on CPUs."""

from importlib.metadata import PackageNotFoundError, version

from ice_onnx.custom_ops.loader import library_path, session_options

try:
    __version__ = version("ice-onnx")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["library_path", "session_options", "__version__"]
