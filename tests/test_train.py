"""The training engine: what a run leaves, resume after a real kill, signals, NaN, EMA, accumulation."""

import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import residual
from residual.data.datasets import open_dataset
from residual.data.loaders import epoch_order
from residual.data.shapes import write_shapes
from residual.data.transforms import AugmentConfig, build_augment, normalize, soft_targets
from residual.models import build_model
from residual.train import TrainConfig, TrainingError, load_config, train
from residual.train.checkpoint import load_checkpoint, save_checkpoint
from residual.train.config import (FEW_IMAGES, auto_batch_size, auto_gentle_crops, auto_lr_batch, auto_warmup_epochs,
                                   chosen_automatically, resolve)
from residual.train.ema import WeightEMA
from residual.train.loss import consistency_sum
from residual.train.optim import OptimConfig, lr_factor
from residual.train.preview import target_title, write_batch_preview
from residual.train import trainer as trainer_module
from residual.train.trainer import Trainer, prepare_run
from payloads import RunsAShellCommand
from steps import distance, imbalanced_shapes

QUICK = dict(model="resnet20", batch_size=32, optim=OptimConfig(lr=0.05), quiet=True,
             report=False)  # the one test that checks the report turns it on


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes16"), size=16, per_class=24, seed=1, progress=False)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_a_run_leaves_everything_design_promises(shapes16, tmp_path):
    result = train(TrainConfig(data=str(shapes16), epochs=2, out=str(tmp_path), name="run",
                               **(QUICK | {"report": True})))
    run = tmp_path / "run"
    assert result.run_dir == run
    for name in ("config.yaml", "metrics.csv", "curves.png", "model.safetensors", "last.pt", "summary.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr",
                            "images_per_s", "epoch_seconds"}
    assert Image.open(run / "curves.png").size[0] > 800
    assert Image.open(run / "train_batch.png").size[0] > 600  # 16 of the first batch's augmented images
    config = load_config(run / "config.yaml")
    assert config.image_size == 16 and config.optim.lr == 0.05 and config.augment.preset == "cifar"
    assert config.augment.pad_crop == 2, "config.yaml holds the resolved knobs"
    model = residual.load_model(run / "model.safetensors")
    assert model.class_names == sorted(residual.data.shapes.SHAPE_CLASSES)
    assert model.preprocessing.input_size == 16 and model.preprocessing.mean != (0.485, 0.456, 0.406)
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["batch"] == 0 and len(state["history"]) == 2
    assert residual.read_metadata(run / "model.safetensors")["extra"]["epoch"] == result.best_epoch
    # The validation report of the best model, as `residual eval` writes it.
    for name in ("report.html", "metrics.json", "confusion_matrix.png", "reliability.png", "highest_loss.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "metrics.json").read_text())
    assert report["split"] == "val" and report["images"] == 100  # 10 per class
    assert report["top1"] == pytest.approx(result.best["val_top1"], abs=1.5 / 100)  # the same model, same images
    # A second run never overwrites the first.
    again = train(TrainConfig(data=str(shapes16), epochs=1, out=str(tmp_path), name="run", **QUICK))
    assert again.run_dir.name == "run-2"


def test_the_first_batch_preview_shows_the_augmented_mixed_images_and_draws_no_random_number(tmp_path):
    """train_batch.png is drawn with random streams of its own: the run's draws are the ones it makes without it."""
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(20) % 4
    augment = build_augment(AugmentConfig(preset="strong"), 16, 16)
    state = torch.get_rng_state()
    write_batch_preview(images, labels, augment, 0.4, 0.0, ["a", "b", "c", "d"], tmp_path / "train_batch.png")
    assert torch.equal(torch.get_rng_state(), state)
    assert Image.open(tmp_path / "train_batch.png").size[0] > 600
    assert target_title(torch.tensor(2), ["a", "b", "c"]) == "c"
    assert target_title(torch.tensor([0.7, 0.0, 0.3]), ["a", "b", "c"]) == "a 0.70 + c 0.30"
    assert target_title(soft_targets(torch.tensor([1]), 3, 0.0)[0], ["a", "b", "c"]) == "b 1.00"


def test_config_yaml_repeats_the_run(shapes16, tmp_path, monkeypatch):
    fit, during = trainer_module.Trainer.fit, []
    benchmark, workspace = torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda self: during.append(
        (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)) or fit(self))
    first = train(TrainConfig(data=str(shapes16), epochs=1, out=str(tmp_path), name="a", deterministic=True,
                              **QUICK))
    # Deterministic kernels for the run only: whatever the process runs next gets its own choice back.
    assert during == [(True, False)]
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark == benchmark
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == workspace
    config = load_config(first.run_dir / "config.yaml")
    second = train(TrainConfig.from_dict({**config.to_dict(), "name": "b"}))
    for key, value in _weights(first.run_dir / "last.pt").items():
        assert torch.equal(value, _weights(second.run_dir / "last.pt")[key]), key


def test_the_automatic_batch_gives_a_small_training_set_enough_steps_an_epoch(tmp_path):
    # 128 images, halved down to 32 while an epoch would be under 64 optimizer steps: on 3,000 images thirty
    # epochs of 128 underfit where batches of 32 learned more in the same epochs (docs/training.md).
    sizes = (100, 4_095, 4_096, 8_191, 8_192, 1_281_167)
    assert [auto_batch_size(count) for count in sizes] == [32, 32, 64, 64, 128, 128]
    assert auto_batch_size(4_096, accumulate=2) == 32  # optimizer steps: each takes two batches
    assert auto_batch_size(8_192, processes=3) == 129  # the global batch divides among the workers
    data = write_shapes(tmp_path / "shapes", size=16, per_class=2, seed=0, progress=False)
    dataset = open_dataset(str(data), None, 0)
    given = TrainConfig(data=str(data), out=str(tmp_path / "runs"), name="auto")
    resolved = resolve(given, dataset)
    assert resolved.batch_size == 32 and resolved.optim.lr == pytest.approx(0.1)  # batch 128's rate: see below
    assert resolve(given, dataset, processes=3).batch_size == 33
    assert resolve(dataclasses.replace(given, batch_size=128), dataset).batch_size == 128  # a given one is kept
    path = prepare_run(given, 1, Console(quiet=True)) / "config.yaml"
    written = yaml.safe_load(path.read_text())
    assert written["batch_size"] == 32 and written["auto"]["batch_size"] == 32


def test_a_halved_automatic_batch_keeps_the_rate_of_128_where_the_rate_warms_up(tmp_path):
    # On 3,000 images, thirty epochs at the halved batch (32) with a warm-up: 90.2% at batch 128's rate against
    # 71.2% at the rate scaled down with the batch; without a warm-up the higher rate did worse (docs/training.md).
    data = write_shapes(tmp_path / "shapes", size=16, per_class=2, seed=0, progress=False)
    dataset = open_dataset(str(data), None, 0)
    given = TrainConfig(data=str(data))

    def lr(**changes):
        optim = OptimConfig(**changes.pop("optim", {}))
        return resolve(dataclasses.replace(given, optim=optim, **changes), dataset).optim.lr

    assert lr() == pytest.approx(0.1) and lr(optim={"schedule": "onecycle"}) == pytest.approx(0.1)
    assert lr(optim={"schedule": "step", "warmup_epochs": 2}) == pytest.approx(0.1)  # any warm-up
    assert lr(optim={"optimizer": "adam"}) == pytest.approx(1e-3)
    assert lr(accumulate=2) == pytest.approx(0.2)  # the batch it was halved from: 128 images, twice a step
    # Scaled with the batch as before: without a warm-up, at a given batch, and when fine-tuning.
    assert lr(optim={"schedule": "step"}) == pytest.approx(0.1 * 32 / 128)
    assert lr(optim={"warmup_epochs": 0}) == pytest.approx(0.1 * 32 / 128)
    assert lr(batch_size=32) == pytest.approx(0.1 * 32 / 128) and lr(batch_size=256) == pytest.approx(0.2)
    assert auto_lr_batch(dataclasses.replace(given, pretrained="resnet50.tv2_in1k"), 32, 0.0) == 32
    assert auto_lr_batch(dataclasses.replace(given, pretrained="resnet50.tv2_in1k"), 32, 5.0) == 32
    assert auto_lr_batch(given, 32, 5.0) == 128 and auto_lr_batch(given, 128, 5.0) == 128


def test_few_images_from_scratch_get_random_resized_crops_of_at_least_035_of_the_image(tmp_path):
    data = write_shapes(tmp_path / "shapes", size=72, per_class=1, seed=0, progress=False)
    dataset = open_dataset(str(data), None, 0)
    given = TrainConfig(data=str(data))

    def crop_scale(augment):
        return resolve(dataclasses.replace(given, augment=augment), dataset).augment.crop_scale

    resolved = resolve(given, dataset)
    assert resolved.augment.crop_scale == 0.35 and resolved.image_size == 128
    assert chosen_automatically(given, resolved)["augment.crop_scale"] == 0.35
    assert crop_scale(AugmentConfig(preset="strong")) == 0.35
    assert crop_scale(AugmentConfig(crop_scale=0.08)) == 0.08  # a given crop scale is kept
    assert crop_scale(AugmentConfig(preset="cifar")) == 0.0  # a preset without random-resized crops
    assert auto_gentle_crops(given, FEW_IMAGES - 1) and not auto_gentle_crops(given, FEW_IMAGES)  # ImageNet's 0.08
    assert not auto_gentle_crops(dataclasses.replace(given, pretrained="resnet50.tv2_in1k"), 3_000)  # fine-tuning


def test_a_from_scratch_cosine_run_warms_up_unless_told_otherwise(tmp_path):
    # Five epochs of linear warm-up, at most a sixth of the run: on 3,000 images thirty epochs reached 71.2% with
    # it against 52.5% without (docs/training.md).
    data = write_shapes(tmp_path / "shapes", size=16, per_class=2, seed=0, progress=False)
    dataset = open_dataset(str(data), None, 0)
    given = TrainConfig(data=str(data))
    resolved = resolve(given, dataset)
    assert resolved.optim.warmup_epochs == 5 and chosen_automatically(given, resolved)["optim.warmup_epochs"] == 5
    assert resolve(dataclasses.replace(given, epochs=12), dataset).optim.warmup_epochs == pytest.approx(2)
    for asked in (0.0, 1.5):  # a given warm-up is kept, none included
        optim = OptimConfig(warmup_epochs=asked)
        assert resolve(dataclasses.replace(given, optim=optim), dataset).optim.warmup_epochs == asked
    # One-cycle warms up by itself; the other schedules are the recipes', which name their warm-up.
    for schedule in ("step", "multistep", "exponential", "onecycle", "constant", "plateau"):
        optim = OptimConfig(schedule=schedule)
        assert resolve(dataclasses.replace(given, optim=optim), dataset).optim.warmup_epochs == 0, schedule
    assert auto_warmup_epochs(dataclasses.replace(given, pretrained="resnet50.tv2_in1k"), 30) == 0  # fine-tuning
    assert lr_factor(0, OptimConfig(lr=1.0), 10, 100) == 1.0  # an OptimConfig used outside training: no warm-up
    assert lr_factor(0, resolved.optim, 10, 300) == pytest.approx(1 / 50)  # the first of 5 epochs' 50 steps


def test_a_run_config_chooses_again_what_its_run_chose_automatically(shapes16, tmp_path, capsys):
    from residual.cli import _train_config, build_parser, main

    dataset = open_dataset(str(shapes16), None, 0)
    given = TrainConfig(data=str(shapes16), epochs=1, batch_size=32, out=str(tmp_path), name="sgd")
    path = prepare_run(given, 1, Console(quiet=True)) / "config.yaml"
    ran = resolve(given, dataset)
    assert load_config(path) == ran  # the run as it ran
    assert yaml.safe_load(path.read_text())["auto"] == {
        "model": "resnet20", "layer_lr_decay": 1.0, "image_size": 16, "optim.lr": 0.025, "optim.weight_decay": 5e-4,
        "augment.preset": "cifar", "augment.hflip": True, "augment.pad_crop": 2, "augment.crop_scale": 0.0,
        "augment.rotation": 0.0, "augment.shift": 0.0, "augment.brightness": 0.0, "augment.contrast": 0.0,
        "augment.random_erasing": 0.0, "compile": False, "loss": "ce", "monitor": "val_top1",
        "optim.warmup_epochs": 1 / 6}  # a sixth of the one epoch

    def from_config(*flags):
        return resolve(_train_config(build_parser().parse_args(["train", "--config", str(path), *flags])), dataset)

    assert from_config() == ran  # chosen again from the same data and flags: the same run
    # A changed flag gets what it would have got from scratch, not the first run's choices for SGD and cifar.
    adam = from_config("--optimizer", "adam")
    assert (adam.optim.lr, adam.optim.weight_decay) == (1e-3 * 32 / 128, 5e-4)
    assert from_config("--batch-size", "64").optim.lr == 0.05
    assert from_config("--schedule", "step").optim.warmup_epochs == 0  # the cosine schedule's warm-up goes with it
    assert from_config("--augment", "strong").augment == AugmentConfig(preset="strong").resolved(16)
    assert from_config("--auto-augment", "randaugment").augment.randaugment_ops == 2
    # What the user set stays set, whether by a flag or by editing the file.
    assert from_config("--optimizer", "adam", "--lr", "0.3").optim.lr == 0.3
    options = yaml.safe_load(path.read_text())
    options["optim"]["lr"] = 0.07
    path.write_text(yaml.safe_dump(options))
    assert from_config("--optimizer", "adam").optim.lr == 0.07
    # A file without the record is taken as it stands.
    del options["auto"]
    path.write_text(yaml.safe_dump(options))
    assert from_config("--augment", "strong").augment.rotation == 0.0

    # A clash with a setting the file gave is named as coming from it.
    given = TrainConfig(data=str(shapes16), epochs=1, out=str(tmp_path), name="bce", loss="bce",
                        bce_target_threshold=0.2)
    path = prepare_run(given, 1, Console(quiet=True)) / "config.yaml"
    assert main(["train", "--config", str(path), "--loss", "ce"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --bce-target-threshold goes with --loss bce") and err.count("\n") == 1
    assert f"(settings in --config {path} count as given: edit it there, or give the flag another value)" in err


def test_a_config_file_that_cannot_be_used_is_a_one_line_error(tmp_path, capsys):
    from residual.cli import main

    cases = {"broken.yaml": ("a: [\n", "broken.yaml: not valid YAML at line 2"),  # each was a traceback
             "list.yaml": ("- 1\n", "list.yaml: a config file maps training options to values"),
             "options.yaml": ("data: d\noptim:\n  lr_max: 1\n", "unknown optim option(s) ['lr_max']"),
             "nodata.yaml": ("epochs: 3\n", "give the dataset folder (residual train DATA), or --config with data:"),
             # A value of the wrong type failed deep in the run ("'<' not supported between 'str' and 'int'"):
             "words.yaml": ("data: d\nepochs: lots\n", "error: epochs: 'lots' is not a whole number (settings in"),
             "half.yaml": ("data: d\nepochs: 2.5\n", "error: epochs: 2.5 is not a whole number"),
             "null.yaml": ("data: d\nlabel_smoothing:\n", "error: label_smoothing: null is not a number"),
             "flag.yaml": ("data: d\namp: 1\n", "error: amp: 1 is not true or false"),
             "rate.yaml": ("data: d\noptim:\n  lr: fast\n", "error: optim.lr: 'fast' is not a number")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["train", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def _cli(*args):
    return [sys.executable, "-m", "residual", "train", *map(str, args)]


def _wait_for_checkpoint(path, process, condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return None
        if path.is_file():
            state = torch.load(path, weights_only=True)
            if condition(state):
                return state
        time.sleep(0.02)
    return None


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=40, seed=2, progress=False)
    teacher = residual.create_model("resnet20", num_classes=10)
    teacher.class_names = sorted(path.name for path in (data / "train").iterdir())
    residual.save_model(teacher, tmp_path / "teacher.safetensors")  # its terms are summed across the kill too
    common = ["--model", "resnet20", "--epochs", "3", "--batch-size", "16", "--checkpoint-every", "3",
              "--deterministic", "--quiet", "--augment", "cifar", "--ema", "0.9", "--drop-path", "0.2", "--no-report",
              "--teacher", tmp_path / "teacher.safetensors",
              "--out", tmp_path]  # every source of randomness a step draws from
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(_cli(data, *common, "--name", "straight"), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    process = subprocess.Popen(_cli(data, *common, "--name", "killed"), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    last = tmp_path / "killed" / "last.pt"
    state = _wait_for_checkpoint(last, process, lambda s: s["epoch"] == 1 and s["batch"] > 0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state is not None, "the run finished before it could be killed mid-epoch"
    assert process.returncode == -signal.SIGKILL

    resumed = subprocess.run(_cli("--resume", tmp_path / "killed"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    straight, again = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(last)
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], again["model"][key]), key
    for key in straight["ema"]:
        assert torch.equal(straight["ema"][key], again["ema"][key]), key
    assert [r["val_top1"] for r in straight["history"]] == [r["val_top1"] for r in again["history"]]
    for column in ("train_loss", "train_label_loss", "train_distill_loss"):  # the killed epoch's sums carried on
        assert [r[column] for r in straight["history"]] == pytest.approx([r[column] for r in again["history"]],
                                                                         rel=1e-6), column
    best_straight = residual.load_model(tmp_path / "straight" / "model.safetensors").state_dict()
    best_resumed = residual.load_model(last.with_name("model.safetensors")).state_dict()
    assert all(torch.equal(best_straight[k], best_resumed[k]) for k in best_straight)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=40, seed=2, progress=False)
    process = subprocess.Popen(_cli(data, "--model", "resnet20", "--epochs", "50", "--batch-size", "16",
                                    "--checkpoint-every", "2", "--quiet", "--out", tmp_path, "--name", "t"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = _wait_for_checkpoint(tmp_path / "t" / "last.pt", process, lambda s: s["step"] >= 4)
    assert state is not None
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "stopped by SIGTERM" in err and "--resume" in err
    saved = torch.load(tmp_path / "t" / "last.pt", weights_only=True)
    assert saved["step"] > state["step"] - 1 and saved["epoch"] < 50


def test_a_full_disk_keeps_the_last_checkpoint_and_the_run_resumes_once_there_is_room(shapes16, tmp_path):
    # A real full file system: a small tmpfs in a mount namespace of the test's own (tests/full_disk.py fills it
    # just before the second checkpoint). torch.save reported it only as "unexpected pos", with a traceback.
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (a mount namespace) to give the run a small file system of its own")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=16m tmpfs "$1" && exec "$2" "$3" "$1" "$4"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", disk, sys.executable,
                           Path(__file__).with_name("full_disk.py"), shapes16],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.splitlines()[-1])
    run = disk / "runs" / "full"
    assert facts["error"] == (f"{run}/last.pt: out of disk space (or quota) writing it (the previous last.pt is "
                              f"kept); free some space and run again, or go on from the last checkpoint: residual "
                              f"train --resume {run}")
    assert facts["kept_sha256"] == facts["previous_sha256"] and facts["kept_epoch"] == 1
    assert facts["leftovers"] == []  # the partial file was removed
    for kind in ("safetensors", "json"):  # a model file and a report: the same error, nothing left half-written
        assert facts[f"{kind}_error"] == (f"{disk}/another.{kind}: out of disk space (or quota) writing it (there was "
                                          f"none before); free some space and run again")
    assert facts["resumed_epochs"] == 2 and facts["final_epoch"] == 2


def test_a_damaged_or_unsafe_last_pt_is_refused_in_one_line_saying_how_to_go_on(shapes16, tmp_path):
    run = train(TrainConfig(data=str(shapes16), epochs=1, out=str(tmp_path), name="r", **QUICK)).run_dir
    last = run / "last.pt"
    whole = last.read_bytes()
    last.write_bytes(whole[:len(whole) // 2])  # a copy cut short
    with pytest.raises(TrainingError) as refused:  # was torch's RuntimeError and its paragraph of advice
        train(resume=run)
    assert str(refused.value) == (f"{last}: not a readable PyTorch checkpoint (PytorchStreamReader failed reading zip "
                                  f"archive: failed finding central directory), so the run cannot go on from it; "
                                  f"start a new run from its best weights: residual train {shapes16} --from "
                                  f"{run / 'model.safetensors'}")
    torch.save({"model": {}, "evil": RunsAShellCommand(tmp_path / "marker")}, last)
    with pytest.raises(residual.weights.UnsafeCheckpointError, match=r"refused: it asks to import \w+\.system"):
        train(resume=run)
    assert not (tmp_path / "marker").exists()


def test_runs_started_at_once_under_one_name_each_get_a_folder_of_their_own(tmp_path):
    # A script that starts runs side by side: checking for the name before making it let two take one name, and
    # the second failed with FileExistsError (49 of 50 rounds of eight threads).
    from residual.runs import new_run_dir

    for round_ in range(10):
        start, made = threading.Barrier(8), []

        def make():
            start.wait()
            made.append(new_run_dir(str(tmp_path / str(round_)), "run"))

        threads = [threading.Thread(target=make) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(path.name for path in made) == sorted(["run"] + [f"run-{i}" for i in range(2, 9)])


def test_a_run_being_trained_is_not_trained_in_by_a_second_process(tmp_path):
    # A resume started twice, or a job requeued while the first still runs, wrote checkpoints between the first's.
    from residual.runs import RunInUseError, run_lock

    data = write_shapes(tmp_path / "data", size=16, per_class=40, seed=2, progress=False)
    process = subprocess.Popen(_cli(data, "--model", "resnet20", "--epochs", "50", "--batch-size", "16",
                                    "--checkpoint-every", "2", "--quiet", "--out", tmp_path, "--name", "busy"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "busy"
    try:
        assert _wait_for_checkpoint(run / "last.pt", process, lambda state: state["step"] >= 2) is not None
        with pytest.raises(RunInUseError) as refused:
            train(resume=run)
        assert str(refused.value) == (f"{run}: process {process.pid} on {socket.gethostname()} is training in it; "
                                      f"let it finish, or stop it and then resume")
    finally:
        process.kill()
        process.communicate(timeout=60)
    with run_lock(run):  # released with its process, however that ended
        pass


def test_non_finite_loss_stops_and_keeps_the_last_good_state(shapes16, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer_module.F.cross_entropy

    def poisoned(logits, targets, **kwargs):
        loss = real(logits, targets, **kwargs)
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] > 10:  # epoch 1 is 8 steps (240 images / 32); poison the 3rd batch of epoch 2
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer_module.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2, batch 3 \(step 11\)"):
        train(TrainConfig(data=str(shapes16), epochs=3, out=str(tmp_path), name="nan", **QUICK))
    run = tmp_path / "nan"
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["batch"] == 0, "the end-of-epoch-1 checkpoint is intact"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    best = residual.load_model(run / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in best.state_dict().values() if v.is_floating_point())
    assert residual.read_metadata(run / "model.safetensors")["extra"]["epoch"] == 1


def test_at_an_equal_top1_the_lower_val_loss_is_kept_but_only_a_higher_top1_resets_early_stopping(tmp_path):
    # A fine-tuning run on three classes reached 100% validation top-1 in its first epoch, at val loss 0.73,
    # and kept that epoch's model over the last one's at 0.27.
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    dataset = open_dataset(data)
    config = TrainConfig(data=str(data), early_stopping=2, out=str(tmp_path), **QUICK)
    trainer = Trainer(resolve(config, dataset), dataset, tmp_path / "run", Console(quiet=True))
    (tmp_path / "run").mkdir()
    trained = {"train_loss": 1.0, "train_acc": 0.5, "images_per_s": 1.0, "epoch_seconds": 1.0}
    kept = []
    for top1, loss in [(1.0, 0.73), (1.0, 0.27), (1.0, 0.5), (0.9, 0.1)]:
        trainer._end_epoch(trained, {"val_loss": loss, "val_top1": top1, "val_top5": 1.0})
        kept.append((trainer.best_epoch, trainer.epochs_since_best, trainer.stopped_early))
    assert kept == [(1, 0, False), (2, 1, False), (2, 2, True), (2, 3, True)]
    assert residual.read_metadata(tmp_path / "run" / "model.safetensors")["extra"]["val_loss"] == 0.27


@pytest.mark.parametrize("in_memory", [True, False])
def test_repeated_augmentation_trains_each_drawn_image_several_times_per_batch_augmented_anew(tmp_path, in_memory):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    dataset = open_dataset(data)
    config = TrainConfig(data=str(data), aug_repeats=3, in_memory=in_memory, workers=0, out=str(tmp_path), **QUICK)
    trainer = Trainer(resolve(config, dataset), dataset, tmp_path / "run", Console(quiet=True))
    images, labels = next(trainer.train_loader.epoch(0))
    assert len(labels) == 32 and torch.equal(labels[0:30:3], labels[1:30:3]) and torch.equal(images[0::3][:10],
                                                                                               images[2::3][:10])
    augmented = trainer.augment(images.float() / 255)
    differ = [not torch.equal(augmented[first], augmented[first + 1]) for first in range(0, 30, 3)]
    assert sum(differ) >= 5, "each copy gets its own crop and flip (one in 50 pairs draws the same)"


@pytest.mark.parametrize("in_memory", [True, False])
def test_validation_and_the_saved_model_take_the_eval_image_size_while_training_crops_the_image_size(tmp_path,
                                                                                                   in_memory):
    """--eval-image-size (FixRes; torchvision's --val-crop-size): training's random crops stay at --image-size,
    validation and the model file's preprocessing take the larger size, its resize in the same ratio."""
    data = write_shapes(tmp_path / "data", size=96, per_class=2, seed=0, progress=False)
    dataset = open_dataset(data)
    config = TrainConfig(data=str(data), model="resnet18", image_size=72, eval_image_size=96, in_memory=in_memory,
                         workers=0, batch_size=4, quiet=True, out=str(tmp_path))
    trainer = Trainer(resolve(config, dataset), dataset, tmp_path / "run", Console(quiet=True))
    assert trainer.model.preprocessing.input_size == 96
    assert trainer.model.preprocessing.resize_size == round(96 / 0.875) == 110
    images, _ = next(trainer.train_loader.epoch(0))
    assert images.shape[-1] == round(72 / 0.875) and trainer.augment(images.float() / 255).shape[-1] == 72
    images, _ = next(trainer.val_loader.epoch(0))
    assert images.shape[-1] == 96


def test_a_run_at_another_eval_image_size_saves_a_model_that_takes_it(tmp_path, capsys):
    from residual.cli import main

    data = write_shapes(tmp_path / "data", size=24, per_class=6, seed=0, progress=False)
    assert main(["train", str(data), "--model", "resnet20", "--image-size", "16", "--eval-image-size", "24",
                 "--epochs", "1", "--batch-size", "32", "--quiet", "--out", str(tmp_path), "--name", "fixres"]) == 0
    model = residual.load_model(tmp_path / "fixres" / "model.safetensors")
    assert (model.preprocessing.input_size, model.preprocessing.resize_size) == (24, 24)
    assert yaml.safe_load((tmp_path / "fixres" / "config.yaml").read_text())["eval_image_size"] == 24
    assert main(["train", str(data), "--eval-image-size", "0"]) == 2
    assert "--eval-image-size must be at least 1, got 0" in capsys.readouterr().err


def test_epoch_end_ends_a_run_after_its_checkpoint_and_says_why(shapes16, tmp_path):
    seen = []

    def epoch_end(row):
        seen.append(row["epoch"])
        return "enough" if row["epoch"] == 2 else None

    result = train(TrainConfig(data=str(shapes16), epochs=5, out=str(tmp_path), name="run", **QUICK),
                   epoch_end=epoch_end)  # how residual tune prunes a trial
    assert seen == [1, 2] and len(result.history) == 2 and result.stopped_by == "enough"
    assert json.loads((result.run_dir / "summary.json").read_text())["stopped_by"] == "enough"
    assert (result.run_dir / "metrics.csv").read_text().count("\n") == 3  # header and two epochs


def test_early_stopping(shapes16, tmp_path):
    result = train(TrainConfig(data=str(shapes16), epochs=8, early_stopping=2, monitor="val_loss", out=str(tmp_path),
                               name="es", model="resnet20", batch_size=32, quiet=True, report=False,
                               optim=OptimConfig(lr=1e-12, schedule="constant")))
    assert result.stopped_early and len(result.history) < 8
    assert json.loads((result.run_dir / "summary.json").read_text())["stopped_early"]
    # A run that stopped early has finished: resuming it trained one more epoch before stopping again.
    log = io.StringIO()
    again = train(resume=result.run_dir, console=Console(file=log, width=300))
    assert again.history == result.history and again.stopped_early
    assert f"{result.run_dir} has finished (stopped early at epoch {len(result.history)})" in log.getvalue()


def test_a_resume_checks_it_has_the_data_the_run_started_with(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=8, seed=3, progress=False)
    run = train(TrainConfig(data=str(data), epochs=2, out=str(tmp_path), name="run", **QUICK)).run_dir
    state = load_checkpoint(run / "last.pt")
    state["epoch"] = 1  # as if stopped after the first epoch
    save_checkpoint(state, run / "last.pt")
    (data / "train" / "star" / "00000.png").rename(data / "train" / "star" / "renamed.png")
    log = io.StringIO()
    train(resume=run, console=Console(file=log, width=300))
    assert (f"warning: {data}: the training split is not the one {run} started with (80 images then, 80 now)"
            in log.getvalue()), "another training split can go on, but the log says so"
    save_checkpoint(state, run / "last.pt")
    for split in ("train", "val", "test"):
        shutil.rmtree(data / split / "star")
    with pytest.raises(TrainingError, match=r"its classes are not the ones .* started with \(missing star\); .* "
                                            r"residual finetune --from .*model.safetensors"):
        train(resume=run)  # the head has one output per class: refused before loading the weights


def test_curves_are_drawn_once_the_interval_has_passed_since_the_start_or_the_last_drawing_and_at_the_end(
        shapes16, tmp_path, monkeypatch):
    drawn = []
    real = trainer_module.plot_curves

    def counted(history, path, title):
        drawn.append(len(history))
        real(history, path, title)

    monkeypatch.setattr(trainer_module, "plot_curves", counted)
    monkeypatch.setattr(trainer_module, "CURVES_EVERY_S", 3600.0)
    train(TrainConfig(data=str(shapes16), epochs=3, out=str(tmp_path), name="curves", **QUICK))
    assert drawn == [3], "only the end: the interval has not passed since the start"
    assert Image.open(tmp_path / "curves" / "curves.png").size[0] > 800
    drawn.clear()
    monkeypatch.setattr(trainer_module, "CURVES_EVERY_S", 0.0)
    train(TrainConfig(data=str(shapes16), epochs=2, out=str(tmp_path), name="every", **QUICK))
    assert drawn == [1, 2], "every epoch, and the end's drawing is not made twice"


def test_ema_model_is_what_gets_saved(shapes16, tmp_path):
    result = train(TrainConfig(data=str(shapes16), epochs=1, ema=0.5, out=str(tmp_path), name="ema", **QUICK))
    state = torch.load(result.run_dir / "last.pt", weights_only=True)
    saved = residual.load_model(result.model_path).state_dict()
    assert int(state["ema"]["n_averaged"]) == 8  # one update per optimizer step
    assert torch.equal(saved["fc.weight"], state["ema"]["module.fc.weight"])
    assert not torch.equal(saved["fc.weight"], state["model"]["fc.weight"])


def test_ema_follows_pytorchs_averaged_model_and_resumes_its_checkpoints():
    model = build_model("resnet20")
    ours = WeightEMA(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):  # weights and BN statistics move each step
        torch.manual_seed(step)
        model(torch.randn(8, 3, 16, 16)).logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model)
        theirs.update_parameters(model)
    for name, value in theirs.module.state_dict().items():
        expected = value if value.is_floating_point() else model.state_dict()[name]  # counters: the model's
        assert torch.equal(ours.module.state_dict()[name], expected), name
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    resumed = WeightEMA(build_model("resnet20"), 0.9)
    resumed.load_state_dict(theirs.state_dict())  # a last.pt written when the EMA was AveragedModel
    assert resumed.updates == 4
    assert torch.equal(resumed.module.fc.weight, theirs.module.fc.weight)


@pytest.mark.parametrize("batch_size, accumulate", [(8, 2), (4, 4)])
@pytest.mark.parametrize("class_weights", [None, "auto"])
def test_gradient_accumulation_matches_the_larger_batch(tmp_path, batch_size, accumulate, class_weights):
    # Fifteen images, one optimizer step: micro-batches of 8 and 7 (or 4, 4, 4 and 3) must make the step one
    # batch of all fifteen makes, each image weighing the same (times its class weight). Dividing each
    # micro-batch's loss by `accumulate` left the runs 69% of the distance moved apart; weighing each batch
    # by its image count left them apart with class weights, whose sum differs from batch to batch. Without
    # batch norm the equality holds to rounding; over many steps rounding grows chaotically (0.2% after 2
    # steps, 2.6% after 15 on an AMD EPYC), so one step.
    data = imbalanced_shapes(tmp_path / "data")
    common = dict(data=str(data), epochs=1, model="resnet20", model_options={"norm": None}, quiet=True,
                  channels_last=False, report=False, augment=AugmentConfig(preset="none"),
                  class_weights=class_weights, optim=OptimConfig(lr=0.01, schedule="constant"), out=str(tmp_path),
                  deterministic=True)
    whole = train(TrainConfig(batch_size=16, name="whole", **common))
    parts = train(TrainConfig(batch_size=batch_size, accumulate=accumulate, name="parts", **common))
    assert load_checkpoint(parts.run_dir / "last.pt")["step"] == 1
    torch.manual_seed(0)
    start = build_model("resnet20", num_classes=10, norm=None).state_dict()  # both runs' first weights (seed 0)
    end_whole, end_parts = _weights(whole.run_dir / "last.pt"), _weights(parts.run_dir / "last.pt")
    moved, apart = distance(end_whole, start), distance(end_whole, end_parts)
    assert apart < 1e-4 * moved, f"the accumulated step ended {apart / moved:.2e} of the distance moved away"
    # Steps come at each group's end and at the epoch's: eight batches of 2 (the last of 1) in groups of 3
    # make three steps.
    odd = train(TrainConfig(batch_size=2, accumulate=3, name="odd", **common))
    assert load_checkpoint(odd.run_dir / "last.pt")["step"] == 3


@pytest.mark.parametrize("auto_augment", [None, "augmix"])  # the strong preset's TrivialAugment, or AugMix
def test_mixup_cutmix_clipping_and_strong_augmentation_train(shapes16, tmp_path, auto_augment):
    augment = AugmentConfig(preset="strong", auto_augment=auto_augment, mixup=0.2, cutmix=1.0)
    result = train(TrainConfig(data=str(shapes16), epochs=1, out=str(tmp_path), name="mix", grad_clip=1.0,
                               label_smoothing=0.1, augment=augment, **QUICK))
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_class_weighted_loss_keeps_its_scale_when_targets_are_soft(tmp_path, monkeypatch, loss):
    # Mixup and CutMix turn labels into soft targets. For those, torch's weighted cross-entropy divides by the
    # image count, for class indices by the sum of their class weights, so turning mixup on rescaled the loss
    # (and the step: 2.38 against 2.68 on this batch). The engine divides both by the weights. A "mix" that
    # keeps every image as it is must leave the loss as it was.
    data = imbalanced_shapes(tmp_path / "d")
    dataset = open_dataset(data)
    config = TrainConfig(data=str(data), model="resnet20", batch_size=64, class_weights="auto", label_smoothing=0.1,
                         loss=loss, augment=AugmentConfig(preset="none"), device="cpu", quiet=True, out=str(tmp_path))
    trainer = Trainer(resolve(config, dataset), dataset, tmp_path, Console(quiet=True))
    trainer.model.train()
    images, labels = next(iter(trainer.train_loader.epoch(0)))
    assert trainer.class_weights[labels].std() > 0.1, "the batch mixes light and heavy classes"
    start = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    hard, _, _ = trainer._train_step(images, labels)
    trainer.model.load_state_dict(start)  # the second step starts from the same weights
    monkeypatch.setattr(trainer_module, "mix_batch",
                        lambda x, labels, classes, mixup, cutmix, smoothing: (x, soft_targets(labels, classes,
                                                                                             smoothing)))
    soft, _, _ = trainer._train_step(images, labels)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-5)


def test_the_augmix_consistency_step_sees_three_views_and_adds_their_jsd_to_the_clean_views_loss(shapes16, tmp_path):
    dataset = open_dataset(shapes16)
    config = TrainConfig(data=str(shapes16), model="resnet20", batch_size=16, augmix_jsd=12.0, device="cpu",
                         augment=AugmentConfig(preset="none", auto_augment="augmix"), quiet=True, out=str(tmp_path))
    trainer = Trainer(resolve(config, dataset), dataset, tmp_path, Console(quiet=True))
    trainer.model.train()
    seen = []
    trainer.model.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output.detach())))
    images, labels = next(iter(trainer.train_loader.epoch(0)))
    loss, correct, _ = trainer._train_step(images, labels)
    (x, logits), = seen
    assert len(x) == 3 * len(labels)  # the image, then two AugMix views of it
    torch.testing.assert_close(x[:len(labels)], normalize(images.float() / 255, trainer.model.preprocessing))
    clean = logits[:len(labels)]
    expected = (F.cross_entropy(clean, labels, reduction="sum") + 12.0 * consistency_sum(logits, 3)) / len(labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert correct.item() == (clean.argmax(1) == labels).sum().item()  # top-1 on the clean view


def test_augmix_consistency_needs_augmix_and_unmixed_images():
    augmix = AugmentConfig(auto_augment="augmix")
    for options, message in [({"augment": AugmentConfig()}, "give --auto-augment augmix with it"),
                             ({"augment": dataclasses.replace(augmix, mixup=0.2), "loss": "bce"},
                              "unmixed images, with no teacher: drop --mixup, --loss bce"),
                             ({"augment": augmix, "augmix_jsd": 0.0}, "positive (the paper: 12), got 0.0")]:
        with pytest.raises(residual.ConfigError, match=re.escape(message)):
            TrainConfig(data="d", **{"augmix_jsd": 12.0, **options})
    from residual.cli import _train_config, build_parser

    def flags(*given):
        return _train_config(build_parser().parse_args(["train", "d", "--auto-augment", "augmix", *given]))

    assert flags("--augmix-jsd").augmix_jsd == 12.0 and flags("--augmix-jsd", "6").augmix_jsd == 6.0  # the paper's 12
    assert flags().augmix_jsd is None


def test_bad_images_are_skipped_and_reported(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=12, seed=4, progress=False)
    (data / "train" / "star" / "00003.png").write_bytes(b"")
    (data / "train" / "ring" / "00005.png").write_bytes(b"\x89PNG broken")
    (data / "train" / "ring" / "readme.txt").write_text("not an image")
    for in_memory in (True, False):
        result = train(TrainConfig(data=str(data), epochs=1, out=str(tmp_path), name=f"bad-{in_memory}",
                                   in_memory=in_memory, workers=0, **QUICK))
        assert sorted(p.rsplit("/", 2)[-2] for p in result.bad_files) == ["ring", "star"]
        summary = json.loads((result.run_dir / "summary.json").read_text())
        assert len(summary["bad_files"]) == 2 and summary["ignored_files"][0].endswith("readme.txt")


def test_a_batch_that_unreadable_files_shortened_does_not_compile_the_model_again(tmp_path, monkeypatch):
    # The compiled forward met the shorter batch, compiled again with a dynamic batch size, and Dynamo then ran
    # that slower graph for every later batch. It runs eagerly now; the full batches keep their one graph.
    from torch._dynamo.testing import CompileCounter

    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)  # 40 training images
    (data / "train" / "star" / "00001.png").write_bytes(b"not a png")
    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, dynamic=None: compile_(model, backend=counter,
                                                                                       dynamic=dynamic))
    torch._dynamo.reset()  # nothing compiled earlier in this process is reused
    try:
        result = train(TrainConfig(data=str(data), epochs=2, compile=True, in_memory=False, workers=0,
                                   augment=AugmentConfig(preset="none"), out=str(tmp_path), name="short",
                                   **(QUICK | {"batch_size": 8, "model_options": {"layers": (1, 1, 1)}})))
    finally:
        torch._dynamo.reset()
    assert [path.rsplit("/", 2)[-2:] for path in result.bad_files] == [["star", "00001.png"]]
    assert load_checkpoint(result.run_dir / "last.pt")["step"] == 10, "every batch is a step, the short one too"
    assert counter.frame_count == 1, "the full batches compiled once, and only they"


def test_a_batch_of_unreadable_files_keeps_its_place_so_a_resume_starts_where_the_run_stopped(tmp_path,
                                                                                              monkeypatch):
    # The file loader left out a batch none of whose files could be read, and the trainer counted the batches
    # it got, so a resume after such a batch started one batch early and trained that batch twice (and under
    # DDP the worker that met it stepped once less than the others). The batch now comes, empty, in its place.
    data = imbalanced_shapes(tmp_path / "data")
    broken = data / "train" / "star" / "broken.png"
    broken.write_bytes(b"not a png")  # 16 files, 15 images
    common = dict(data=str(data), epochs=1, batch_size=1, in_memory=False, workers=0, model="resnet20",
                  model_options={"norm": None}, augment=AugmentConfig(preset="none"), channels_last=False,
                  optim=OptimConfig(lr=0.01, schedule="constant"), deterministic=True, quiet=True, report=False,
                  out=str(tmp_path))
    files = open_dataset(data).train.files
    position = epoch_order(len(files), True, TrainConfig(data=str(data)).seed, 0).tolist().index(files.index(broken))
    stop = position + 2  # a checkpoint after the empty batch, before the epoch's end
    assert stop < len(files)
    whole = train(TrainConfig(name="whole", **common))
    assert load_checkpoint(whole.run_dir / "last.pt")["step"] == 16, "every batch is a step, the empty one too"

    class Killed(Exception):
        pass

    def save_then_die(state, path, save=trainer_module.save_checkpoint):
        save(state, path)
        if state["batch"]:  # killed right after the mid-epoch checkpoint
            raise Killed

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(TrainConfig(name="killed", checkpoint_every=stop, **common))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["batch"] == stop
    resumed = train(resume=tmp_path / "killed")
    end_whole, end_resumed = _weights(whole.run_dir / "last.pt"), _weights(resumed.run_dir / "last.pt")
    assert all(torch.equal(end_whole[key], end_resumed[key]) for key in end_whole)
    assert resumed.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=1e-6)
    assert resumed.history[0]["train_acc"] == whole.history[0]["train_acc"]


def test_the_epochs_class_weighted_loss_is_its_weighted_mean_whatever_the_batch_size(tmp_path):
    # The epoch's train loss averaged each batch's weighted mean by the batch's image count, so with class
    # weights it changed with the batch size. With weights that do not move (a rate of 1e-12, no batch norm)
    # every image's loss is the same in both runs, and so must the epoch's be.
    data = imbalanced_shapes(tmp_path / "data")
    common = dict(data=str(data), epochs=1, model="resnet20", model_options={"norm": None}, class_weights="auto",
                  augment=AugmentConfig(preset="none"), optim=OptimConfig(lr=1e-12, schedule="constant"),
                  channels_last=False, quiet=True, report=False, out=str(tmp_path))
    whole = train(TrainConfig(batch_size=16, name="whole", **common))
    parts = train(TrainConfig(batch_size=4, name="parts", **common))
    assert parts.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=1e-5)


def test_a_class_without_training_images_is_named_in_a_warning(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=4, progress=False)
    for path in (data / "train" / "ring").iterdir():
        path.unlink()  # an empty class folder still makes a class (an output of the head)
    log = io.StringIO()
    train(TrainConfig(data=str(data), epochs=1, out=str(tmp_path), **QUICK), console=Console(file=log, width=300))
    assert f"warning: {data}: no training images of ring; the model cannot learn it" in log.getvalue()


def test_a_class_the_validation_split_lacks_and_a_small_validation_split_are_named_in_warnings(tmp_path):
    # Seven images, one of them class a's: the split held out one b image, and the run reported 100% top-1.
    data = tmp_path / "two"
    for name, count in (("a", 1), ("b", 6)):
        (data / name).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (16, 16), (40 * index, 200 if name == "a" else 0, 90)).save(data / name / f"{index}.png")
    log = io.StringIO()
    train(TrainConfig(data=str(data), epochs=1, out=str(tmp_path), **QUICK), console=Console(file=log, width=300))
    assert f"warning: {data}: no validation images of a; validation top-1 does not measure it" in log.getvalue()
    assert (f"warning: {data}: the validation split has 1 image(s), so its top-1 moves in steps of 100 points"
            in log.getvalue())


def test_train_cli_maps_flags_to_the_config(shapes16, tmp_path, capsys):
    from residual.cli import main

    code = main(["train", str(shapes16), "--model", "resnet20", "--epochs", "1", "--batch-size", "32", "--lr", "0.03",
                 "--schedule", "multistep", "--milestones", "1,2", "--augment", "strong", "--no-hflip", "--mixup",
                 "0.2", "--drop-rate", "0.1", "--drop-path", "0.05", "--label-smoothing", "0.05", "--loss", "bce",
                 "--bce-target-threshold", "0.2", "--aug-repeats", "3", "--auto-augment", "randaugment",
                 "--randaugment-magnitude", "21", "--quiet",
                 "--no-report", "--out",
                 str(tmp_path), "--name", "cli"])
    assert code == 0
    config = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert config["optim"]["lr"] == 0.03 and config["optim"]["milestones"] == [1, 2]
    assert config["augment"]["preset"] == "strong" and config["augment"]["hflip"] is False
    assert (config["augment"]["randaugment_ops"], config["augment"]["randaugment_magnitude"]) == (2, 21)
    assert config["auto"]["augment.randaugment_ops"] == 2 and "augment.randaugment_magnitude" not in config["auto"]
    assert config["augment"]["mixup"] == 0.2 and config["model_options"] == {"drop_rate": 0.1, "drop_path_rate": 0.05}
    assert (config["loss"], config["bce_target_threshold"]) == ("bce", 0.2) and config["aug_repeats"] == 3
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "top-5" in printed  # ten classes
    assert main(["train", str(shapes16), "--aug-repeats", "0"]) == 2
    assert "--aug-repeats must be at least 1, got 0" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nowhere")]) == 2
    assert main(["train", str(shapes16), "--ema", "1.5"]) == 2
    assert "--ema is the average's decay per step" in capsys.readouterr().err
    assert main(["train", str(shapes16), "--bce-target-threshold", "0.2"]) == 2
    assert "--bce-target-threshold goes with --loss bce" in capsys.readouterr().err


def test_the_epoch_line_leaves_out_top5_where_five_classes_or_fewer_make_it_always_100(shapes16, tmp_path, capsys):
    from residual.cli import main

    for split in ("train", "val"):
        for name in ("circle", "square", "star"):
            shutil.copytree(shapes16 / split / name, tmp_path / "three" / split / name)
    assert main(["train", str(tmp_path / "three"), "--model", "resnet20", "--epochs", "1", "--batch-size", "32",
                 "--quiet", "--no-report", "--out", str(tmp_path), "--name", "three"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "top-1" in printed and "top-5" not in printed


def test_stem_flag_and_the_warning_for_a_net_that_shrinks_small_images_to_one_pixel(shapes16, tmp_path, capsys):
    from residual.cli import main

    common = ["train", str(shapes16), "--model", "resnet18", "--epochs", "1", "--batch-size", "64", "--quiet",
              "--no-report", "--out", str(tmp_path)]
    assert main(common + ["--name", "imagenet-stem"]) == 0
    assert ("warning: resnet18 shrinks its input 32x, so 16 px images reach the classifier as 1x1 maps; use a "
            "CIFAR-size net (resnet20, resnet56), --stem cifar, or a larger --image-size") in capsys.readouterr().out
    assert main(common + ["--name", "cifar-stem", "--stem", "cifar"]) == 0  # 2x2 maps at the last stage
    assert "warning:" not in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "cifar-stem" / "config.yaml").read_text())["model_options"] == {"stem": "cifar"}
    model = residual.load_model(tmp_path / "cifar-stem" / "model.safetensors")
    assert model.config.stem == "cifar" and model.conv1.kernel_size == (3, 3)


def test_an_empty_validation_split_says_how_to_fill_it(tmp_path):
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=4, progress=False)
    for path in (data / "val").rglob("*.png"):
        path.unlink()
    with pytest.raises(TrainingError, match="put images in its val/ folder, or remove the folder so --val-split"):
        train(TrainConfig(data=str(data), epochs=1, out=str(tmp_path / "runs"), **QUICK))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no run folder left


def test_public_api_trains(shapes16, tmp_path):
    result = residual.train(residual.TrainConfig(data=str(shapes16), epochs=1, out=str(tmp_path), name="api", **QUICK))
    assert isinstance(result, residual.TrainResult) and result.model_path.is_file()


def test_a_failed_checkpoint_write_leaves_the_previous_one(shapes16, tmp_path, monkeypatch):
    result = train(TrainConfig(data=str(shapes16), epochs=1, out=str(tmp_path), name="ckpt", **QUICK))
    last = result.run_dir / "last.pt"
    before = last.read_bytes()

    def dies_half_way(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("killed while writing")

    monkeypatch.setattr(torch, "save", dies_half_way)
    from residual.train.checkpoint import save_checkpoint

    with pytest.raises(OSError, match="killed while writing"):
        save_checkpoint({"step": 99}, last)
    assert last.read_bytes() == before
    assert sorted(p.name for p in result.run_dir.iterdir() if p.name.startswith(".")) == [".lock"]  # no .tmp


def test_mixed_precision_path_trains(shapes16, tmp_path):
    # bf16 autocast, the CUDA default, also runs on the CPU: the same code path, exercised here.
    log = io.StringIO()
    result = train(TrainConfig(data=str(shapes16), epochs=1, amp=True, out=str(tmp_path), name="amp",
                               **{**QUICK, "report": True}), console=Console(file=log, width=300))
    assert math.isfinite(result.history[0]["train_loss"])
    assert residual.load_model(result.model_path).fc.weight.dtype == torch.float32
    # The report computes in float32, as `residual eval` does, and says so beside the epoch's bf16 figure,
    # which an image near a tie can make differ.
    reported = json.loads((result.run_dir / "metrics.json").read_text())["top1"]
    [line] = [line for line in log.getvalue().splitlines() if line.startswith("validation report:")]
    assert (f"val top-1 {reported:.2%} in float32; {result.best['val_top1']:.2%} in the epoch's bfloat16 "
            f"validation, ECE") in line


def test_class_weights_and_balanced_sampler_for_imbalanced_data(tmp_path):
    from residual.data.loaders import InMemoryLoader
    from residual.train.trainer import class_weights

    assert class_weights([30, 10]).tolist() == pytest.approx([0.5, 1.5])
    assert class_weights([10, 0, 30]).tolist() == pytest.approx([1.5, 0.0, 0.5])
    labels = torch.tensor([0] * 90 + [1] * 10)
    loader = InMemoryLoader(torch.zeros(100, 3, 2, 2, dtype=torch.uint8), labels, 50, True, 0, torch.device("cpu"),
                            balanced=True)
    drawn = torch.cat([batch for epoch in range(20) for _, batch in loader.epoch(epoch)])
    assert 0.4 < drawn.float().mean().item() < 0.6, "the 10% class is drawn about half the time"
    assert [b.tolist() for _, b in loader.epoch(3, start=1)] == [b.tolist() for _, b in loader.epoch(3)][1:]

    data = write_shapes(tmp_path / "d", size=16, per_class=12, seed=3, progress=False)
    for path in sorted((data / "train" / "star").glob("*.png"))[2:]:
        path.unlink()
    result = train(TrainConfig(data=str(data), epochs=1, class_weights="auto", balanced_sampler=True,
                               out=str(tmp_path), name="imbalanced", **QUICK))
    assert math.isfinite(result.history[0]["train_loss"])
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["class_weights"] == "auto"


def test_keep_best_keeps_the_model_files_of_the_best_epochs(shapes16, tmp_path):
    result = train(TrainConfig(data=str(shapes16), epochs=4, keep_best=2, monitor="val_loss", out=str(tmp_path),
                               name="run", **QUICK))
    losses = {row["epoch"]: row["val_loss"] for row in result.history}
    best_two = sorted(losses, key=losses.get)[:2]
    files = sorted(path.name for path in result.run_dir.glob("epoch-*.safetensors"))
    assert files == [f"epoch-{epoch:03d}.safetensors" for epoch in sorted(best_two)]
    for epoch in best_two:  # each file is that epoch's model
        metadata = residual.read_metadata(result.run_dir / f"epoch-{epoch:03d}.safetensors")["extra"]
        assert metadata["epoch"] == epoch and metadata["val_loss"] == pytest.approx(losses[epoch])
    assert [epoch for _, _, epoch in load_checkpoint(result.run_dir / "last.pt")["kept"]] == best_two


def test_a_resumed_run_ranks_its_epochs_against_those_it_kept_before(shapes16, tmp_path):
    run = train(TrainConfig(data=str(shapes16), epochs=2, keep_best=1, monitor="val_loss", out=str(tmp_path),
                            name="run", **QUICK)).run_dir
    state = load_checkpoint(run / "last.pt")
    state["kept"] = [(0.0, 0.0, 1)]  # as if epoch 1 had scored a val loss of 0: no later epoch can push it out
    save_checkpoint(state, run / "last.pt")
    shutil.copy(run / "model.safetensors", run / "epoch-001.safetensors")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("epochs: 2", "epochs: 4"))
    train(resume=run)
    assert [path.name for path in run.glob("epoch-*.safetensors")] == ["epoch-001.safetensors"]
    assert load_checkpoint(run / "last.pt")["kept"] == [(0.0, 0.0, 1)]
