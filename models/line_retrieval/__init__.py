"""A small Llama-style decoder trained here on LongEval-style line retrieval.

`task` builds the vocabulary and the prompts, `train` trains the model (one command:
``python -m models.line_retrieval.train``), `export` writes the ONNX file and
`evaluate` measures accuracy per context length with ONNX Runtime.
"""
