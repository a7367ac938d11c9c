"""Parameter counts and MACs against the published figures."""

import pytest

import residual
from residual.models import model_info


# torchvision's documented num_params and GFLOPS (which are MACs) at 224x224, 1000 classes.
TORCHVISION = {
    "resnet18": (11_689_512, 1.814),
    "resnet34": (21_797_672, 3.664),
    "resnet50": (25_557_032, 4.089),
    "resnet101": (44_549_160, 7.801),
    "resnet152": (60_192_808, 11.514),
    "resnext50_32x4d": (25_028_904, 4.230),
    "resnext101_32x8d": (88_791_336, 16.414),
    "resnext101_64x4d": (83_455_272, 15.460),
    "wide_resnet50_2": (68_883_240, 11.398),
    "wide_resnet101_2": (126_886_696, 22.753),
}


@pytest.mark.parametrize("name", TORCHVISION)
def test_imagenet_nets_match_torchvision_counts(name):
    params, gmacs = TORCHVISION[name]
    info = model_info(name)
    assert info.params == params
    assert round(info.macs / 1e9, 3) == gmacs
    assert info.input_size == 224


# He et al. 2015, Table 6 (CIFAR-10, option A shortcuts).
CIFAR_PAPER = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7,
               "resnet1202": 19.4}


@pytest.mark.parametrize("name", CIFAR_PAPER)
def test_cifar_nets_match_paper_table6(name):
    info = model_info(name)
    millions = info.params / 1e6
    assert millions == pytest.approx(CIFAR_PAPER[name], rel=0.02), millions
    assert info.depth == int(name.removeprefix("resnet"))
    assert info.input_size == 32


def test_preact_cifar_nets_match_he_2016():
    # He et al. 2016 Table 2 / Fig. 1: ResNet-164 1.7M, ResNet-1001 10.2M parameters.
    assert model_info("preact_resnet164").params / 1e6 == pytest.approx(1.7, rel=0.02)
    assert model_info("preact_resnet1001").params / 1e6 == pytest.approx(10.2, rel=0.02)
    assert model_info("preact_resnet1001").depth == 1001


# CIFAR Wide ResNets (Zagoruyko & Komodakis 2016, Table 4; WRN-28-2 as FixMatch reports it) and ResNeXt-29
# (Xie et al. 2017, Table 7), in millions for 10 classes; the depth is the number in the name.
WIDE_AND_RESNEXT_PAPERS = {"wrn16_8": 11.0, "wrn16_10": 17.1, "wrn22_8": 17.2, "wrn28_2": 1.5, "wrn28_10": 36.5,
                           "wrn40_2": 2.2, "wrn40_4": 8.9, "wrn40_8": 35.7, "resnext29_8x64d": 34.4,
                           "resnext29_16x64d": 68.1}
# Exact counts published with trained CIFAR-10 weights (osmr's imgclsmob tables).
WIDE_AND_RESNEXT_EXACT = {"wrn16_10": 17_116_634, "wrn28_10": 36_479_194, "wrn40_8": 35_748_314,
                          "resnext29_16x64d": 68_155_210}


@pytest.mark.parametrize("name", WIDE_AND_RESNEXT_PAPERS)
def test_wide_resnets_and_resnext29_match_their_papers(name):
    info = model_info(name)
    assert info.params / 1e6 == pytest.approx(WIDE_AND_RESNEXT_PAPERS[name], abs=0.06), info.params
    if name in WIDE_AND_RESNEXT_EXACT:
        assert info.params == WIDE_AND_RESNEXT_EXACT[name]
    assert info.depth == int(name.removeprefix("resnext").removeprefix("wrn").split("_")[0])
    assert (info.family, info.input_size) == ("cifar", 32)
    # A net with other stages than its name's is counted, not named.
    assert model_info("wrn28_10", layers=(2, 2, 2)).depth == 1 + 2 * 6 + 1


# timm's counts for its seresnet* / seresnext* (reduction 16, bottleneck widths rounded to multiples of 8).
SQUEEZE_EXCITE_TIMM = {"seresnet50": 28_088_024, "seresnext50_32x4d": 27_559_896, "seresnext101_32x4d": 48_955_416}


@pytest.mark.parametrize("name", SQUEEZE_EXCITE_TIMM)
def test_se_resnets_match_timm_and_add_what_hu_et_al_say(name):
    info = model_info(name)
    assert info.params == SQUEEZE_EXCITE_TIMM[name]
    assert info.block == "bottleneck + SE"
    plain = model_info(name, se_ratio=0.0)
    assert plain.block == "bottleneck"
    if "50" in name:  # Hu et al. 2018: "~2.5 million additional parameters" over ResNet-50's ~25 million
        assert 2.5e6 < info.params - plain.params < 2.55e6
    assert 0 < info.macs - plain.macs < 0.002 * plain.macs  # the gates work on 1x1 maps: nearly free


def test_resnet_d_counts_match_timm():
    # timm resnet50d: deep stem (32, 32, 64) adds 19,232 parameters to resnet50.
    assert model_info("resnet50d").params == 25_576_264


def test_plain_twins_cost_the_same_as_option_a_resnets():
    # Option A shortcuts have no parameters and no MACs, so the twins are identical in cost.
    for depth in (20, 56, 110):
        plain, residual_net = model_info(f"plain{depth}"), model_info(f"resnet{depth}")
        assert (plain.params, plain.macs) == (residual_net.params, residual_net.macs)
    # ImageNet twins lose exactly the projection shortcuts.
    resnet18 = residual.create_model("resnet18")
    projection = sum(p.numel() for n, p in resnet18.named_parameters() if "downsample" in n)
    assert model_info("plain18").params == model_info("resnet18").params - projection


def test_list_models_filters_and_unknown_names_suggest():
    assert residual.list_models("resnet5*") == ["resnet50", "resnet50d", "resnet56"]
    every = residual.list_models()
    for name in ["resnet18", "resnet152", "wide_resnet101_2", "resnext101_64x4d", "plain18", "plain34",
                 "plain20", "plain110", "resnet1202", "preact_resnet164"]:
        assert name in every
    with pytest.raises(residual.ConfigError, match="Did you mean .*resnet50"):
        residual.create_model("resnet5O")
    with pytest.raises(residual.ConfigError, match="unknown option"):
        residual.create_model("resnet18", num_clases=3)


def test_macs_follow_input_size():
    assert model_info("resnet50", input_size=112).macs < model_info("resnet50").macs / 3
