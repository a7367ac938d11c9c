"""Progressive resizing: the schedule of training sizes, the augmentation at a smaller size, and a run
that trains (and resumes) at each epoch's size while validating and saving at the full one."""

import csv

import pytest
import torch
from torch.nn import functional as F

import residual
from residual.cli import _train_config, build_parser
from residual.data.datasets import open_dataset
from residual.data.shapes import write_shapes
from residual.data.transforms import AugmentConfig, Downscale, RandomResizedCropFlip, build_augment
from residual.errors import ConfigError
from residual.train import TrainConfig, load_config, train
from residual.train import trainer as trainer_module
from residual.train.config import resolve, save_config
from residual.train.history import read_metrics
from residual.train.optim import OptimConfig
from residual.train.progressive import default_ramp, describe_sizes, epoch_sizes

QUICK = dict(model="resnet20", batch_size=32, optim=OptimConfig(lr=0.05), quiet=True, report=False)


def test_the_sizes_stay_at_the_smallest_until_the_ramp_then_grow_in_steps_of_the_stride_to_the_full_size():
    assert epoch_sizes(12, 32, 16, (8, 10), 4) == [16] * 8 + [24] + [32] * 3
    assert epoch_sizes(4, 16, 8, (1, 4), 4) == [8, 12, 12, 16]  # 10.7 and 13.3 px, rounded to multiples of 4
    # FFCV's ResNet-50 schedule (160 to 192 px over epochs 65-76 of 88, rounded to 32): one step up, midway.
    ffcv = epoch_sizes(88, 192, 160, (65, 76), 32)
    assert set(ffcv) == {160, 192} and ffcv.index(192) + 1 == 71 and ffcv[-12:] == [192] * 12
    # A smallest size off the grid is kept; the ramp's sizes never leave [smallest, full].
    assert epoch_sizes(5, 224, 100, (1, 5), 32) == [100, 128, 160, 192, 224]
    assert epoch_sizes(3, 32, 16, (2, 3), 4) == [16, 16, 32]


def test_the_default_ramp_keeps_the_last_eighth_at_full_size_after_an_eighth_of_ramp():
    assert default_ramp(88) == (66, 77)  # FFCV ramps over 65-76 of its 88 epochs
    assert default_ramp(12) == (8, 10)
    assert default_ramp(1) == (0, 1)  # a single epoch trains at the full size
    assert describe_sizes([16] * 8 + [24] + [32] * 3) == "16 px in epochs 1-8, 24 px in epoch 9, 32 px in epochs 10-12"


def test_a_smaller_output_size_gives_the_same_crops_at_a_lower_resolution():
    images = torch.rand(6, 3, 32, 32)
    for config in (AugmentConfig(preset="cifar"), AugmentConfig(preset="none")):
        torch.manual_seed(0)
        full = build_augment(config, 32, 32)(images)
        torch.manual_seed(0)
        small = build_augment(config, 32, 32, 16)(images)
        assert small.shape == (6, 3, 16, 16)
        expected = F.interpolate(full, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(small, expected)
    # Random-resized crops are drawn as before and resampled once, straight to the smaller size.
    standard = build_augment(AugmentConfig(preset="standard"), 96, 110, 64)
    assert isinstance(standard[0], RandomResizedCropFlip) and standard[0].size == 64
    assert not any(isinstance(stage, Downscale) for stage in standard)
    assert standard(torch.rand(2, 3, 110, 110)).shape == (2, 3, 64, 64)
    # The preset's knobs follow the run's image size, not the smaller one (cifar's padding is 32 // 8).
    assert build_augment(AugmentConfig(preset="cifar"), 32, 32, 16)[0].padding == 4


def test_a_run_trains_at_each_epochs_size_validates_at_the_full_size_and_resumes_on_schedule(tmp_path, monkeypatch):
    data = write_shapes(tmp_path / "data", size=16, per_class=12, seed=0, progress=False)
    seen: list[tuple[bool, int]] = []  # (training, input side) of every forward pass

    def recording_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].shape[-1])))
        return model

    build_model = trainer_module.build_model
    monkeypatch.setattr(trainer_module, "build_model", recording_model)
    config = TrainConfig(data=str(data), epochs=4, progressive_resize=8, progressive_ramp=(1, 4), out=str(tmp_path),
                         name="run", **QUICK)
    # Stopped after epoch 2, then resumed: epochs 3 and 4 take the schedule's sizes too.
    train(config, epoch_end=lambda row: "stopped" if row["epoch"] == 2 else None)
    assert [row["epoch"] for row in read_metrics(tmp_path / "run" / "metrics.csv")] == [1, 2]
    train(resume=tmp_path / "run")
    trained = [size for training, size in seen if training]
    assert set(trained) == {8, 12, 16}
    batches = len(trained) // 4  # the same number of batches every epoch
    assert trained == [8] * batches + [12] * 2 * batches + [16] * batches
    assert {size for training, size in seen if not training} == {16}
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [row["train_size"] for row in rows] == ["8", "12", "12", "16"]
    assert read_metrics(tmp_path / "run" / "metrics.csv")[0]["train_size"] == 8
    model = residual.load_model(tmp_path / "run" / "model.safetensors")
    assert model.preprocessing.input_size == 16
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.progressive_resize, saved.progressive_ramp) == (8, (1, 4))


def test_the_ramp_is_chosen_from_the_epochs_and_chosen_again_when_a_config_changes_them(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    dataset = open_dataset(data)
    given = TrainConfig(data=str(data), epochs=16, progressive_resize=8)
    resolved = resolve(given, dataset)
    assert resolved.progressive_ramp == (12, 14)
    assert resolve(TrainConfig(data=str(data), epochs=16), dataset).progressive_ramp is None
    save_config(resolved, tmp_path / "config.yaml", given)

    def from_config(*flags):
        return resolve(_train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "config.yaml"),
                                                                 *flags])), dataset)

    assert from_config() == resolved
    assert from_config("--epochs", "8").progressive_ramp == (6, 7)  # chosen again for the new length
    assert from_config("--progressive-ramp", "2,5").progressive_ramp == (2, 5)


def test_impossible_settings_are_refused_in_one_line(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    dataset = open_dataset(data)
    with pytest.raises(ConfigError, match="--progressive-resize 16: the smallest training size must be less than "
                                          "the full one, 16 px"):
        resolve(TrainConfig(data=str(data), progressive_resize=16), dataset)
    with pytest.raises(ConfigError, match=r"0 <= START < END <= --epochs \(10\); got 6,12"):
        resolve(TrainConfig(data=str(data), epochs=10, progressive_resize=8, progressive_ramp=(6, 12)), dataset)
    for ramp in ((6, 4), (6, 6)):
        with pytest.raises(ConfigError, match=f"got {ramp[0]},{ramp[1]}"):
            resolve(TrainConfig(data=str(data), epochs=10, progressive_resize=8, progressive_ramp=ramp), dataset)
    with pytest.raises(ConfigError, match="--schedule plateau cuts the rate when validation stops improving"):
        resolve(TrainConfig(data=str(data), progressive_resize=8, optim=OptimConfig(schedule="plateau")), dataset)
    with pytest.raises(ConfigError, match="give --progressive-resize MIN too"):
        TrainConfig(data=str(data), progressive_ramp=(1, 2))
    with pytest.raises(ConfigError, match="--progressive-resize must be at least 1"):
        TrainConfig(data=str(data), progressive_resize=0)


def test_the_flags_parse_and_a_malformed_ramp_is_named(capsys):
    parser = build_parser()
    args = parser.parse_args(["train", "data/", "--progressive-resize", "160", "--progressive-ramp", "65,76"])
    assert (args.progressive_resize, args.progressive_ramp) == (160, (65, 76))
    config = _train_config(args)
    assert (config.progressive_resize, config.progressive_ramp) == (160, (65, 76))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "data/", "--progressive-resize", "160", "--progressive-ramp", "65"])
    assert "--progressive-ramp: takes two epochs, START,END (e.g. 20,26), got '65'" in capsys.readouterr().err


def test_a_compiled_run_compiles_one_static_graph_per_training_size(tmp_path, monkeypatch):
    # Left to itself, Dynamo compiles the second size as a graph for any size and runs that from then on.
    from torch._dynamo.testing import CompileCounter

    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)  # 40 training images
    counter, compile_ = CompileCounter(), torch.compile
    asked = []

    def counted(model, mode=None, dynamic=None):
        asked.append(dynamic)
        return compile_(model, backend=counter, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", counted)
    torch._dynamo.reset()  # nothing compiled earlier in this process is reused
    try:
        train(TrainConfig(data=str(data), epochs=4, compile=True, progressive_resize=8, progressive_ramp=(1, 4),
                          out=str(tmp_path), name="compiled",
                          **(QUICK | {"batch_size": 8, "model_options": {"layers": (1, 1, 1)}})))
    finally:
        torch._dynamo.reset()
    assert asked == [False] and counter.frame_count == 3, "8, 12 and 16 px, one static graph each"


def test_early_stopping_waits_for_the_first_epoch_at_the_full_size(tmp_path):
    # Validation is at the full size, so it can stall while the run trains small; that must not end the run
    # before it has trained at the size it is validated at. Weights that do not move never improve.
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    result = train(TrainConfig(data=str(data), epochs=6, progressive_resize=8, progressive_ramp=(3, 4),
                               early_stopping=1, out=str(tmp_path), name="run",
                               **(QUICK | {"optim": OptimConfig(lr=1e-12, schedule="constant"),
                                           "model_options": {"norm": None}})))
    assert [row["train_size"] for row in result.history] == [8, 8, 8, 16], "stopped at the first full-size epoch"
