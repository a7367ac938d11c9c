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


def wide_resnet_reference(params: dict, x: torch.Tensor, blocks_per_stage: int, dropout: float = 0.0,
                          training: bool = False) -> torch.Tensor:
    """WRN-d-k's forward, laid out as the authors' functional PyTorch code is (Zagoruyko & Komodakis 2016):
    a bare 3x3 stem conv; blocks of BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3 whose sum is not activated, a
    1x1 projection of the pre-activated input where the width changes; BN-ReLU, 8x8 average pool, linear.
    Written from the paper, apart from blocks.py; `params` are named as ours are. `training`: batch
    statistics and dropout, as a training step sees the net."""
    def norm(x, name):
        mean, var = (None, None) if training else (params[f"{name}.running_mean"], params[f"{name}.running_var"])
        return torch.relu(torch.nn.functional.batch_norm(x, mean, var, params[f"{name}.weight"],
                                                         params[f"{name}.bias"], training=training))

    x = torch.nn.functional.conv2d(x, params["conv1.weight"], padding=1)
    for stage in (1, 2, 3):
        for index in range(blocks_per_stage):
            name, stride = f"layer{stage}.{index}", 2 if stage > 1 and index == 0 else 1
            activated = norm(x, f"{name}.bn1")
            branch = torch.nn.functional.conv2d(activated, params[f"{name}.conv1.weight"], stride=stride, padding=1)
            branch = torch.nn.functional.dropout(norm(branch, f"{name}.bn2"), dropout, training)
            branch = torch.nn.functional.conv2d(branch, params[f"{name}.conv2.weight"], padding=1)
            projection = params.get(f"{name}.downsample.0.weight")
            x = branch + (x if projection is None else torch.nn.functional.conv2d(activated, projection, stride=stride))
    x = torch.nn.functional.avg_pool2d(norm(x, "bn_final"), 8).flatten(1)
    return torch.nn.functional.linear(x, params["fc.weight"], params["fc.bias"])


def test_wide_resnets_are_the_authors_nets():
    torch.manual_seed(7)
    model = residual.create_model("wrn16_8", block_drop_rate=0.3).eval()
    for module in model.modules():  # statistics a trained net might have, so that every BN matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    params = dict(model.state_dict())
    assert params["conv1.weight"].shape == (16, 3, 3, 3) and isinstance(model.bn1, nn.Identity)
    assert params["layer1.0.downsample.0.weight"].shape == (128, 16, 1, 1)  # 16 -> 16k: a projection, no BN
    assert [model.config.widths, model.config.layers] == [(128, 256, 512), (2, 2, 2)]
    assert {name for name in params if "downsample" in name} == {
        f"layer{stage}.0.downsample.0.weight" for stage in (1, 2, 3)}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), wide_resnet_reference(params, x, 2), atol=1e-4)
        # A training step's forward too: the same dropout masks drawn in the same order give the same output.
        torch.manual_seed(9)
        trained = model.train()(x)
        torch.manual_seed(9)
        assert torch.allclose(trained, wide_resnet_reference(params, x, 2, dropout=0.3, training=True), atol=1e-4)
        torch.manual_seed(9)
        assert not torch.allclose(trained, wide_resnet_reference(params, x, 2, training=True), atol=1e-2)


def test_squeeze_and_excitation_gates_the_branch_before_the_sum_in_timms_layout():
    torch.manual_seed(8)
    model = residual.create_model("seresnet50").eval()
    block = model.layer2[0]
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    names = [name for name in model.state_dict() if name.startswith("layer2.0.")]
    # timm's order, so its checkpoints map one to one: the gate between bn3 and the shortcut.
    assert names[names.index("layer2.0.bn3.num_batches_tracked") + 1:][:5] == [
        "layer2.0.se.fc1.weight", "layer2.0.se.fc1.bias", "layer2.0.se.fc2.weight", "layer2.0.se.fc2.bias",
        "layer2.0.downsample.0.weight"]
    assert (block.se.fc1.in_channels, block.se.fc1.out_channels) == (512, 32)
    x = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        branch = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))))
        squeezed = branch.mean((2, 3))  # Hu et al.'s squeeze, then excitation: FC-ReLU-FC-sigmoid
        gate = torch.sigmoid(torch.relu(squeezed @ block.se.fc1.weight.flatten(1).T + block.se.fc1.bias)
                             @ block.se.fc2.weight.flatten(1).T + block.se.fc2.bias)
        expected = torch.relu(branch * gate[:, :, None, None] + block.downsample(x))
        assert torch.allclose(block(x), expected, atol=1e-5)
    # Narrow blocks keep 8 channels in the gate's bottleneck (timm's rounding), never fewer.
    assert residual.create_model("resnet20", se_ratio=1 / 16).layer1[0].se.fc1.out_channels == 8


@pytest.mark.parametrize("name, last_conv", [("resnet20", "conv2"), ("preact_resnet110", "conv2"),
                                              ("resnet50", "conv3"), ("preact_resnet164", "conv3")])
def test_block_dropout_drops_what_the_last_conv_sees_in_training_only(name, last_conv):
    model = residual.create_model(name, block_drop_rate=0.5)
    block = model.layer1[1]
    assert block.dropout_rate == 0.5
    # The norm before the last conv gives exactly 1 everywhere, so what that conv sees is dropout's doing alone.
    before_last = {"conv2": "bn1" if not block.preactivated else "bn2",
                   "conv3": "bn2" if not block.preactivated else "bn3"}[last_conv]
    nn.init.zeros_(getattr(block, before_last).weight)
    nn.init.ones_(getattr(block, before_last).bias)
    seen = []
    getattr(block, last_conv).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.rand(8, block.conv1.in_channels, 8, 8)
    block.train()(x)
    block.eval()(x)
    training, evaluation = seen
    assert set(training.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - 0.5)
    assert 0.45 < (training == 0).float().mean() < 0.55
    assert torch.equal(evaluation, torch.ones_like(evaluation))
    # No parameters of its own: the same weights without it give the same evaluation.
    plain = residual.create_model(name)
    plain.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), plain.eval()(images))
    with pytest.raises(residual.ConfigError, match="block_drop_rate must be in"):
        residual.create_model(name, block_drop_rate=1.0)


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
