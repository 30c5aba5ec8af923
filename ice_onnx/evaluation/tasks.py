"""What every `ice-onnx eval` task shares: finding the recipes, the converted variants to
compare, and the side-by-side table.

A task is a Click command. MiniLM's is built in (`ice_onnx.evaluation.minilm`); the
trained models plug in from the repository: `models/<task>/evaluate.py` exposing a
`click.Command` named `command` appears as `ice-onnx eval <task>` (underscores in the
folder name become dashes), e.g. models/line_retrieval/evaluate.py -> `eval line-retrieval`.
Such a command can reuse `variants`, `side_by_side` and `write_json` from here.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

from ice_onnx.evaluation.runtime import convert, with_attributes

MODELS_DIR_ENV = "ICE_ONNX_MODELS"
COMPENSATION_CHOICES = {"on": (1,), "off": (0,), "both": (1, 0)}


def models_dir() -> Path:
    """The models folder: $ICE_ONNX_MODELS, else the package's `ice_onnx.models` (installed, or a checkout's models/)."""
    if os.environ.get(MODELS_DIR_ENV):
        path = Path(os.environ[MODELS_DIR_ENV]).resolve()
    else:
        import ice_onnx.models

        path = Path(next(iter(ice_onnx.models.__path__))).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no models folder at {path}: set {MODELS_DIR_ENV} to one (a checkout's models/)")
    return path


def import_recipe(folder: Path, module: str | None = None):
    """Import `<task folder>/<module>.py` (or, without `module`, the folder's package) under
    its package name (`ice_onnx.models.minilm.export` when installed, `models.minilm.export`
    in a checkout), so relative imports work."""
    folder = folder.resolve()
    parts, root = [folder.name, folder.parent.name], folder.parent.parent
    while (root / "__init__.py").is_file():
        parts.append(root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.append(str(root))
    return importlib.import_module(".".join([*reversed(parts), *([module] if module else [])]))


def recipe(name: str):
    """The recipe (models/recipe.py's `Recipe`) called `name` in the models folder."""
    return import_recipe(models_dir() / name.replace("-", "_")).RECIPE


def plugin_tasks(directory: Path) -> dict[str, Path]:
    """Task name -> recipe folder, for every `models/<task>/evaluate.py`."""
    return {folder.name.replace("_", "-"): folder for folder in sorted(directory.iterdir())
            if (folder / "evaluate.py").is_file()}


@dataclass
class Variant:
    """One converted model to compare with the original."""

    label: str
    model: onnx.ModelProto
    settings: dict


def variants(original: Path, *, top_k: int, exact_below: int, compensate: str = "on",
             attributes: dict | None = None, log=lambda message: None) -> list[Variant]:
    """The original converted once, then one variant per compensation setting asked for,
    with `attributes` (NAME -> value, CONTRACT.md) set on every converted block."""
    converted = convert(original, top_k=top_k, exact_below=exact_below, log=log)
    result = []
    for flag in COMPENSATION_CHOICES[compensate]:
        settings = {"top_k": top_k, "exact_below": exact_below, "compensate": flag, **(attributes or {})}
        label = " ".join(f"{name}={value}" for name, value in settings.items() if name != "compensate")
        label += f" compensate={'on' if settings['compensate'] else 'off'}"
        kernel = {name: value for name, value in settings.items() if name not in ("top_k", "exact_below")}
        result.append(Variant(label, with_attributes(converted, **kernel), settings))
    return result


def side_by_side(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: `columns` are (key, heading, format spec); None prints as '-'."""
    cells = [[heading for _, heading, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    """The report as indented JSON, written whole (a FIFO or device is refused, exit 5)."""
    from ice_onnx.outputs import write_text

    write_text(path, json.dumps(report, indent=2) + "\n")


def compare_with_variants(model: Path, evaluate, *, convert: bool, top_k: int, exact_below: int, compensate: str,
                          threads: int, backend: str, memory_pattern: bool = True, attributes: dict | None = None,
                          log=lambda message: None):
    """`evaluate(session)` on the original model, then on each converted variant (if `convert`).

    Returns the original's metrics and a list of (variant, metrics); a variant's metrics
    also say what the kernel did (runtime.observed_kernel)."""
    from ice_onnx.evaluation.runtime import observed_kernel, open_session

    log(f"evaluating {model.name} ...")
    original = evaluate(open_session(onnx.load(str(model)), threads, backend, memory_pattern=memory_pattern))
    results = []
    if convert:
        for variant in variants(model, top_k=top_k, exact_below=exact_below, compensate=compensate,
                                attributes=attributes, log=log):
            log(f"evaluating {variant.label} ...")
            session = open_session(variant.model, threads, backend, memory_pattern=memory_pattern)
            with observed_kernel(backend) as kernel:
                metrics = evaluate(session)
            results.append((variant, {**metrics, **kernel}))
    return original, results
