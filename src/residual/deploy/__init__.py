"""Shipping models: ONNX export, INT8 quantization and channel pruning, each checked against the original."""

# What the command line offers, named here so that building it imports neither ONNX Runtime nor OpenVINO (0.2 s on
# every command, and ONNX Runtime's telemetry warning where the home folder cannot be written, as in many containers).
RUNTIMES = ("onnxruntime", "openvino")
QUANTIZE_RUNTIMES = RUNTIMES + ("executorch",)  # an INT8 .pte for ExecuTorch too
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
