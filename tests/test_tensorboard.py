"""`--tensorboard`: each epoch's row of metrics.csv as TensorBoard scalars, an epoch written again after a
resume replacing the one an earlier process wrote."""

import csv
import json
import sys
import time

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from residual.cli import main
from residual.data.shapes import write_shapes
from residual.train.tensorboard import TensorBoardLog, scalar_tag


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_writes_every_epochs_numbers_its_recipe_pictures_and_hyperparameters(tmp_path, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "2", "--batch-size", "16", "--workers", "0",
                 "--lr", "0.05", "--tensorboard", "--quiet", "--out", str(tmp_path / "runs"), "--name", "tb"]) == 0
    assert "report.html, tensorboard/)" in capsys.readouterr().out
    run = tmp_path / "runs" / "tb"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    logged = scalars(run / "tensorboard")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert {"train/loss", "val/top1", "val/loss", "lr", "run/images_per_s"} <= set(logged)
    for column in ("train_loss", "val_top1", "lr"):
        assert [step for step, _ in logged[scalar_tag(column)]] == [1, 2]
        assert [value for _, value in logged[scalar_tag(column)]] == pytest.approx(
            [float(row[column]) for row in rows], rel=1e-5)  # metrics.csv keeps 6 significant digits
    # the pictures the run drew, but the curves (already scalars), each at the last epoch
    pictures = {path.stem for path in run.glob("*.png")} - {"curves"}
    assert {"train_batch", "confusion_matrix"} <= pictures
    assert set(events.Tags()["images"]) == {f"pictures/{name}" for name in pictures}
    batch = events.Images("pictures/train_batch")
    assert [image.step for image in batch] == [2]
    assert (batch[0].width, batch[0].height) == Image.open(run / "train_batch.png").size
    recipe = events.Tensors("config/text_summary")
    assert [event.step for event in recipe] == [0]
    assert "model: resnet20" in recipe[0].tensor_proto.string_val[0].decode()
    # the HParams dashboard: every setting the recipe has, and the best epoch's validation numbers
    session = hparams_session(run / "tensorboard" / "hparams")
    assert session["model"].string_value == "resnet20" and session["optim.lr"].number_value == 0.05
    assert session["augment.hflip"].number_value == 1 and "teacher" not in session  # a bool as 1, unset left out
    summary = json.loads((run / "summary.json").read_text())
    best = scalars(run / "tensorboard" / "hparams")
    assert best["best/val_top1"][0][1] == pytest.approx(summary["best"]["val_top1"])
    assert best["best/epoch"][0][1] == summary["best_epoch"]


def test_every_optimizer_step_writes_its_loss_and_rate(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)  # 40 training images
    common = ["train", str(data), "--model", "resnet20", "--epochs", "3", "--workers", "0", "--lr", "0.05",
              "--tensorboard", "--quiet", "--no-report", "--out", str(tmp_path / "runs")]
    # One step an epoch: the step's loss is the epoch's.
    assert main(common + ["--batch-size", "64", "--name", "one"]) == 0
    run = tmp_path / "runs" / "one"
    epochs, steps = scalars(run / "tensorboard"), scalars(run / "tensorboard" / "steps")
    assert set(steps) == {"step/train_loss", "step/lr"}
    assert steps["step/train_loss"] == [(step, pytest.approx(value, rel=1e-5))
                                        for step, value in epochs["train/loss"]]
    assert [lr for _, lr in steps["step/lr"]] == pytest.approx([0.05, 0.0375, 0.0125])  # cosine, at each step
    # Four micro-batches of 8 (and 8) to a step: 40 images -> steps of 32 and 8, two an epoch, each written once.
    assert main(common + ["--batch-size", "8", "--accumulate", "4", "--name", "accumulated"]) == 0
    steps = scalars(tmp_path / "runs" / "accumulated" / "tensorboard" / "steps")
    assert [step for step, _ in steps["step/train_loss"]] == [1, 2, 3, 4, 5, 6]


def test_steps_written_again_after_a_resume_replace_the_earlier_ones(tmp_path):
    killed = TensorBoardLog(tmp_path)  # wrote steps 1-5, but its last.pt holds step 3
    killed.add_steps([(step, 1.0, 0.1) for step in range(1, 6)])
    killed.close()
    a_later_process()
    resumed = TensorBoardLog(tmp_path)
    resumed.add_steps([(4, 2.0, 0.05), (5, 2.0, 0.05)])
    resumed.add_steps([(6, 2.0, 0.05)])
    resumed.close()
    assert scalars(tmp_path / "steps")["step/train_loss"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0),
                                                             (6, 2.0)]


def hparams_session(folder) -> dict:
    """The hyperparameters a run gave the HParams dashboard: name -> protobuf Value."""
    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(HParamsPluginData.FromString(content).session_start_info.hparams)


def a_later_process():
    """Event files are read in the order of their names: the second, then a counter of the process's writers.
    Two made in one second by one process sort wrongly once the counter passes 9 (...123.10 before ...123.9);
    a resumed run is a later process."""
    time.sleep(1.1)


def test_an_epoch_written_again_after_a_resume_replaces_the_earlier_one(tmp_path):
    killed = TensorBoardLog(tmp_path)  # wrote epochs 1-3, but its last.pt holds epoch 2 only
    for epoch in (1, 2, 3):
        killed.add_epoch({"epoch": epoch, "val_top1": epoch / 10, "name": "not a number"})
    killed.close()
    a_later_process()
    resumed = TensorBoardLog(tmp_path)  # runs epoch 3 again, then 4
    for epoch in (3, 4):
        resumed.add_epoch({"epoch": epoch, "val_top1": 0.5 + epoch / 100})
    resumed.finish({"optim": {"lr": 0.1}}, {"val_top1": 0.54}, 4, [], 4)
    resumed.close()
    a_later_process()
    again = TensorBoardLog(tmp_path, "model: resnet20")  # resumed once more, at its end: a new last epoch
    again.add_epoch({"epoch": 5, "val_top1": 0.6})
    again.finish({"optim": {"lr": 0.2}}, {"val_top1": 0.6}, 5, [], 5)
    again.close()
    assert len(list((tmp_path / "hparams").iterdir())) == 1  # the dashboard sees one session, the last
    assert hparams_session(tmp_path / "hparams")["optim.lr"].number_value == 0.2
    assert scalars(tmp_path)["val/top1"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                             (3, pytest.approx(0.53)), (4, pytest.approx(0.54)),
                                             (5, pytest.approx(0.6))]


def test_without_the_tensorboard_package_the_flag_is_a_one_line_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--tensorboard", "--quiet",
                 "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard: TensorBoard's event files are written by the tensorboard package" in err
    assert err.count("\n") == 1 and not any((tmp_path / "runs").glob("*/config.yaml"))  # no half-made run
