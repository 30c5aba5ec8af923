"""ice-onnx: IceFormer k-nearest-neighbour attention for ONNX Runtime on CPUs."""

import os as _os

__all__ = ["library_path", "session_options", "__version__"]

_PACKAGE = _os.path.dirname(_os.path.realpath(__file__))
if not _os.path.isdir(_os.path.join(_PACKAGE, "rewriter")):  # a checkout's source folder, not the installed package
    from ice_onnx import _checkout

    _checkout.install(_PACKAGE)


def __getattr__(name: str):
    # Resolved on first use: `import ice_onnx` (which every `ice-onnx` command does before
    # its signal handlers exist) stays free of onnxruntime and package-metadata imports.
    if name in ("library_path", "session_options"):
        from ice_onnx.custom_ops import loader

        return getattr(loader, name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ice-onnx")
        except PackageNotFoundError:  # running from a source tree
            return "0.0.0"
    raise AttributeError(f"module 'ice_onnx' has no attribute {name!r}")
