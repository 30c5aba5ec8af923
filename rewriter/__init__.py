"""The graph side of ice-onnx: find attention blocks in ONNX models and replace them with IceKNNAttention.

    from ice_onnx.rewriter import convert_file, inspect_file, ConvertOptions
    report = convert_file("model.onnx", "model.ice.onnx", ConvertOptions(top_k=32))
    print(report.to_text())
"""

from ice_onnx.rewriter.convert import (
    ConvertOptions,
    NoAttentionError,
    convert_file,
    convert_model,
    find_cores,
    inspect_file,
    inspect_model,
    parse_layers,
    parse_plan,
)
from ice_onnx.rewriter.model_io import ModelFileError, ModelWriteError, OutputIsInputError
from ice_onnx.rewriter.report import BlockRecord, ConversionReport

__all__ = [
    "BlockRecord",
    "ConversionReport",
    "ConvertOptions",
    "ModelFileError",
    "ModelWriteError",
    "NoAttentionError",
    "OutputIsInputError",
    "convert_file",
    "convert_model",
    "find_cores",
    "inspect_file",
    "inspect_model",
    "parse_layers",
    "parse_plan",
]
