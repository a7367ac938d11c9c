"""Behaviour of the architectures: every model trains, every variant does what it says."""

import pytest
import torch
from torch import nn

import residual
from residual.models import model_info
from residual.models.blocks import ZeroPadShortcut
from residual.models.registry import empty_model
from residual.models.summary import layer_summary


@pytest.mark.parametrize("name", residual.list_models())
def test_every_model_runs_forward_and_backward(name):
    model = residual.create_model(name)
    size = 32 if model.config.stem == "cifar" else 64
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"


@pytest.mark.parametrize("name, size, channels, reductions", [
    ("resnet50", 64, [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ("resnet18d", 64, [64, 128, 256, 512], [4, 8, 16, 32]),
    ("resnet20", 32, [16, 32, 64], [1, 2, 4]),
])
def test_features_only_returns_stage_maps_as_feature_info_says(name, size, channels, reductions):
    model = residual.create_model(name, features_only=True)
    maps = model(torch.randn(2, 3, size, size))
    assert [f["num_chs"] for f in model.feature_info] == channels
    assert [f["reduction"] for f in model.feature_info] == reductions
    assert [m.shape for m in maps] == [(2, c, size // r, size // r) for c, r in zip(channels, reductions)]
    assert not any(name.startswith("fc.") for name in model.state_dict())


def test_headless_model_and_forward_head_give_pooled_features():
    torch.manual_seed(1)
    full = residual.create_model("resnet18").eval()
    headless = residual.create_model("resnet18", num_classes=0).eval()
    headless.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = headless(x)
        assert features.shape == (2, 512) == (2, full.num_features)
        assert torch.allclose(features, full.forward_head(full.forward_features(x), pre_logits=True))
        assert torch.allclose(full.fc(features), full(x), atol=1e-6)


def test_reset_classifier_replaces_only_the_head():
    model = residual.create_model("resnet18").eval()
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    model.reset_classifier(7, class_names=list("abcdefg"))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert model.config.num_classes == 7 and model.class_names == list("abcdefg")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_global_max_pool_differs_from_avg_pool():
    torch.manual_seed(2)
    avg = residual.create_model("resnet18").eval()
    mx = residual.create_model("resnet18", global_pool="max").eval()
    mx.load_state_dict(avg.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = avg.forward_features(x)
        assert torch.allclose(mx(x), avg.fc(feature_map.amax(dim=(2, 3))), atol=1e-5)
        assert not torch.allclose(mx(x), avg(x))


def test_any_input_channels_and_classes():
    model = residual.create_model("resnet34", in_chans=1, num_classes=5)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    deep = residual.create_model("resnet50d", in_chans=4)
    assert deep.conv1[0].weight.shape == (32, 4, 3, 3)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 64, 64))


def test_v1_puts_the_stride_on_the_first_1x1_and_v1_5_on_the_3x3():
    v15 = residual.create_model("resnet50").layer2[0]
    v1 = residual.create_model("resnet50", stride_in_1x1=True).layer2[0]
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))
    assert residual.model_info("resnet50", stride_in_1x1=True).macs < residual.model_info("resnet50").macs


def test_resnet_d_has_deep_stem_and_average_pool_shortcuts():
    model = residual.create_model("resnet50d")
    keys = model.state_dict().keys()
    assert {"conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight"} <= keys
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut[0], nn.AvgPool2d) and shortcut[1].stride == (1, 1)
    assert "layer2.0.downsample.1.weight" in keys and "layer2.0.downsample.2.running_var" in keys


def test_preact_blocks_normalise_first_and_leave_the_sum_unactivated():
    torch.manual_seed(3)
    x = torch.randn(4, 64, 8, 8)
    pre = residual.create_model("preact_resnet18").layer1[0]
    post = residual.create_model("resnet18").layer1[0]
    assert pre.bn1.num_features == 64  # BN on the block input
    assert (pre(x) < 0).any(), "pre-activation blocks return the raw sum"
    assert (post(x) >= 0).all(), "post-activation blocks end with ReLU"
    cifar = residual.create_model("preact_resnet110")  # the authors' CIFAR nets: bare stem conv, final BN-ReLU
    assert isinstance(cifar.bn1, nn.Identity) and isinstance(cifar.bn_final, nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact_resnet50"])
def test_zero_init_residual_makes_identity_blocks_start_as_identity(name):
    model = residual.create_model(name, zero_init_residual=True).eval()
    block = model.layer1[1]  # identity shortcut
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        expected = x if model.config.preact else torch.relu(x)
        assert torch.allclose(block(x), expected, atol=1e-6)
    plain = residual.create_model(name).eval().layer1[1]
    with torch.no_grad():
        assert not torch.allclose(plain(x), expected, atol=1e-3)


@pytest.mark.parametrize("name", ["plain18", "plain34", "plain20", "plain110"])
def test_plain_twins_have_no_shortcut_at_all(name):
    model = residual.create_model(name)
    assert all(not block.residual and block.downsample is None for block in model.blocks())
    assert not any("downsample" in key for key in model.state_dict())
    # With the residual branch silenced, a plain block outputs zeros; its residual twin passes x on.
    twin = residual.create_model(name.replace("plain", "resnet"))
    for net in (model, twin):
        block = net.layer1[1]
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
        block.eval()
    x = torch.rand(2, model.layer1[1].conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.count_nonzero(model.layer1[1](x)) == 0
        assert torch.allclose(twin.layer1[1](x), x)


def test_cifar_option_a_pads_and_subsamples_option_b_projects():
    a = residual.create_model("resnet20")
    shortcut = a.layer2[0].downsample
    assert isinstance(shortcut, ZeroPadShortcut)
    x = torch.randn(2, 16, 32, 32)
    y = shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and torch.count_nonzero(y[:, 16:]) == 0
    b = residual.create_model("resnet20", shortcut="B")
    assert isinstance(b.layer2[0].downsample[0], nn.Conv2d)
    assert residual.model_info("resnet20", shortcut="B").params > residual.model_info("resnet20").params
    assert a.conv1.kernel_size == (3, 3) and isinstance(a.maxpool, nn.Identity)
    assert [stage[0].conv1.out_channels for stage in (a.layer1, a.layer2, a.layer3)] == [16, 32, 64]


@pytest.mark.parametrize("norm, kind", [(None, None), ("group", nn.GroupNorm), ("batch", nn.BatchNorm2d)])
def test_normalisation_is_an_option(norm, kind):
    model = residual.create_model("resnet20", norm=norm)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    if kind is None:
        assert norms == []
    else:
        assert norms and all(isinstance(m, kind) for m in norms)
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_dropout_before_the_classifier():
    x = torch.randn(4, 3, 32, 32)
    with_drop = residual.create_model("resnet20", drop_rate=0.5).train()
    without = residual.create_model("resnet20").train()
    assert not torch.equal(with_drop(x), with_drop(x))
    assert torch.equal(without(x), without(x))
    with_drop.eval()
    assert torch.equal(with_drop(x), with_drop(x))


def test_stochastic_depth_skips_branches_in_training_only_more_often_deeper():
    model = residual.create_model("resnet56", drop_path_rate=0.2)
    assert [block.drop_path_rate for block in model.blocks()] == pytest.approx([0.2 * l / 27 for l in range(1, 28)])
    # No parameters of its own: the same state dict as the model without it, the same outputs in evaluation.
    plain = residual.create_model("resnet56")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert list(plain.state_dict()) == list(model.state_dict())
    assert torch.equal(model.eval()(x), plain.eval()(x))
    # In training a skipped sample leaves the block its shortcut: for an identity block fed x >= 0, relu(x) = x.
    block = residual.create_model("resnet20").layer1[1].train()
    block.drop_path_rate = 0.5
    x = torch.rand(400, 16, 4, 4)
    kept = block(x)
    skipped = (kept == x).flatten(1).all(1)
    assert 150 < skipped.sum() < 250  # 200 expected; the odds of leaving this range are under 1e-6
    block.drop_path_rate = 0.0
    # Kept branches are scaled by 1 / (1 - 0.5), so the sum's expectation is the model evaluation runs.
    assert torch.allclose(kept[~skipped], torch.relu(2 * (block(x) - x) + x)[~skipped], atol=1e-5)
    with pytest.raises(residual.ConfigError, match="drop_path_rate needs shortcuts"):
        residual.create_model("plain20", drop_path_rate=0.1)
    with pytest.raises(residual.ConfigError, match="drop_path_rate must be in"):
        residual.create_model("resnet20", drop_path_rate=1.0)


def test_the_layer_summary_adds_up_to_the_model_and_follows_its_strides():
    model = empty_model("resnet50")
    summary = layer_summary(model, 224, depth=1)
    assert [row.name for row in summary.rows] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                                                  "layer4", "global_pool", "fc"]  # no Identity, no Dropout(0)
    info = model_info("resnet50")
    assert (summary.params, summary.macs) == (info.params, info.macs) == (25_557_032, 4_089_184_256)
    assert sum(row.params for row in summary.rows) == summary.params
    assert sum(row.macs for row in summary.rows) == summary.macs
    stages = {row.name: row for row in summary.rows}
    for stage in model.feature_info:
        side = 224 // stage["reduction"]
        assert stages[stage["module"]].output == (stage["num_chs"], side, side)
    assert stages["fc"].output == (1000,) and stages["fc"].macs == 2048 * 1000
    # One level down each stage's blocks add up to it; the first block of a stage carries the projection.
    blocks = layer_summary(model, 224, depth=2).rows
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        inside = [row for row in blocks if row.name.startswith(stage + ".")]
        assert [row.kind for row in inside] == ["Bottleneck"] * model.config.layers[int(stage[-1]) - 1]
        assert sum(row.macs for row in inside) == stages[stage].macs
        assert inside[0].params > inside[1].params
    cifar = layer_summary(residual.create_model("resnet20"), 32, depth=3)
    assert {row.depth for row in cifar.rows} == {1, 2, 3} and cifar.macs == model_info("resnet20").macs


def test_bad_options_fail_with_a_clear_message():
    with pytest.raises(residual.ConfigError, match="BasicBlock supports only groups=1"):
        residual.create_model("resnet18", groups=32)
    with pytest.raises(residual.ConfigError, match="shortcut must be one of"):
        residual.create_model("resnet18", shortcut="C")
    with pytest.raises(residual.ConfigError, match="differ in length"):
        residual.create_model("resnet20", widths=(16, 32))
    with pytest.raises(residual.ConfigError, match="global_pool"):
        residual.create_model("resnet20", global_pool="median")
