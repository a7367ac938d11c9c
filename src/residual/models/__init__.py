"""ResNet architectures: blocks, the configurable ResNet, and the name registry."""

from .inference import PRECISIONS, compile_for_inference, fold_batchnorm, prepare_for_inference
from .preprocessing import Preprocessing
from .registry import (ModelInfo, UnknownModelError, build_model, count_macs, count_params, list_models, model_config,
                       model_info)
from .resnet import ResNet, ResNetConfig
from .summary import LayerSummary, layer_summary

__all__ = ["PRECISIONS", "LayerSummary", "ModelInfo", "Preprocessing", "ResNet", "ResNetConfig", "UnknownModelError",
           "build_model", "compile_for_inference", "count_macs", "count_params", "fold_batchnorm", "layer_summary",
           "list_models", "model_config", "model_info", "prepare_for_inference"]
