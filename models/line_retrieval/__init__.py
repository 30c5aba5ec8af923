"""A small Llama-style decoder trained here on LongEval-style line retrieval.

`task` builds the vocabulary and the prompts, `model` the network, `train` trains it
(``python -m models.line_retrieval.train``), `export` writes the ONNX file and `evaluate`
measures accuracy per context length with ONNX Runtime (`ice-onnx eval line-retrieval`).
"""

from ..recipe import TrainedRecipe

RECIPE = TrainedRecipe("line-retrieval", __name__, "Llama-style decoder trained here: which number is on line K?",
                       onnx_file="line_retrieval.onnx")
