"""An onnxruntime-genai model folder, converted whole: `ice-onnx convert GENAI_DIR -o OUT_DIR`.

    OUT_DIR/genai_config.json        the input's, with model.decoder.session_options.custom_ops_library
    OUT_DIR/<model.decoder.filename> the converted decoder (+ its new external data file)
    OUT_DIR/libice_onnx_ops.so       the op library
    OUT_DIR/...                      every other file of the input, unchanged

genai (>= 0.8) loads a custom-op library only from inside the model folder, by a path
relative to it, and takes one library per model: a config that already names another
one is refused rather than silently dropping it.

The folder appears whole or not at all: it is written into a staging folder beside
OUT_DIR (same file system, so the last step is a rename) and moved into place last.
Like `convert` on a file, an existing output is replaced, but only one that is itself a
genai model folder (or an empty folder): anything else is refused, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ice_onnx.custom_ops.loader import LIBRARY_NAME, library_path
from ice_onnx.interrupts import signals_held
from ice_onnx.rewriter import ConversionReport, ConvertOptions, convert_file, model_io

CONFIG_FILE = "genai_config.json"
STAGING_PREFIX = ".ice-onnx-"


class GenaiConfigError(model_io.ModelFileError):
    """genai_config.json cannot be read, names no decoder model or one that is missing, or names another library."""


@dataclass
class GenaiFolder:
    """What `convert_folder` wrote."""
    folder: Path
    model: Path  # the converted decoder inside `folder`
    library: str  # custom_ops_library as written in the config (relative to `folder`)
    report: ConversionReport


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a genai_config.json (what genai loads a model from)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def default_output(folder: str | os.PathLike) -> Path:
    """Beside the input, as `convert` names a file's output: `<folder>.ice`."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".ice")


def read_config(folder: Path) -> tuple[dict, PurePosixPath]:
    """The folder's config and its decoder's file name (relative, inside the folder); raises GenaiConfigError."""
    config_file = folder / CONFIG_FILE
    try:
        config = json.loads(config_file.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GenaiConfigError(f"{config_file}: not readable as JSON ({_reason(exc)})") from None
    model = config.get("model") if isinstance(config, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise GenaiConfigError(f"{config_file}: no model.decoder entry (not a genai model config)")
    filename = decoder.get("filename")
    if not isinstance(filename, str) or not filename:
        raise GenaiConfigError(f"{config_file}: model.decoder.filename names no model file")
    relative = PurePosixPath(filename)
    if relative.is_absolute() or ".." in relative.parts or not (folder / relative).resolve().is_relative_to(
            folder.resolve()):
        raise GenaiConfigError(f"{config_file}: model.decoder.filename {filename!r} points outside the folder")
    if not (folder / relative).is_file():
        raise GenaiConfigError(f"{config_file}: the decoder model {filename!r} is missing")
    options = decoder.get("session_options", {})
    if not isinstance(options, dict):
        raise GenaiConfigError(f"{config_file}: model.decoder.session_options is not an object")
    named = options.get("custom_ops_library")
    if named is not None and (not isinstance(named, str) or PurePosixPath(named) != PurePosixPath(LIBRARY_NAME)):
        raise GenaiConfigError(f"{config_file}: model.decoder.session_options.custom_ops_library already names "
                               f"{named!r} (genai loads one library per model)")
    return config, relative


def convert_folder(source: str | os.PathLike, output: str | os.PathLike, options: ConvertOptions | None = None,
                   in_place: bool = False, progress: Callable[[int, int], None] | None = None) -> GenaiFolder:
    """Write OUT_DIR (see the module's doc) for the genai model folder `source`.

    Raises GenaiConfigError (a ModelFileError) for the config, the rewriter's errors for
    the decoder, OutputIsInputError when `output` is `source` without `in_place`, and
    ModelWriteError when `output` cannot be written or is something other than a genai
    model folder or an empty folder."""
    source, output = Path(source), Path(output)
    config, decoder = read_config(source)
    same = _check_output(source, output, in_place)

    staging, moved = None, False
    try:
        with signals_held():  # a signal between mkdtemp and the assignment would leave the folder behind
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output.parent))
        replaced_by_conversion = {(source / decoder).resolve(), *model_io.data_files(source / decoder)}
        _copy_unchanged(source, staging, skip=replaced_by_conversion)
        (staging / decoder).parent.mkdir(parents=True, exist_ok=True)
        report = convert_file(source / decoder, staging / decoder, options, progress=progress)
        shutil.copyfile(library_path(), staging / LIBRARY_NAME)
        config["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = LIBRARY_NAME
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        with model_io.folder_locked(output.parent), signals_held():
            _move_into_place(staging, output, replace_input=same)
            moved = True
    except OSError as exc:
        raise model_io.ModelWriteError(f"{output}: cannot write ({exc.strerror or exc})") from None
    finally:
        if not moved and staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    report.output = str(output / decoder)
    return GenaiFolder(output, output / decoder, LIBRARY_NAME, report)


def _check_output(source: Path, output: Path, in_place: bool) -> bool:
    """Refuse, before any work, an output folder that would destroy something. Returns
    whether it is the input itself (allowed with `in_place` only)."""
    if not output.parent.is_dir():
        raise model_io.ModelWriteError(f"{output.parent}: output folder does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise model_io.ModelWriteError(f"{output.parent}: not writable")
    if output.is_symlink():
        raise model_io.ModelWriteError(f"{output}: a symlink (refusing to replace it)")
    if output.exists() and output.samefile(source):
        if not in_place:
            raise model_io.OutputIsInputError(f"{output}: the output is the input (pass --in-place to convert "
                                              "the folder in place)")
        return True
    if source.resolve().is_relative_to(output.resolve()) or output.resolve().is_relative_to(source.resolve()):
        raise model_io.ModelWriteError(f"{output}: contains or lies inside the input folder (refusing to write it)")
    if not output.exists():
        return False
    if not output.is_dir():
        raise model_io.ModelWriteError(f"{output}: not a folder (refusing to replace it)")
    if any(output.iterdir()) and not is_model_folder(output):
        raise model_io.ModelWriteError(f"{output}: exists and is not a genai model folder (refusing to replace it)")
    return False


def _copy_unchanged(source: Path, staging: Path, skip: set[Path]) -> None:
    """Every file of `source` but those in `skip` (the decoder and its data, written anew),
    copied with its metadata; symlinks are followed, so the folder stands on its own.
    Staging folders of other writers (and any left by a killed one) are not the model's."""
    def ignored(folder: str, names: list[str]) -> set[str]:
        return {name for name in names if name.startswith(STAGING_PREFIX) or (Path(folder) / name).resolve() in skip}

    shutil.copytree(source, staging, ignore=ignored, dirs_exist_ok=True)


def _move_into_place(staging: Path, target: Path, replace_input: bool) -> None:
    """The staged folder becomes `target` whole (model_io.swap_folder_into_place)."""
    if target.exists() and not replace_input and any(target.iterdir()) and not is_model_folder(target):
        # it changed since the check before staging: another writer's or the user's
        raise model_io.ModelWriteError(f"{target}: exists and is not a genai model folder (refusing to replace it)")
    model_io.swap_folder_into_place(staging, target, STAGING_PREFIX)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
