"""Sparse ONNX export, checks and CPU benchmarks (import name wfcore.export)."""
