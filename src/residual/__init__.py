"""residual: deep residual networks for image recognition, on PyTorch alone.

    import residual
    model = residual.create_model("resnet50")              # any classic ResNet
    model = residual.create_model("resnet50.tv2_in1k")     # with ImageNet weights
    residual.save_model(model, "model.safetensors")
    model = residual.load_model("model.safetensors")
    fast = residual.prepare_for_inference(model, "cuda")            # BN folded, channels_last, bf16
    print(residual.layer_summary(model, 224).rows)                 # output shape, params, MACs per layer
    result = residual.train(residual.TrainConfig(data="photos/", epochs=30))
    search = residual.tune(residual.TrainConfig(data="photos/", epochs=10), ["lr=0.01..0.3:log"], trials=20)
    runs, differing = residual.compare_runs(["runs/train"])         # best first, and what differs
    report = residual.evaluate(model, "photos/", out_dir="report/")   # metrics + report.html
    report = residual.evaluate(model, "photos/", out_dir="report/", unknown="other/")  # + images of no class
    result = residual.calibrate("model.safetensors", "photos/")      # temperature scaling -> a new model file
    result = residual.predict(model, ["cat.jpg", "photos/"], topk=3)
    clip = residual.predict_video(model, "clip.mp4", fps=5)        # every frame's classes, and .segments
    bank = residual.FeatureBank.load("report/feature_bank.safetensors")
    result = residual.predict(model, "new/", min_confidence=0.9, feature_bank=bank)   # .unsure per prediction
    cams = residual.explain(model, "cat.jpg", method="gradcam++")
    clip_cams = residual.explain_video(model, "clip.mp4", "out/", fps=2)  # a video of overlays, a key frame per segment
    residual.serve(model, residual.ServeConfig(port=8000))          # POST /predict: top classes as JSON
"""

__version__ = "0.1.0"

from .errors import ConfigError, ResidualError
from .models import (LayerSummary, ModelInfo, Preprocessing, ResNet, ResNetConfig, layer_summary, list_models,
                     model_info, prepare_for_inference)
from .weights import (PretrainedWeights, create_model, imagenet_class_names, list_pretrained, load_model,
                      load_weights, read_metadata, read_state_dict, register_pretrained, save_model)
from .train import TrainConfig, TrainResult, train
from .embed import Embeddings, embed, similar
from .predict import PredictResult, decode_predictions, predict, preprocess_input
from .video import Segment, VideoPrediction, predict_video
from .explain import ExplainResult, explain
from .video_explain import VideoExplanation, explain_video
from .evaluate import EvalResult, evaluate
from .feature_bank import FeatureBank
from .calibrate import CalibrationResult, calibrate
from .serve import ModelServer, ServeConfig, serve
from .train.lr_find import LRFindResult, lr_find
from .train.compare import RunRecord, compare_runs
from .train.tune import TuneResult, tune

__all__ = [
    "ConfigError", "LayerSummary", "ModelInfo", "Preprocessing", "PretrainedWeights", "ResNet", "ResNetConfig",
    "ResidualError", "create_model", "imagenet_class_names", "layer_summary", "list_models", "list_pretrained",
    "load_model", "load_weights", "model_info", "prepare_for_inference", "read_metadata", "read_state_dict",
    "register_pretrained", "save_model",
    "TrainConfig", "TrainResult", "train", "Embeddings", "embed", "similar",
    "LRFindResult", "lr_find", "PredictResult", "decode_predictions", "predict", "preprocess_input",
    "Segment", "VideoPrediction", "predict_video",
    "ExplainResult", "explain", "VideoExplanation", "explain_video", "EvalResult", "evaluate", "FeatureBank",
    "CalibrationResult", "calibrate", "RunRecord", "compare_runs",
    "ModelServer", "ServeConfig", "serve", "TuneResult", "tune",
]
