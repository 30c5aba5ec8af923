"""Serving converted models on existing engines: a Triton model repository (`triton`).
The Ray example lives in examples/ray/, the throughput benchmark in benchmarks/."""
