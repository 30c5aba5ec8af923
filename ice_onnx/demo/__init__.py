"""`ice-onnx demo`: the main job on one screen, original against converted.

- `smollm2`: a real LLM (SmolLM2-135M-Instruct, built by `make smollm2`) answers questions
  over a long real document, greedy, with its KV cache (models/smollm2);
- `line_retrieval`: the small shipped long-context model, the fast fallback when SmolLM2
  is not built (models/line_retrieval).
"""
