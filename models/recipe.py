"""The interface every model recipe implements, and the registry that finds them.

A recipe is one folder `models/<package>/` whose `__init__.py` sets `RECIPE`, a `Recipe`:
its name (as `ice-onnx eval <name>` and `python -m models` spell it), the ONNX model it
makes, whether that model is there, and how to make it. A recipe with an `evaluate.py`
exposing a click command `command` is also an `ice-onnx eval` task.

Two kinds exist: `TrainedRecipe`, a model trained here whose checkpoint and ONNX file
are committed in its folder (building = exporting the checkpoint), and recipes of
published weights (MiniLM, SmolLM2) that build into a cache folder (`cache_folder`).

Importing this module and the recipes' `__init__.py` files is cheap (no torch, no
onnxruntime): the heavy modules load only when a hook runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType


def cache_folder(env_var: str, name: str) -> Path:
    """Where a recipe keeps what it builds: $env_var, the checkout's .cache/<name>, or
    ~/.cache/ice-onnx/<name> when installed (no checkout around the package)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / name
    return Path.home() / ".cache" / "ice-onnx" / name


class Recipe:
    """One model this repository makes. A subclass says where the model lives
    (`model_path`) and how it is made (`build`)."""

    def __init__(self, name: str, package: str, summary: str):
        self.name = name  # dashes, as on the command line
        self.package = package  # the recipe's import name, e.g. "models.listops" or "ice_onnx.models.listops"
        self.summary = summary  # one line, for `python -m models`
        self.folder = Path(sys.modules[package].__file__).resolve().parent

    def module(self, name: str) -> ModuleType:
        """The recipe's module `name` (e.g. "task", "export"), imported under its package."""
        return importlib.import_module(f"{self.package}.{name}")

    def model_path(self) -> Path:
        """The ONNX file `ice-onnx eval` and the demo run."""
        raise NotImplementedError

    def is_built(self) -> bool:
        return self.model_path().is_file()

    def build(self, force: bool = False, log=print) -> Path:
        """Make the model unless it is already there (`force`: again); returns `model_path()`."""
        raise NotImplementedError

    def has_eval_task(self) -> bool:
        return (self.folder / "evaluate.py").is_file()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class TrainedRecipe(Recipe):
    """A model trained here (`python -m <package>.train`). Its checkpoint, training log and
    ONNX file live in its folder; building exports the checkpoint (`<package>.export`)."""

    def __init__(self, name: str, package: str, summary: str, onnx_file: str):
        super().__init__(name, package, summary)
        self.onnx_file = self.folder / onnx_file
        self.checkpoint = self.folder / "checkpoints" / "last.pt"
        self.training_log = self.folder / "train_log.jsonl"

    def model_path(self) -> Path:
        return self.onnx_file

    def build(self, force: bool = False, log=print) -> Path:
        if force or not self.is_built():
            from .exporting import export_trained

            log(f"export {self.checkpoint} -> {self.onnx_file}")
            export_trained(self, self.checkpoint, self.onnx_file)
        return self.onnx_file


def recipes() -> dict[str, Recipe]:
    """Every recipe in this package, by name."""
    found = {}
    for folder in sorted(Path(__file__).resolve().parent.iterdir()):
        if (folder / "__init__.py").is_file():
            recipe = getattr(importlib.import_module(f"{__package__}.{folder.name}"), "RECIPE", None)
            if isinstance(recipe, Recipe):
                found[recipe.name] = recipe
    return found


def get(name: str) -> Recipe:
    """The recipe called `name`; a KeyError names the ones there are."""
    known = recipes()
    if name not in known:
        raise KeyError(f"no recipe {name!r} (there are: {', '.join(known)})")
    return known[name]
