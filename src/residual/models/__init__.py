"""ResNet architectures: blocks, the configurable ResNet, and the name registry."""

from .preprocessing import Preprocessing
from .registry import ModelInfo, UnknownModelError, build_model, count_macs, count_params, list_models, model_info
from .resnet import ResNet, ResNetConfig

__all__ = ["ModelInfo", "Preprocessing", "ResNet", "ResNetConfig", "UnknownModelError", "build_model",
           "count_macs", "count_params", "list_models", "model_info"]
