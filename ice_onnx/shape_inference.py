"""ONNX Runtime's symbolic shape inference, and the quantization pre-processing built on it, for
converted models.

`python -m onnxruntime.tools.symbolic_shape_infer` stops at the first IceKNNAttention node
("Incomplete symbolic shape inference"): it has a handler per op it knows, and none for
`ai.iceformer`. `register()` gives it one (Y has Q's [B, Hq, Sq] and V's Dv), so everything that
runs it works on converted models:

    from ice_onnx import shape_inference
    shape_inference.register()                                  # then ORT's own tools, e.g.
    SymbolicShapeInference.infer_shapes(model)                  # (onnxruntime.tools.symbolic_shape_infer)

    shape_inference.quant_pre_process("model.ice.onnx", "model.pre.onnx")  # ORT's, with the op library
    quantize_dynamic("model.pre.onnx", "model.int8.onnx", weight_type=QuantType.QInt8)

From the shell, with the same options as ORT's tool:

    python -m ice_onnx.shape_inference --input model.ice.onnx --output model.shaped.onnx

`quantize_dynamic` itself needs nothing: it quantizes the weight MatMuls around the
attention node and leaves the node as it is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ice_onnx.custom_ops.contract import OP_TYPE

__all__ = ["register", "infer_shapes", "quant_pre_process"]

_PATCHED = "_ice_onnx_patched"


def register() -> None:
    """Give ONNX Runtime's SymbolicShapeInference a handler for IceKNNAttention (idempotent).

    Its handlers are looked up by op type in a table each instance builds in `__init__` (If and
    Loop branches get instances of their own), so the handler is added there."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    original_init = SymbolicShapeInference.__init__
    if getattr(original_init, _PATCHED, False):
        return

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.dispatcher_[OP_TYPE] = lambda node: _infer_attention(self, node)

    setattr(__init__, _PATCHED, True)
    SymbolicShapeInference.__init__ = __init__


def _infer_attention(inference, node: onnx.NodeProto) -> None:
    """Y [B, Hq, Sq, Dv], float32, from Q [B, Hq, Sq, D] and V [B, Hkv, Sk, Dv] (the contract)."""
    query, value = inference._get_shape(node, 0), inference._get_shape(node, 2)
    shape = None
    if query is not None and value is not None and len(query) == 4 and len(value) == 4:
        shape = [*query[:3], value[3]]
    inference.known_vi_[node.output[0]].CopyFrom(
        onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape))


def infer_shapes(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """`SymbolicShapeInference.infer_shapes(model, **options)` with the op registered."""
    register()
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(model, **options)


def quant_pre_process(input_model: str | os.PathLike, output_model_path: str | os.PathLike,
                      skip_optimization: bool = False, **options) -> None:
    """onnxruntime.quantization.shape_inference.quant_pre_process for a converted model.

    ORT's runs symbolic shape inference (registered here), then optimizes the model in an
    InferenceSession created without custom-op libraries, where IceKNNAttention does not load.
    So the optimization is done first, in a session with the library, and ORT's pre-processing
    then runs with `skip_optimization=True`. `options` are ORT's (auto_merge, ...)."""
    register()
    from onnxruntime.quantization.shape_inference import quant_pre_process as ort_quant_pre_process

    with tempfile.TemporaryDirectory(prefix="ice-onnx-prequant-") as folder:
        if not skip_optimization:
            import onnxruntime as ort

            from ice_onnx.custom_ops.loader import session_options

            optimized = Path(folder) / "optimized.onnx"
            so = session_options()
            so.optimized_model_filepath = str(optimized)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            ort.InferenceSession(str(input_model), so, providers=["CPUExecutionProvider"])
            input_model = optimized
        ort_quant_pre_process(str(input_model), str(output_model_path), skip_optimization=True, **options)


def main() -> None:
    """`python -m ice_onnx.shape_inference`: ORT's symbolic_shape_infer command, op registered."""
    from onnxruntime.tools import symbolic_shape_infer

    args = symbolic_shape_infer.parse_arguments()
    shaped = infer_shapes(onnx.load(args.input), int_max=args.int_max, auto_merge=args.auto_merge,
                          guess_output_rank=args.guess_output_rank, verbose=args.verbose)
    if args.output and shaped is not None:
        if args.save_as_external_data:
            onnx.save_model(shaped, args.output, save_as_external_data=True,
                            all_tensors_to_one_file=args.all_tensors_to_one_file,
                            location=args.external_data_location,
                            size_threshold=args.external_data_size_threshold, convert_attribute=False)
        else:
            onnx.save(shaped, args.output)


if __name__ == "__main__":
    main()
