"""Same weights, same outputs as timm's ResNets: every registry name timm also has (the ImageNet nets, the
ResNet-D, ResNeXt and Wide variants, and the SE-ResNets, whose layout is timm's own), and timm's checkpoint
files converted by `residual convert`. Also the training parts timm has too: LAMB, the binary cross-entropy
of "ResNet strikes back", stochastic depth and AugMix's consistency loss.

timm needs torchvision, which has no build for this CPU torch, so `make install` installs timm without its
dependencies; where torchvision is missing, stand-ins take its place while timm is imported (timm's data
and feature modules import it; building and running a ResNet never touches it).
"""

import importlib.util
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from residual import load_model
from residual.cli import main
from residual.models import build_model, list_models

TORCHVISION_MODULES = ("torchvision", "torchvision.datasets", "torchvision.io", "torchvision.models",
                       "torchvision.models.feature_extraction", "torchvision.ops", "torchvision.ops.misc",
                       "torchvision.transforms", "torchvision.transforms.functional", "torchvision.transforms.v2",
                       "torchvision.utils")


def _import_timm():
    if importlib.util.find_spec("torchvision") is not None:
        import timm
        return timm
    with pytest.MonkeyPatch.context() as patch:
        for name in TORCHVISION_MODULES:
            patch.setitem(sys.modules, name, mock.MagicMock(name=name))
        import timm
    return timm


timm = _import_timm()
SHARED = [name for name in list_models() if timm.is_model(name)]


def test_timm_has_the_names_we_share_with_it():
    assert "seresnet50" in SHARED and "resnet50d" in SHARED and "resnext101_64x4d" in SHARED
    assert len(SHARED) == 22  # the CIFAR nets, plain nets, pre-activation nets and WRNs are ours alone


def _timm_model(name: str):
    """timm's `name`, its weights and batch-norm statistics drawn at random (away from their initial values,
    so that the comparison means something)."""
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for key, tensor in reference.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.normal_(0, 0.05)
    return reference


@pytest.mark.parametrize("name", SHARED)
def test_same_parameters_and_outputs_as_timm(name):
    reference = _timm_model(name)
    ours = build_model(name, num_classes=reference.num_classes).eval()
    theirs = reference.state_dict()
    assert [(key, tensor.shape) for key, tensor in ours.state_dict().items()] == \
        [(key, tensor.shape) for key, tensor in theirs.items()]
    ours.load_state_dict(theirs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, suffix", [("seresnet50", ".safetensors"), ("resnet50d", ".pth")])
def test_timm_checkpoints_convert_to_model_files_with_the_same_outputs(name, suffix, tmp_path, capsys):
    reference = _timm_model(name)
    checkpoint = tmp_path / f"{name}{suffix}"
    weights = {key: tensor.contiguous() for key, tensor in reference.state_dict().items()}
    if suffix == ".safetensors":  # as the Hugging Face hub has timm's weights
        save_file(weights, checkpoint)
    else:
        torch.save(weights, checkpoint)
    assert main(["convert", str(checkpoint), "--arch", name, "--classes", "imagenet",
                 "-o", str(tmp_path / "model.safetensors")]) == 0
    model = load_model(tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)
    assert model.arch == name and model.class_names[0] == "tench"


def test_lamb_steps_as_timms():
    """Our LAMB against timm's, without its global gradient clipping (max_grad_norm, on by default there;
    ours leaves clipping to --grad-clip): tensors with weight decay scaled by the trust ratio, those without
    taking the Adam step as it is."""
    from timm.optim import Lamb as TimmLamb

    from residual.train.optim import Lamb

    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(16), torch.zeros(4)]  # a zero tensor: trust ratio 1
    ours, theirs = ([tensor.clone().requires_grad_() for tensor in start] for _ in range(2))
    settings = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    optimizers = [Lamb([{"params": ours[:1], "weight_decay": 0.05}, {"params": ours[1:], "weight_decay": 0.0}],
                       **settings),
                  TimmLamb([{"params": theirs[:1], "weight_decay": 0.05}, {"params": theirs[1:], "weight_decay": 0.0}],
                           max_grad_norm=None, **settings)]
    for _ in range(20):
        gradients = [torch.randn_like(tensor) for tensor in start]
        for params, optimizer in zip((ours, theirs), optimizers):
            for param, gradient in zip(params, gradients):
                param.grad = gradient.clone()
            optimizer.step()
    for mine, timms, before in zip(ours, theirs, start):
        assert not torch.equal(mine, before)
        torch.testing.assert_close(mine, timms, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing, threshold", [(0.0, None), (0.1, None), (0.1, 0.2)])
def test_binary_cross_entropy_is_timms_summed_over_classes(smoothing, threshold):
    """`--loss bce` (Wightman et al. 2021) against timm's BinaryCrossEntropy: ours sums over the classes and
    the images (docs/training.md says why), timm's with sum_classes averages over the images only."""
    from timm.loss import BinaryCrossEntropy

    from residual.data.transforms import soft_targets
    from residual.train.loss import label_loss_sum

    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5) * 3, torch.randint(0, 5, (8,))
    reference = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold, sum_classes=True)
    mixed = 0.7 * soft_targets(labels, 5, smoothing) + 0.3 * soft_targets(labels.flip(0), 5, smoothing)
    for targets in (labels, mixed):  # class indices, and mixed soft targets (smoothing already in them)
        ours = label_loss_sum(logits, targets, labels, "bce", smoothing, threshold) / len(labels)
        torch.testing.assert_close(ours, reference(logits, targets))


def test_stochastic_depth_drops_the_samples_timms_drop_path_drops():
    from timm.layers import drop_path as timms_drop_path

    from residual.models.blocks import drop_path

    branch = torch.randn(64, 4, 3, 3)
    torch.manual_seed(0)
    ours = drop_path(branch, 0.3)
    torch.manual_seed(0)
    theirs = timms_drop_path(branch, 0.3, training=True)
    assert torch.equal(ours, theirs) and 5 < (ours.flatten(1) == 0).all(1).sum() < 40


def test_augmix_consistency_is_timms_jensen_shannon_term():
    """AugMix's consistency (`--augmix-jsd`) against timm's JsdCrossEntropy (after the Google AugMix code):
    its loss less the clean views' cross-entropy is alpha times the mean JSD over the images; ours is summed."""
    from timm.loss import JsdCrossEntropy

    from residual.train.loss import consistency_sum

    torch.manual_seed(0)
    logits, labels = torch.randn(3 * 8, 10) * 4, torch.randint(0, 10, (8,))
    timms = JsdCrossEntropy(num_splits=3, alpha=12, smoothing=0)(logits, labels.repeat(3))
    jensen_shannon = (timms - torch.nn.functional.cross_entropy(logits[:8], labels)) / 12
    torch.testing.assert_close(consistency_sum(logits, 3) / 8, jensen_shannon)


def test_pretrained_weights_are_where_timm_says_with_its_preprocessing():
    """Each torchvision checkpoint in `residual pretrained` against timm's record of the same weights (its
    pretrained_cfg: the URL, whose name carries the file's sha256 prefix, the normalisation, the interpolation
    and the evaluation crop; for the V2 weights that is timm's test crop, 224 of 232)."""
    from timm.models import get_pretrained_cfg

    from residual import list_pretrained

    checked = 0
    for weights in list_pretrained():
        if weights.source.startswith("torchvision"):
            record = get_pretrained_cfg(weights.name).to_dict()
            pre = weights.preprocessing
            assert weights.url == record["url"], weights.name
            assert (pre.mean, pre.std, pre.interpolation) == (record["mean"], record["std"], record["interpolation"])
            # timm leaves resnext101_64x4d at its default 0.875; torchvision evaluates those weights from 232 px.
            crop = record.get("test_crop_pct") or (224 / 232 if weights.name == "resnext101_64x4d.tv_in1k"
                                                   else record["crop_pct"])
            assert pre.input_size / pre.resize_size == pytest.approx(crop, abs=1e-3), weights.name
            checked += 1
    assert checked == 17
