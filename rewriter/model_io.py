"""Reading and writing model files safely: validated input, atomic output, external data kept inside the model's folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ice_onnx.rewriter import schema

PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto must stay below 2 GB; larger ones keep weights outside


class ModelFileError(Exception):
    """The input cannot be read as a valid ONNX model."""


class ModelWriteError(ModelFileError):
    """The output cannot be written."""


def load(path: str | os.PathLike) -> tuple[ir.Model, bool]:
    """The model at `path` (external data mapped lazily) and whether it uses external data."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelFileError(f"{path}: not an ONNX model ({_short(exc)})") from None
    if not proto.graph.node or not proto.opset_import:
        raise ModelFileError(f"{path}: not an ONNX model (no graph or no opset import)")
    external = _check_external_data(proto, path)
    if not _text_is_valid(proto):
        raise ModelFileError(f"{path}: not an ONNX model (a name or string is not valid UTF-8)")
    schema.register_runtime_ops(proto)
    try:
        onnx.checker.check_model(str(path))  # by path: resolves external data, allows > 2 GB
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(f"{path}: invalid ONNX model ({_short(exc)})") from None
    proto = _with_inferred_shapes(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - a malformed proto the checker let through
        raise ModelFileError(f"{path}: cannot read the model ({_short(exc)})") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model, external


def _text_is_valid(message) -> bool:
    """Protobuf lets invalid UTF-8 through as bytes (a corrupted file): every string field,
    anywhere in the model (names, metadata, doc strings, string attributes), must be text."""
    for field, content in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = list(content) if repeated else [content]
        if field.type == field.TYPE_STRING and not all(isinstance(v, str) for v in values):
            return False
        if field.type == field.TYPE_MESSAGE and not all(_text_is_valid(v) for v in values):
            return False
        if field.type == field.TYPE_BYTES and field.name == "s" and not all(_decodes(v) for v in values):
            return False  # a STRING attribute
    return True


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _check_external_data(proto: onnx.ModelProto, path: Path) -> bool:
    """Refuse external data outside the model's folder or missing; True if there is any."""
    folder = path.parent.resolve()
    found = False
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise ModelFileError(f"{path}: external data of {tensor.name!r} points outside the model's folder ({location!r})")
        if not target.is_file():
            raise ModelFileError(f"{path}: external data file {location!r} of {tensor.name!r} is missing")
    return found


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _with_inferred_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes help the report (heads, head size); a model they cannot be inferred for still converts."""
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001
        return proto


def save(
    model: ir.Model,
    path: str | os.PathLike,
    external: bool,
    progress: Callable[[int, int], None] | None = None,
    validate: Callable[[Path], None] | None = None,
) -> None:
    """Write `model` to `path` atomically: either the complete new file(s) or nothing.

    `validate` is called on the written file before it replaces anything.
    Weights go to `<name>.data` beside the model when the input had external data or
    the model would not fit in one protobuf."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelWriteError(f"{folder}: output folder does not exist")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".ice-onnx-", dir=folder))
    except OSError as exc:
        raise ModelWriteError(f"{folder}: cannot write there ({exc.strerror})") from None
    try:
        external = external or _approximate_size(model) > PROTOBUF_LIMIT
        data_name = f"{path.name}.data" if external else None
        callback = None
        if progress is not None:
            def callback(_tensor, info):  # noqa: ANN001
                progress(info.index + 1, info.total)
        ir.save(model, staging / path.name, external_data=data_name, callback=callback)
        if validate is not None:
            validate(staging / path.name)
        if data_name:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staging / path.name, path)
    except OSError as exc:
        raise ModelWriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _approximate_size(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _short(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]
