"""The pipeline: load -> match attention -> analyse masks -> emit -> remove dead nodes -> check -> save.

`convert_model` / `inspect_model` work on an in-memory onnx-ir model and know
nothing about files; `convert_file` / `inspect_file` add safe reading and
atomic writing (model_io). Every function returns a ConversionReport.

This module is the rewriter's public entry: the names other code imports from it
(options, plan parsing, the element-type rule) are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from ice_onnx.custom_ops import contract
from ice_onnx.errors import first_line
from ice_onnx.rewriter import model_io, surgery
from ice_onnx.rewriter.dtypes import element_type
from ice_onnx.rewriter.emitter import Emitter
from ice_onnx.rewriter.matching import find_cores
from ice_onnx.rewriter.options import PLAN_KEYS, BlockSelection, ConvertOptions, parse_layers, parse_plan
from ice_onnx.rewriter.report import ConversionReport
from ice_onnx.rewriter.survey import survey

__all__ = [
    "PLAN_KEYS", "BlockSelection", "ConvertOptions", "NoAttentionError", "convert_file", "convert_model",
    "element_type", "find_cores", "inspect_file", "inspect_model", "parse_layers", "parse_plan",
]


class NoAttentionError(Exception):
    """The model has no attention block to convert."""


def inspect_model(model: ir.Model, name: str = "model", options: ConvertOptions | None = None) -> ConversionReport:
    """The report `convert_model` would give, without changing the model."""
    report = survey(model, name, options or ConvertOptions())[0]
    report.dry_run = True
    return report


def convert_model(model: ir.Model, name: str = "model", options: ConvertOptions | None = None) -> ConversionReport:
    """Replace every convertible attention block of `model` (in place) with IceKNNAttention."""
    options = options or ConvertOptions()
    report, plans = survey(model, name, options)
    if not report.blocks:
        raise NoAttentionError(f"{name}: no attention block found")
    dead_before = surgery.dead_nodes(model.graph)
    emitter = Emitter(model, options)
    for record, plan in zip(report.blocks, plans):
        if record.replaced:
            record.node = emitter.replace(plan.core, plan.mask, plan.scale, options.for_block(record.index))
    emitter.redirect()
    surgery.remove_dead(model.graph, dead_before)
    if report.replaced:
        model.opset_imports[contract.DOMAIN] = contract.VERSION
    return report


def inspect_file(path: str | os.PathLike, options: ConvertOptions | None = None) -> ConversionReport:
    model, _ = model_io.load(path)
    return inspect_model(model, str(path), options)


def convert_file(
    path: str | os.PathLike,
    output: str | os.PathLike,
    options: ConvertOptions | None = None,
    in_place: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConversionReport:
    """Convert the model at `path` and write it to `output` (atomically, see model_io)."""
    path, output = Path(path), Path(output)
    replaces_input = model_io.check_output(output, path, in_place)
    model, data_files = model_io.load(path)
    report = convert_model(model, str(path), options)
    if not report.replaced:
        raise NoAttentionError(f"{path}: no attention block could be converted")
    surgery.forget_intermediate_shapes(model.graph)

    def validate(written: Path) -> None:
        try:
            model_io.check(written, written.parent)
        except Exception as exc:  # noqa: BLE001
            try:  # an input that is itself inconsistent is a bad model, not a conversion bug
                model_io.check(path, written.parent)
            except Exception as source_problem:  # noqa: BLE001
                raise model_io.ModelFileError(f"{path}: invalid ONNX model ({first_line(source_problem, 200)})") from None
            raise exc

    model_io.save(model, output, data_files, progress, validate=validate,
                  keep=frozenset() if replaces_input else data_files)
    report.output = str(output)
    return report
