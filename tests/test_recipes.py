"""Published recipes shipped as config files: each reads as a valid configuration, resolves to the numbers its
source gives, and trains; flags override a recipe as they override --config."""

import pytest

import residual
from residual.cli import main
from residual.data.datasets import open_dataset
from residual.data.shapes import write_shapes
from residual.errors import ConfigError
from residual.models import count_params
from residual.train import TrainConfig, load_config
from residual.train.config import resolve
from residual.train.recipes import RECIPES, recipe_notes, recipe_options


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), size=16, per_class=6, seed=3, progress=False)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_is_a_valid_configuration_that_says_where_it_comes_from(name, shapes):
    config = TrainConfig.from_dict({**recipe_options(name), "data": str(shapes)})
    source, differences = recipe_notes(name)
    assert source and differences.startswith("Not as")
    resolved = resolve(config, open_dataset(shapes))
    assert resolved.epochs == config.epochs and resolved.optim.weight_decay == config.optim.weight_decay


def test_recipes_resolve_to_their_sources_numbers(shapes):
    data = open_dataset(shapes)
    a3 = resolve(TrainConfig.from_dict({**recipe_options("rsb-a3"), "data": str(shapes)}), data)
    assert (a3.model, a3.image_size, a3.eval_image_size, a3.crop_pct, a3.epochs, a3.batch_size) == \
        ("resnet50", 160, 224, 0.95, 100, 2048)
    assert (a3.optim.optimizer, a3.optim.lr, a3.optim.weight_decay, a3.optim.warmup_epochs) == ("lamb", 0.008, 0.02, 5)
    assert (a3.loss, a3.bce_target_threshold, a3.augment.mixup, a3.augment.cutmix) == ("bce", 0.2, 0.1, 1.0)
    assert (a3.augment.auto_augment, a3.augment.randaugment_magnitude) == ("randaugment", 18)  # timm's m6 of 10
    assert a3.augment.crop_scale == 0.08  # ImageNet's crops, named: few images would get 0.35 automatically
    a1 = resolve(TrainConfig.from_dict({**recipe_options("rsb-a1"), "data": str(shapes)}), data)
    assert (a1.epochs, a1.aug_repeats, a1.label_smoothing, a1.model_options["drop_path_rate"]) == (600, 3, 0.1, 0.05)
    # The SGD recipes leave the rate automatic: their source's rate at their batch, scaled with another batch.
    he = resolve(TrainConfig.from_dict({**recipe_options("he2015-cifar"), "data": str(shapes)}), data)
    assert (he.optim.lr, he.optim.nesterov, he.optim.weight_decay, he.optim.milestones) == (0.1, False, 1e-4,
                                                                                            (91, 136.5))
    wrn = resolve(TrainConfig.from_dict({**recipe_options("zagoruyko2016-cifar"), "data": str(shapes)}), data)
    assert (wrn.model, wrn.model_options, wrn.epochs, wrn.batch_size) == ("wrn28_10", {"block_drop_rate": 0.3}, 200,
                                                                         128)
    assert (wrn.optim.lr, wrn.optim.nesterov, wrn.optim.weight_decay, wrn.optim.milestones, wrn.optim.gamma) == \
        (0.1, True, 5e-4, (60, 120, 160), 0.2)
    assert (wrn.augment.pad_crop, wrn.augment.pad_mode, wrn.augment.hflip) == (4, "reflect", True)
    resnext = resolve(TrainConfig.from_dict({**recipe_options("xie2017-cifar"), "data": str(shapes)}), data)
    assert (resnext.model, resnext.epochs, resnext.batch_size, resnext.augment.pad_crop, resnext.augment.pad_mode) == \
        ("resnext29_8x64d", 300, 128, 4, "zeros")
    assert (resnext.optim.lr, resnext.optim.nesterov, resnext.optim.weight_decay, resnext.optim.milestones,
            resnext.optim.gamma) == (0.1, True, 5e-4, (150, 225), 0.1)
    assert count_params(residual.create_model(resnext.model, num_classes=10)) == 34_426_698  # the paper's 34.4M
    tv = TrainConfig.from_dict({**recipe_options("torchvision-v1"), "data": str(shapes), "batch_size": 512})
    assert resolve(tv, data).optim.lr == pytest.approx(0.2) and resolve(tv, data).augment.crop_scale == 0.08


def test_a_recipe_trains_and_flags_override_it(shapes, tmp_path, capsys):
    # RSB A3's loss, optimizer and augmentation on a 16 px net: what a recipe sets besides its sizes runs.
    assert main(["train", str(shapes), "--recipe", "rsb-a3", "--model", "resnet20", "--image-size", "16",
                 "--eval-image-size", "16", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--quiet",
                 "--no-report", "--out", str(tmp_path), "--name", "a3"]) == 0
    ran = load_config(tmp_path / "a3" / "config.yaml")
    assert (ran.model, ran.image_size, ran.epochs, ran.batch_size) == ("resnet20", 16, 1, 16)
    assert (ran.optim.optimizer, ran.loss, ran.augment.cutmix, ran.crop_pct) == ("lamb", "bce", 1.0, 0.95)
    assert main(["train", str(shapes), "--recipe", "rsb-a3", "--config", str(tmp_path / "a3" / "config.yaml")]) == 2
    assert "give one starting point" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(shapes), "--recipe", "rsb-a4"])
    assert "invalid choice: 'rsb-a4'" in capsys.readouterr().err
    # A clash with a recipe's setting names the recipe, which the user never typed out.
    assert main(["train", str(shapes), "--recipe", "he2015-cifar", "--randaugment-magnitude", "9"]) == 2
    assert "(settings in --recipe he2015-cifar count as given" in capsys.readouterr().err


def test_the_crop_share_sets_the_saved_models_resize(tmp_path):
    data = write_shapes(tmp_path / "data", size=72, per_class=3, seed=0, progress=False)
    config = TrainConfig(data=str(data), model="resnet18", image_size=72, crop_pct=0.9, epochs=1, batch_size=8,
                         workers=0, quiet=True, report=False, out=str(tmp_path / "runs"), name="crop")
    result = residual.train(config)
    preprocessing = residual.load_model(result.model_path).preprocessing
    assert (preprocessing.input_size, preprocessing.resize_size) == (72, 80)  # round(72 / 0.9)
    with pytest.raises(ConfigError, match="--crop-pct is the share .* in \\(0, 1\\], got 1.2"):
        TrainConfig(data=str(data), crop_pct=1.2)


def test_the_wide_resnet_recipe_trains_a_wide_resnet_with_dropout_and_reflected_crops(shapes, tmp_path):
    assert main(["train", str(shapes), "--recipe", "zagoruyko2016-cifar", "--model", "wrn28_2", "--image-size", "16",
                 "--epochs", "1", "--batch-size", "16", "--workers", "0", "--quiet", "--no-report",
                 "--out", str(tmp_path), "--name", "wrn"]) == 0
    model = residual.load_model(tmp_path / "wrn" / "model.safetensors")
    assert (model.arch, model.config.block_drop_rate, model.config.stem_width) == ("wrn28_2", 0.3, 16)
    assert all(block.dropout_rate == 0.3 for block in model.blocks())
    ran = load_config(tmp_path / "wrn" / "config.yaml")
    assert (ran.augment.pad_crop, ran.augment.pad_mode, ran.optim.nesterov, ran.optim.gamma) == (2, "reflect", True,
                                                                                                0.2)
