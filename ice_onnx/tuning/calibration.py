"""Calibration inputs: named arrays, one sample per row of axis 0.

Three sources: an .npz of named arrays, a folder of NAME.npy files, or `random:SEQ_LEN`
(`random` alone takes `seq_len`) for valid random inputs generated from the model's
graph inputs (`ice_onnx.evaluation.inputs`). The names must be exactly the model's
inputs; dtypes are converted only within a kind (int32 ids for int64, say).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ice_onnx.errors import first_line
from ice_onnx.evaluation.inputs import input_feeds

RANDOM = "random"
DEFAULT_RANDOM_LEN = 128


class CalibrationError(ValueError):
    """Calibration inputs that cannot be used with the model."""


def model_inputs(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """The graph inputs a run must feed (initializers excluded), with their dtypes."""
    initializers = {init.name for init in model.graph.initializer}
    return {info.name: np.dtype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))
            for info in model.graph.input if info.name not in initializers}


def load_calibration(source: str, model: onnx.ModelProto, *, seq_len: int | None = None, samples: int = 4,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """The calibration arrays for `model`, checked against its inputs."""
    kind, _, length = source.partition(":")
    if kind == RANDOM:
        try:
            seq_len = int(length) if length else (seq_len or DEFAULT_RANDOM_LEN)
        except ValueError:
            raise CalibrationError(f"bad calibration spec {source!r}: expected random:SEQ_LEN") from None
        if seq_len < 1:
            raise CalibrationError("the random calibration length must be >= 1")
        return input_feeds(model, samples, seq_len, seed=seed)
    return check_inputs(_read_arrays(Path(source)), model)


def check_inputs(arrays: dict[str, np.ndarray], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    wanted = model_inputs(model)
    missing = [name for name in wanted if name not in arrays]
    unknown = [name for name in arrays if name not in wanted]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unknown:
            problems.append(f"not model inputs: {', '.join(unknown)}")
        raise CalibrationError(f"calibration inputs do not match the model ({'; '.join(problems)}); "
                               f"the model takes {', '.join(wanted) or 'no inputs'}")
    checked = {}
    for name, dtype in wanted.items():
        array = np.asarray(arrays[name])
        if array.dtype != dtype:
            if array.dtype.kind != dtype.kind and not (array.dtype.kind in "iu" and dtype.kind in "iu"):
                raise CalibrationError(f"calibration input {name} is {array.dtype}, the model wants {dtype}")
            array = array.astype(dtype)
        if array.ndim == 0:
            raise CalibrationError(f"calibration input {name} is a scalar: axis 0 must count samples")
        checked[name] = array
    counts = {array.shape[0] for array in checked.values()}
    if len(counts) > 1:
        raise CalibrationError(f"calibration inputs disagree on the sample count (axis 0): {sorted(counts)}")
    return checked


def sample_count(feeds: dict[str, np.ndarray]) -> int:
    return next(iter(feeds.values())).shape[0] if feeds else 1


def batches(feeds: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """The calibration set in runs of at most `batch_size` samples."""
    count = sample_count(feeds)
    return [{name: array[start:start + batch_size] for name, array in feeds.items()}
            for start in range(0, count, batch_size)]


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise CalibrationError(f"no .npy files in {path}")
        return {file.stem: _load(file) for file in files}
    if not path.is_file():
        raise CalibrationError(f"no calibration inputs at {path} (an .npz, a folder of .npy, or random:SEQ_LEN)")
    try:
        archive = np.load(path, allow_pickle=False)
        if not hasattr(archive, "files"):
            raise CalibrationError(f"{path} is a single array: give an .npz of named arrays")
        with archive:
            return {name: archive[name] for name in archive.files}
    except CalibrationError:
        raise
    except Exception as exc:  # a corrupt or foreign file
        raise CalibrationError(f"cannot read {path} as .npz: {first_line(exc)}") from None


def _load(file: Path) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except Exception as exc:
        raise CalibrationError(f"cannot read {file}: {first_line(exc)}") from None
