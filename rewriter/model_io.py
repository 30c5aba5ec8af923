"""Reading and writing model files safely: validated input, atomic output, external data kept inside the model's folder.

A model with external data is a pair of files, (model, data). Writing never breaks a
pair that exists: the new weights go to a data file whose name is new
(`<output>.<16 hex digits>.data`) and only the new model references it, the model file
is replaced last and in one rename, and the data the replaced model referenced is removed
after that. At every instant the output path holds the old pair or the new pair, whatever
step fails and wherever the process dies (at worst an unreferenced data file is left), and
two writers of the same output never mix their files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ice_onnx.errors import first_line
from ice_onnx.interrupts import signals_held
from ice_onnx.rewriter import schema

PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto must stay below 2 GB; larger ones keep weights outside
DATA_TOKEN_DIGITS = 16
DATA_SUFFIX_BYTES = len(f".{'0' * DATA_TOKEN_DIGITS}.data")


class ModelFileError(Exception):
    """The input cannot be read as a valid ONNX model."""


class ModelWriteError(ModelFileError):
    """The output cannot be written."""


class OutputIsInputError(ModelFileError):
    """The output names the input (also through a symlink or hardlink) and overwriting it was not asked for."""


def load(path: str | os.PathLike) -> tuple[ir.Model, frozenset[Path]]:
    """The model at `path` (external data mapped lazily) and its external data files (resolved; empty if none)."""
    path = Path(path)
    _require_utf8(path, ModelFileError)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelFileError(f"{path}: not an ONNX model ({first_line(exc, 160)})") from None
    if not proto.graph.node or not proto.opset_import:
        raise ModelFileError(f"{path}: not an ONNX model (no graph or no opset import)")
    data_files = _check_external_data(proto, path)
    if not _text_is_valid(proto):
        raise ModelFileError(f"{path}: not an ONNX model (a name or string is not valid UTF-8)")
    schema.register_runtime_ops(proto)
    try:
        onnx.checker.check_model(str(path))  # by path: resolves external data, allows > 2 GB
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(f"{path}: invalid ONNX model ({first_line(exc, 160)})") from None
    proto = _with_inferred_shapes(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - a malformed proto the checker let through
        raise ModelFileError(f"{path}: cannot read the model ({first_line(exc, 160)})") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model, data_files


def _require_utf8(path: Path, error: type[ModelFileError]) -> None:
    """onnx's C++ binding takes paths as UTF-8 text: a name that is not (a Latin-1 file name,
    arriving as surrogate escapes) is refused here rather than failing inside the binding."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "replace")
        raise error(f"{shown}: the path is not valid UTF-8, which onnx cannot open; rename it") from None


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


def _check_external_data(proto: onnx.ModelProto, path: Path) -> frozenset[Path]:
    """The external data files, each checked: inside the model's folder, present, and every
    tensor's bytes within the file."""
    folder = path.parent.resolve()
    files = set()
    for tensor, entries in _external_tensors(proto.graph):
        location = entries.get("location", "")
        if "\0" in location:
            raise ModelFileError(f"{path}: external data location of {tensor.name!r} contains a NUL character")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise ModelFileError(f"{path}: external data of {tensor.name!r} points outside the model's folder ({location!r})")
        if not target.is_file():
            raise ModelFileError(f"{path}: external data file {location!r} of {tensor.name!r} is missing")
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0))
        except ValueError:
            raise ModelFileError(f"{path}: external data of {tensor.name!r} has a non-integer offset or length") from None
        size = target.stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelFileError(f"{path}: external data of {tensor.name!r} (offset {offset}, length {length}) "
                                 f"lies outside {location!r} ({size} bytes)")
        files.add(target)
    return frozenset(files)


def _external_tensors(graph: onnx.GraphProto):
    """(tensor, {key: value} of its external_data) for every tensor stored outside the model."""
    for tensor in _all_tensors(graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, {entry.key: entry.value for entry in tensor.external_data}


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


def data_files(path: str | os.PathLike) -> frozenset[Path]:
    """The files the model at `path` names as external data (resolved, unchecked); empty if
    there is no readable model there."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
        folder = path.parent.resolve()
        return frozenset((folder / entries.get("location", "")).resolve()
                         for _, entries in _external_tensors(proto.graph))
    except Exception:  # noqa: BLE001 - not a model (or none): it references nothing
        return frozenset()


def _with_inferred_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes help the report (heads, head size); a model they cannot be inferred for still converts."""
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001
        return proto


def check(path: Path, scratch: Path) -> None:
    """onnx.checker and strict shape inference on a model file (raises if invalid).

    Both work from the file, so external data is resolved and > 2 GB models are fine.
    Inference writes its result to a file: it goes into `scratch` (a private folder) under
    a fresh name, never beside `path`, where a file of that name may be the user's."""
    schema.register()
    onnx.checker.check_model(str(path))
    inferred = scratch / f"{secrets.token_hex(8)}.inferred.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    finally:
        inferred.unlink(missing_ok=True)


def check_output(output: str | os.PathLike, source: str | os.PathLike, in_place: bool = False) -> bool:
    """Refuse, before any work, an output that cannot be written or would destroy the input.

    Returns whether the output is the input itself (then `in_place` must be true). Raises
    OutputIsInputError for the input without `in_place`, ModelWriteError for an output
    that is not a regular file (a FIFO, a device: never replaced), is one of the input's
    external data files, lies in a missing folder, or whose name (with the data file's
    suffix) is too long for the file system."""
    output, source = Path(output), Path(source)
    _require_utf8(output, ModelWriteError)
    folder = output.parent
    if not folder.is_dir():
        raise ModelWriteError(f"{folder}: output folder does not exist")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(output.name)) + DATA_SUFFIX_BYTES > name_max:
        raise ModelWriteError(f"{output.name[:40]}...: file name too long (at most "
                              f"{name_max - DATA_SUFFIX_BYTES} bytes, to leave room for its data file's name)")
    try:
        mode = os.stat(output).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ModelWriteError(f"{output}: cannot write ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise ModelWriteError(f"{output}: not a regular file (refusing to replace it)")
    if source.is_file() and os.path.samefile(source, output):
        if not in_place:
            raise OutputIsInputError(f"{output}: the output is the input (pass --in-place to overwrite it)")
        return True
    if any(os.path.samefile(output, data) for data in data_files(source) if data.exists()):
        raise ModelWriteError(f"{output}: this is the external data of the input {source} (refusing to overwrite it)")
    return False


def save(
    model: ir.Model,
    path: str | os.PathLike,
    external: bool | frozenset[Path],
    progress: Callable[[int, int], None] | None = None,
    validate: Callable[[Path], None] | None = None,
    keep: frozenset[Path] = frozenset(),
) -> None:
    """Write `model` to `path` atomically: either the complete new file(s) or nothing.

    `validate` is called on the written file (in the private staging folder beside the
    output) before it replaces anything. Weights go to a new `<name>.<token>.data` beside
    the model when the input had external data or the model would not fit in one
    protobuf. The data files of the model that `path` held are removed once it is
    replaced, if they carry this output's data-file name and are not in `keep` (the
    input's own data, when the output is another file)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelWriteError(f"{folder}: output folder does not exist")
    staging = None
    try:
        with signals_held():  # a signal between mkdtemp and the assignment would leave the folder behind
            staging = Path(tempfile.mkdtemp(prefix=".ice-onnx-", dir=folder))
        external = bool(external) or _approximate_size(model) > PROTOBUF_LIMIT
        data_name = f"{path.name}.{secrets.token_hex(DATA_TOKEN_DIGITS // 2)}.data" if external else None
        callback = None
        if progress is not None:
            def callback(_tensor, info):  # noqa: ANN001
                progress(info.index + 1, info.total)
        ir.save(model, staging / path.name, external_data=data_name, callback=callback)
        if validate is not None:
            validate(staging / path.name)
        with folder_locked(folder):
            replaced = data_files(path) - keep
            with signals_held():
                _commit(staging, path, data_name)
        for stale in replaced:
            if _is_data_file_of(stale, path):
                with contextlib.suppress(OSError):  # the new pair is in place: a leftover only costs space
                    stale.unlink()
    except OSError as exc:
        raise ModelWriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, path: Path, data_name: str | None) -> None:
    """Move the new data beside the output, then replace the model file in one rename; if
    that fails, take the new data back out, so the old pair is left as it was."""
    moved = None
    try:
        if data_name:
            moved = path.with_name(data_name)
            os.replace(staging / data_name, moved)
        os.replace(staging / path.name, path)
    except BaseException:
        if moved is not None:
            moved.unlink(missing_ok=True)
        raise


def _is_data_file_of(candidate: Path, path: Path) -> bool:
    """Whether `candidate` is named like a data file of the model at `path` (`<name>.data`,
    exporters' convention, or this module's `<name>.<token>.data`) in the same folder."""
    pattern = re.escape(path.name) + rf"(\.[0-9a-f]{{{DATA_TOKEN_DIGITS}}})?\.data"
    return candidate.parent == path.parent.resolve() and re.fullmatch(pattern, candidate.name) is not None


@contextlib.contextmanager
def folder_locked(folder: Path):
    """An exclusive flock on the output folder while a pair (or a whole model folder: Triton's,
    genai's) is committed into it, so that concurrent writers read what they replace exactly (the unique data names already keep them
    from mixing; without the lock, e.g. on a file system without flock, a replaced data
    file may be left behind)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _approximate_size(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def swap_folder_into_place(staging: Path, target: Path, aside_prefix: str) -> None:
    """Rename the staged folder to `target`. An existing `target` is first renamed aside (a
    folder cannot be renamed over a non-empty one) and put back if the second rename fails,
    so `target` is the old folder or the new one, never a mix."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = target.with_name(f"{aside_prefix}replaced-{secrets.token_hex(8)}")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
