"""Imports from a checkout: the top-level folders become the subpackages the wheel installs.

The wheel maps `rewriter/`, `custom_ops/` and `models/` into `ice_onnx` (pyproject.toml,
`wheel.packages`). Python run at the repository root finds the source folder `ice_onnx/`
before the installed package, and that folder lacks those three subpackages. Rather than
move the folders (the top-level layout is the design's), `install()` adds an import finder
that resolves `ice_onnx.rewriter`, `ice_onnx.custom_ops` and `ice_onnx.models` to the
checkout's folders, so that what `import` finds from the root is the code seen there. In an
installed package the subpackages are real folders and nothing is added.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# The folders pyproject.toml's wheel.packages maps into ice_onnx (tests/test_package.py
# checks that the two lists agree).
SUBPACKAGES = ("rewriter", "custom_ops", "models")


class CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds `ice_onnx.<name>` in `<root>/<name>/`; submodules then load through the
    package's `__path__` as usual."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def checkout_folders(package: str | Path) -> dict[str, Path]:
    """Module name -> folder for each subpackage missing from `package` (the ice_onnx folder)
    that its parent holds: empty for an installed package and outside a checkout."""
    package = Path(package)
    root = package.parent
    if not (root / "pyproject.toml").is_file():
        return {}
    return {f"{package.name}.{name}": root / name for name in SUBPACKAGES
            if not (package / name).exists() and (root / name / "__init__.py").is_file()}


def install(package: str | Path) -> None:
    folders = checkout_folders(package)
    if folders and not any(isinstance(finder, CheckoutFolders) for finder in sys.meta_path):
        sys.meta_path.append(CheckoutFolders(folders))
