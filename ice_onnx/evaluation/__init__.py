"""Measured proof: timing and fidelity of converted models against their originals.

`bench` times an original and a converted model on generated inputs and measures how
far the outputs (and each attention layer) move; `minilm` and the other tasks measure
task accuracy on real data. The CLI commands `ice-onnx bench` / `ice-onnx eval` render
what these modules return; nothing here prints except through the `log` callbacks.
"""
