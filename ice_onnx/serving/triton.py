"""A Triton Inference Server model repository for a converted model (onnxruntime backend).

    REPO/<name>/config.pbtxt          inputs and outputs from the model; dynamic batching when it can batch
    REPO/<name>/1/model.onnx          the model (+ model.onnx.<token>.data when its weights are external)
    REPO/<name>/libice_onnx_ops.so    the op library that the config's model_operations names

Triton's onnxruntime backend hands `op_library_filename` to ONNX Runtime's
RegisterCustomOpsLibrary, i.e. to dlopen, from the server's working folder: the config
must hold the library's absolute path as the server sees it. `mount` is where the server
finds REPO (a container's `/models`); by default REPO's own absolute path.

A model folder appears whole or not at all: it is written into a staging folder inside
REPO (same file system, so the final step is one rename) and moved into place last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx_ir as ir

from ice_onnx.custom_ops import contract
from ice_onnx.custom_ops.loader import LIBRARY_NAME, library_path
from ice_onnx.interrupts import signals_held
from ice_onnx.rewriter import model_io

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"  # the onnxruntime backend's default_model_filename
VERSION = "1"
STAGING_PREFIX = ".ice-onnx-"

# ONNX element types Triton's ModelConfig can name (its DataType enum); others cannot be served.
TRITON_TYPES = {
    ir.DataType.BOOL: "TYPE_BOOL",
    ir.DataType.UINT8: "TYPE_UINT8", ir.DataType.UINT16: "TYPE_UINT16",
    ir.DataType.UINT32: "TYPE_UINT32", ir.DataType.UINT64: "TYPE_UINT64",
    ir.DataType.INT8: "TYPE_INT8", ir.DataType.INT16: "TYPE_INT16",
    ir.DataType.INT32: "TYPE_INT32", ir.DataType.INT64: "TYPE_INT64",
    ir.DataType.FLOAT16: "TYPE_FP16", ir.DataType.FLOAT: "TYPE_FP32", ir.DataType.DOUBLE: "TYPE_FP64",
    ir.DataType.BFLOAT16: "TYPE_BF16", ir.DataType.STRING: "TYPE_STRING",
}
DYNAMIC = -1
DEFAULT_MAX_BATCH = 8


class ServingError(Exception):
    """The model cannot be described to the server (an element type or shape it cannot express)."""


class NotConvertedError(ServingError):
    """The model has no IceKNNAttention node: there is nothing for the op library to do."""


class SettingsError(ServingError):
    """The settings contradict the model or each other (a usage error)."""


@dataclass(frozen=True)
class TritonSettings:
    name: str | None = None  # the model's name in the repository; default: the file's stem
    # Triton's max_batch_size; 0 = no batching (dims are then the full shapes); None = DEFAULT_MAX_BATCH
    # when the model can batch, else 0
    max_batch: int | None = None
    instances: int = 1  # instance_group count (CPU instances, each with its own session)
    threads: int = 0  # the backend's intra_op_thread_count; 0 = its default
    mount: str | None = None  # REPO's absolute path as the server sees it
    replace: bool = False  # replace an existing model folder of that name


@dataclass(frozen=True)
class TensorConfig:
    name: str
    data_type: str
    dims: tuple[int, ...]  # per request item when batched (the batch dimension left out)
    scalar: bool = False  # dims [1] reshaped to [] (Triton's dims may not be empty)


@dataclass
class Repository:
    """What `write_repository` wrote."""
    folder: Path
    config: str
    batched: bool
    library: str  # op_library_filename as written in the config


def default_name(model_path: str | os.PathLike) -> str:
    stem = Path(model_path).name
    for suffix in (".onnx", ".ice"):
        stem = stem.removesuffix(suffix)
    return stem or "model"


def check_name(name: str) -> str:
    """A model name is one folder of the repository and a quoted string in the config."""
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\0" in name:
        raise SettingsError(f"{name!r}: a model name must be one folder name, not hidden, without '/'")
    if any(ord(c) < 32 for c in name):
        raise SettingsError(f"{name!r}: a model name may not hold control characters")
    return name


def is_converted(model: ir.Model) -> bool:
    """Whether any node, in the main graph or in a subgraph (the If a KV-cache block becomes), is IceKNNAttention."""
    return any(node.domain == contract.DOMAIN and node.op_type == contract.OP_TYPE
               for node in ir.traversal.RecursiveGraphIterator(model.graph))


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a client feeds: an initializer listed as an input only overrides a weight."""
    return [value for value in model.graph.inputs if value.name not in model.graph.initializers]


def can_batch(values: list[ir.Value]) -> bool:
    """Triton batches along the first dimension of every input and output: each must have
    one and it must be dynamic, and dynamic dimensions named alike (`batch`) where named."""
    names = set()
    for value in values:
        if value.shape is None or len(value.shape) == 0 or isinstance(value.shape[0], int):
            return False
        if value.shape[0].value is not None:
            names.add(value.shape[0].value)
    return len(names) <= 1


def tensor_config(value: ir.Value, batched: bool) -> TensorConfig:
    data_type = TRITON_TYPES.get(value.dtype)
    if data_type is None:
        raise ServingError(f"{value.name}: element type {value.dtype} has no Triton type")
    if value.shape is None:
        raise ServingError(f"{value.name}: the model gives no shape (Triton needs every tensor's rank)")
    dims = tuple(dim if isinstance(dim, int) else DYNAMIC for dim in value.shape)
    if batched:
        dims = dims[1:]
    return TensorConfig(value.name, data_type, dims or (1,), scalar=not dims)


def model_config(model: ir.Model, name: str, settings: TritonSettings, library: str) -> tuple[str, bool]:
    """The config.pbtxt text for `model`, and whether it batches."""
    inputs, outputs = graph_inputs(model), list(model.graph.outputs)
    batchable = can_batch(inputs + outputs)
    max_batch = settings.max_batch
    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH if batchable else 0
    elif max_batch > 0 and not batchable:
        raise SettingsError("the model cannot batch (every input and output needs the same dynamic first "
                            "dimension): leave --max-batch out or pass 0")
    batched = max_batch > 0
    lines = [f"name: {_quoted(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch}"]
    for field, values in (("input", inputs), ("output", outputs)):
        lines.append(f"{field} [")
        blocks = [_tensor_block(tensor_config(value, batched)) for value in values]
        lines.append(",\n".join(blocks))
        lines.append("]")
    if batched:
        lines.append("dynamic_batching { }")
    # The op runs on CPU only: a GPU instance would split every converted graph around it.
    lines.append(f"instance_group [\n  {{\n    count: {settings.instances}\n    kind: KIND_CPU\n  }}\n]")
    lines.append(f"model_operations {{\n  op_library_filename: {_quoted(library)}\n}}")
    if settings.threads:
        lines.append('parameters {\n  key: "intra_op_thread_count"\n'
                     f'  value: {{\n    string_value: "{settings.threads}"\n  }}\n}}')
    return "\n".join(lines) + "\n", batched


def write_repository(model_path: str | os.PathLike, repository: str | os.PathLike,
                     settings: TritonSettings = TritonSettings()) -> Repository:
    """Write REPO/<name>/ for the converted model at `model_path` (see the module's doc).

    Raises model_io.ModelFileError for an unreadable or invalid model, NotConvertedError,
    SettingsError, ServingError, and model_io.ModelWriteError when REPO cannot be written
    or `<name>` exists without `replace`."""
    repository = Path(repository)
    name = check_name(settings.name if settings.name is not None else default_name(model_path))
    mount = PurePosixPath(settings.mount) if settings.mount is not None else None
    if mount is not None and not mount.is_absolute():
        raise SettingsError(f"{settings.mount}: the mount must be an absolute path (the server dlopens the library)")
    if (settings.max_batch or 0) < 0 or settings.instances < 1 or settings.threads < 0:
        raise SettingsError("--max-batch and --threads must be >= 0, --instances >= 1")
    model, data_files = model_io.load(model_path)
    if not is_converted(model):
        raise NotConvertedError(f"{model_path}: no IceKNNAttention node (run `ice-onnx convert` first)")
    target = repository / name
    if target.exists() and not settings.replace:
        raise model_io.ModelWriteError(f"{target}: exists (pass --replace to replace it)")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise model_io.ModelWriteError(f"{target}: not a folder (refusing to replace it)")
    served_at = mount if mount is not None else PurePosixPath(Path(repository).resolve())
    library = str(served_at / name / LIBRARY_NAME)
    config, batched = model_config(model, name, settings, library)

    created = _require_writable(repository)
    staging, moved = None, False
    try:
        with signals_held():  # a signal between mkdtemp and the assignment would leave the folder behind
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=repository))
        (staging / VERSION).mkdir()
        model_io.save(model, staging / VERSION / MODEL_FILE, data_files,
                      validate=lambda written: model_io.check(written, written.parent))
        shutil.copyfile(library_path(), staging / LIBRARY_NAME)
        (staging / CONFIG_FILE).write_text(config, encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp's folder is private; the server may run as another user
        # Concurrent writers of one repository take turns here, so each replaces whole
        # what the last one left, and none replaces a folder it was not allowed to.
        with model_io.folder_locked(repository), signals_held():  # the writers' lock convert uses
            _move_into_place(staging, target, settings.replace)
            moved = True
    except OSError as exc:
        raise model_io.ModelWriteError(f"{target}: cannot write ({exc.strerror or exc})") from None
    finally:
        if not moved:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if created:  # a failed first write leaves no empty repository either
                with contextlib.suppress(OSError):
                    repository.rmdir()
    return Repository(target, config, batched, library)


def _require_writable(repository: Path) -> bool:
    """REPO may be new (then its parent must exist), else a writable folder. Returns whether it was created."""
    if not repository.exists():
        if not repository.parent.is_dir():
            raise model_io.ModelWriteError(f"{repository.parent}: folder does not exist")
        try:
            repository.mkdir()
        except OSError as exc:
            raise model_io.ModelWriteError(f"{repository}: cannot create ({exc.strerror or exc})") from None
        return True
    if not repository.is_dir():
        raise model_io.ModelWriteError(f"{repository}: not a folder")
    if not os.access(repository, os.W_OK | os.X_OK):
        raise model_io.ModelWriteError(f"{repository}: not writable")
    return False


def _move_into_place(staging: Path, target: Path, replace: bool) -> None:
    """The staged folder becomes `target` whole (model_io.swap_folder_into_place); an existing
    one only with `replace`."""
    if target.exists() and not replace:  # it appeared since the check before staging: another writer's
        raise model_io.ModelWriteError(f"{target}: exists (pass --replace to replace it)")
    model_io.swap_folder_into_place(staging, target, STAGING_PREFIX)


def _tensor_block(tensor: TensorConfig) -> str:
    lines = ["  {", f"    name: {_quoted(tensor.name)}", f"    data_type: {tensor.data_type}",
             f"    dims: [ {', '.join(str(d) for d in tensor.dims)} ]"]
    if tensor.scalar:
        lines.append("    reshape: { shape: [ ] }")
    lines.append("  }")
    return "\n".join(lines)


def _quoted(text: str) -> str:
    """A protobuf text-format string literal: backslash, quote and control characters
    escaped (octal), other characters kept as UTF-8."""
    def escaped(c: str) -> str:
        if c in ('"', "\\"):
            return "\\" + c
        return f"\\{ord(c):03o}" if ord(c) < 32 or ord(c) == 127 else c
    return '"' + "".join(escaped(c) for c in text) + '"'
