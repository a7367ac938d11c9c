"""The inference fast path: BN folded into convs, channels_last, bf16; same answers as the model as trained."""

import json

import pytest
import torch
from torch import nn

from residual import load_model, prepare_for_inference
from residual.cli import main
from residual.data.datasets import sample_items
from residual.errors import ConfigError, ResidualError
from residual.evaluate import evaluate
from residual.explain import grad_cam
from residual.models import build_model, fold_batchnorm
from residual.predict import predict


def _with_real_statistics(model: nn.Module) -> nn.Module:
    """Fresh BN layers are the identity; give them statistics and affine terms that make folding matter."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(shape, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize("arch, options, size, expected", [
    ("resnet20", {}, 32, "all"),  # basic blocks, option A shortcuts
    ("resnet50", {}, 64, "all"),  # bottlenecks, projection shortcuts
    ("resnet18d", {}, 64, "all"),  # deep stem, average-pool shortcuts
    ("preact_resnet18", {}, 64, 9),  # the stem BN and, per block, the BN after conv1 (the rest precede convs)
    ("resnet20", {"norm": "group"}, 32, 0),
])
def test_folding_keeps_the_output_and_removes_the_norms(arch, options, size, expected):
    model = _with_real_statistics(build_model(arch, num_classes=10, **options))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = model(x)
    assert folded == (norms if expected == "all" else expected)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == norms - folded
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ConfigError, match="eval mode"):
        fold_batchnorm(build_model("resnet20").train())


def test_prepared_model_keeps_the_interface_and_the_answers(demo_run):
    reference = load_model(demo_run["model"]).eval()
    fast = prepare_for_inference(load_model(demo_run["model"]), "cpu", "fp32")
    assert fast.class_names == reference.class_names and fast.preprocessing == reference.preprocessing
    assert fast.inference_precision == "fp32"
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    items = sample_items(demo_run["data"], "test", 64)
    ours, theirs = predict(fast, items, topk=1).predictions, predict(reference, items, topk=1).predictions
    for a, b in zip(ours, theirs):
        assert a.top[0][0] == b.top[0][0] and a.top[0][2] == pytest.approx(b.top[0][2], abs=1e-4)
    # Grad-CAM still finds its layer and sees the same activations.
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(grad_cam(fast, x)[0], grad_cam(reference, x)[0], atol=1e-3, rtol=1e-3)


def test_bf16_weights_agree_with_fp32_on_the_test_split(demo_run, tmp_path):
    fp32 = evaluate(prepare_for_inference(load_model(demo_run["model"]), "cpu", "fp32"), demo_run["data"], "test",
                    out_dir=tmp_path / "fp32", gallery_size=0)
    bf16_model = prepare_for_inference(load_model(demo_run["model"]), "cpu", "bf16")
    assert bf16_model.conv1.weight.dtype == torch.bfloat16
    bf16 = evaluate(bf16_model, demo_run["data"], "test", out_dir=tmp_path / "bf16", gallery_size=2)
    assert bf16_model(torch.randn(1, 3, 32, 32)).dtype == torch.float32  # logits come back float32
    assert abs(bf16.metrics["top1"] - fp32.metrics["top1"]) <= 0.01
    assert (bf16.probs.argmax(1) == fp32.probs.argmax(1)).mean() >= 0.99


def test_cli_precision_flag(demo_run, tmp_path, capsys):
    image = next((demo_run["data"] / "test" / "star").iterdir())
    assert main(["predict", str(demo_run["model"]), str(image), "--precision", "bf16", "--format", "json",
                 "--quiet"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["top"][0]["class_name"] == "star"
    with pytest.raises(ResidualError, match="--precision bf16"):
        from residual.cli import _inference_model
        _inference_model(str(tmp_path / "model.onnx"), "cpu", "bf16")
