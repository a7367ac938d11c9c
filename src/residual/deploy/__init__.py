"""Shipping models: ONNX export, INT8 quantization and channel pruning, each checked against the original."""
