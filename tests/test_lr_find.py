"""The learning-rate range test."""

import numpy as np
import pytest
import yaml

from residual.cli import main
from residual.errors import ConfigError
from residual.data.shapes import write_shapes
from residual.train import TrainConfig
from residual.train.lr_find import lr_find, suggest
from steps import imbalanced_shapes


def test_suggestion_is_a_tenth_of_the_rate_at_the_lowest_loss():
    lrs = list(np.logspace(-5, 1, 61))
    # Loss flat, falling fastest around 1e-2, bottoming at 1e-1, then exploding.
    losses = [2.0 - 1.5 / (1 + np.exp(-3 * (np.log10(lr) + 2))) + (5 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    noisy_start = [3.0, 2.0] + losses[2:]  # an early dip must not decide
    assert suggest(lrs, noisy_start) == pytest.approx(1e-2, rel=0.3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("lr"), size=16, per_class=20, seed=1, progress=False)


def test_range_test_sweeps_up_and_stops_when_the_loss_explodes(data, tmp_path):
    config = TrainConfig(data=str(data), model="resnet20", batch_size=16, quiet=True, out=str(tmp_path / "runs"),
                         tensorboard=True)  # as `train --lr auto --tensorboard` asks for it: the sweep is no run
    result = lr_find(config, start_lr=1e-5, end_lr=100.0, steps=60)
    assert 3 <= len(result.lrs) <= 60 and result.lrs == sorted(result.lrs)
    assert result.lrs[0] == pytest.approx(1e-5)
    assert 1e-5 <= result.suggestion <= 100.0 and result.plot.is_file()
    assert sorted(path.name for path in result.plot.parent.iterdir()) == ["lr_find.png"]
    assert result.plot.parent.parent == tmp_path / "lr-find"


def test_with_accumulation_the_rate_grows_once_per_optimizer_step_over_the_whole_range(data, tmp_path):
    # Six optimizer steps of four batches. The schedule counted batches while the rate changes per optimizer
    # step, so with --accumulate 4 the sweep ended at 4.5e-5 instead of 1e-2 (and, on 1e-5 to 100, suggested
    # 3.5e-6, below the range's start).
    config = TrainConfig(data=str(data), model="resnet20", batch_size=16, accumulate=4, quiet=True,
                         out=str(tmp_path / "runs"))
    result = lr_find(config, start_lr=1e-5, end_lr=1e-2, steps=24)
    assert len(result.lrs) == 24
    assert result.lrs[:4] == pytest.approx([1e-5] * 4) and result.lrs[-4:] == pytest.approx([1e-2] * 4)
    with pytest.raises(ConfigError, match="--steps of 8 or more"):
        lr_find(config, steps=4)


def test_a_batch_of_unreadable_files_adds_no_point_to_the_curve(tmp_path):
    # Batches of one image, one of them unreadable: that batch still steps (empty, so that batches keep their
    # positions), but its loss of 0 says nothing about the rate and must not pull the curve down.
    data = imbalanced_shapes(tmp_path / "data")
    (data / "train" / "star" / "broken.png").write_bytes(b"not a png")  # 16 files, 15 images
    config = TrainConfig(data=str(data), model="resnet20", batch_size=1, in_memory=False, workers=0, quiet=True,
                         out=str(tmp_path / "runs"))
    result = lr_find(config, start_lr=1e-5, end_lr=1e-4, steps=16)
    assert len(result.lrs) == 15


def test_lr_find_command_and_lr_auto(data, tmp_path, capsys):
    common = ["--model", "resnet20", "--batch-size", "16", "--quiet", "--out", str(tmp_path / "runs")]
    assert main(["lr-find", str(data), "--steps", "30", "--epochs", "40", "--schedule", "step", *common]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: --epochs, --schedule do not apply to the range test" in out
    assert "suggested learning rate" in out
    assert f"curve:{tmp_path / 'runs' / 'resnet20' / 'lr_find.png'}" in "".join(out.split())  # rich folds long lines
    assert main(["train", str(data), "--lr", "auto", "--epochs", "1", "--name", "auto", "--no-report",
                 *common]) == 0
    out = capsys.readouterr().out
    assert f"curve:{tmp_path / 'lr-find' / 'auto' / 'lr_find.png'}" in "".join(out.split())  # beside the runs
    chosen = float(out.split("--lr auto: training at ")[1].split()[0])
    config = yaml.safe_load((tmp_path / "runs" / "auto" / "config.yaml").read_text())
    assert config["optim"]["lr"] == pytest.approx(chosen, rel=1e-2)
    source = tmp_path / "runs" / "auto" / "model.safetensors"
    assert main(["lr-find", str(data), "--from", str(source), "--model", "resnet56", "--out", str(tmp_path)]) == 2
    assert f"--model resnet56: --from {source} holds a resnet20" in capsys.readouterr().err  # resnet20 was swept
    assert main(["lr-find", str(data), "--from", str(source), "--stem", "imagenet",
                 "--out", str(tmp_path / "misfit")]) == 2
    assert "does not fit resnet20" in capsys.readouterr().err
    assert not list((tmp_path / "misfit").iterdir())  # no run folder left empty
