"""`--tensorboard`: each epoch's row of metrics.csv as TensorBoard scalars, an epoch written again after a
resume replacing the one an earlier process wrote."""

import csv
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from residual.cli import main
from residual.data.shapes import write_shapes
from residual.train.tensorboard import TensorBoardLog, scalar_tag


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_writes_every_epochs_numbers_as_scalars(tmp_path, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "2", "--batch-size", "16", "--workers", "0",
                 "--tensorboard", "--no-report", "--quiet", "--out", str(tmp_path / "runs"), "--name", "tb"]) == 0
    assert "last.pt, tensorboard/)" in capsys.readouterr().out
    run = tmp_path / "runs" / "tb"
    logged = scalars(run / "tensorboard")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert {"train/loss", "val/top1", "val/loss", "lr", "run/images_per_s"} <= set(logged)
    for column in ("train_loss", "val_top1", "lr"):
        assert [step for step, _ in logged[scalar_tag(column)]] == [1, 2]
        assert [value for _, value in logged[scalar_tag(column)]] == pytest.approx(
            [float(row[column]) for row in rows], rel=1e-5)  # metrics.csv keeps 6 significant digits


def test_an_epoch_written_again_after_a_resume_replaces_the_earlier_one(tmp_path):
    killed = TensorBoardLog(tmp_path)  # wrote epochs 1-3, but its last.pt holds epoch 2 only
    for epoch in (1, 2, 3):
        killed.add_epoch({"epoch": epoch, "val_top1": epoch / 10, "name": "not a number"})
    killed.close()
    resumed = TensorBoardLog(tmp_path)  # runs epoch 3 again, then 4
    for epoch in (3, 4):
        resumed.add_epoch({"epoch": epoch, "val_top1": 0.5 + epoch / 100})
    resumed.close()
    assert scalars(tmp_path)["val/top1"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                             (3, pytest.approx(0.53)), (4, pytest.approx(0.54))]


def test_without_the_tensorboard_package_the_flag_is_a_one_line_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--tensorboard", "--quiet",
                 "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard: TensorBoard's event files are written by the tensorboard package" in err
    assert err.count("\n") == 1 and not any((tmp_path / "runs").glob("*/config.yaml"))  # no half-made run
