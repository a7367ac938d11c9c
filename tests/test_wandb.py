"""`--wandb`: a run's settings, every step's and epoch's numbers, its pictures, model and files, and how it ended,
in a Weights & Biases run, read back from the log W&B's own client writes (the records `wandb sync` sends); a
resumed run goes on in the same W&B run; a missing client, or no login, is a one-line refusal before training."""

import base64
import csv
import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest

from residual.cli import main
from residual.data.shapes import write_shapes
from residual.train import TrainConfig, train
from residual.train.optim import OptimConfig

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402  (after the skip: the client is a test dependency)

BLOCK = 32 * 1024
FULL, LAST = 1, 4


@pytest.fixture(autouse=True)
def fresh_client():
    """W&B's client reads its settings (mode, login) once a process: each test starts it anew."""
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B's offline mode: the run is written to RUN/wandb/ as it would be sent; W&B's own caches and settings
    go to the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def logged_runs(run_dir: Path) -> list[list]:
    """Each W&B process's records for the run, oldest first. A .wandb file is W&B's transaction log: a 7-byte
    header (':W&B', a magic number, a version), then LevelDB's log format: 32 KiB blocks of chunks, each a
    CRC32C, a length and a type (full, or first, middle and last of a record cut across blocks), holding
    protobuf Records. W&B's service writes it in the background: it is shut down first, as a command's exit
    does, so that everything sent is in the file."""
    wandb.teardown()
    runs = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        records, chunks, position = [], b"", 7
        while position + 7 <= len(data):
            if BLOCK - position % BLOCK < 7:  # too little room for a chunk's header: the block is padded
                position += BLOCK - position % BLOCK
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            chunks += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (FULL, LAST):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                records.append(record)
                chunks = b""
        runs.append(records)
    return runs


def of_type(records: list, kind: str) -> list:
    return [getattr(record, kind) for record in records if record.WhichOneof("record_type") == kind]


def history(records: list) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in row.item}
            for row in of_type(records, "history")]


def summary(records: list) -> dict:
    values = {}
    for update in of_type(records, "summary"):
        values.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update.update})
    return values


def test_a_run_sends_its_settings_steps_epochs_best_numbers_pictures_model_and_files(tmp_path, offline, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)  # 40 training images
    outer = wandb.init(project="the-callers-own", dir=tmp_path)  # a script's run, around the training
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "2", "--batch-size", "16", "--workers", "0",
                 "--lr", "0.05", "--wandb", "shapes-runs", "--group", "lr-sweep", "--quiet", "--out",
                 str(tmp_path / "runs"), "--name", "tracked"]) == 0
    run_dir = tmp_path / "runs" / "tracked"
    assert wandb.run is outer and not outer._is_finished  # the training had a run of its own, and left this one
    outer.finish()
    out, err = capsys.readouterr()
    assert "Run data is saved locally in" in err  # W&B says where an offline run is
    assert "run directory: " in out and ", wandb.json, wandb/)" in out
    [records] = logged_runs(run_dir)
    [run] = of_type(records, "run")
    record = json.loads((run_dir / "wandb.json").read_text())
    assert run.display_name == "tracked" and run.project == "shapes-runs" == record["project"]
    assert run.run_group == "lr-sweep" and run.job_type == "train"
    assert run.run_id == record["run_id"] and record["url"] is None  # offline: no page yet
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"] == "resnet20" and config["epochs"] == 2 and config["optim"]["lr"] == 0.05
    assert config["augment"]["hflip"] is True and "teacher" not in config  # nested as config.yaml; unset left out

    rows = history(records)
    # Three optimizer steps an epoch (16, 16 and 8 images), each at its number as W&B's step.
    assert [row["_step"] for row in rows if "step/train_loss" in row] == [1, 2, 3, 4, 5, 6]
    assert all("step/lr" in row for row in rows if "step/train_loss" in row)
    epochs = [row for row in rows if "epoch" in row]
    written = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [row["epoch"] for row in epochs] == [1, 2]
    for sent, row in zip(epochs, written):
        for column in ("train_loss", "val_top1", "val_loss", "lr", "images_per_s"):
            assert sent[column] == pytest.approx(float(row[column]), rel=1e-5), column
    assert [row["_step"] for row in epochs] == [3, 6]  # each epoch at its last optimizer step
    axes = {metric.name: metric.step_metric for metric in of_type(records, "metric") if metric.name}
    assert axes["val_top1"] == axes["train_loss"] == "epoch"
    [pictures] = [row for row in rows if "pictures/confusion_matrix/_type" in row]  # W&B spreads an image's fields
    assert pictures["pictures/confusion_matrix/_type"] == pictures["pictures/train_batch/_type"] == "image-file"

    best = json.loads((run_dir / "summary.json").read_text())
    final = summary(records)
    assert final["best/val_top1"] == pytest.approx(best["best"]["val_top1"])
    assert final["best/epoch"] == best["best_epoch"]

    [artifact] = of_type(records, "artifact")
    assert artifact.type == "model" and artifact.name == "tracked-model" and set(artifact.aliases) >= {"best"}
    digests = {entry.path: entry.digest for entry in artifact.manifest.contents}
    assert set(digests) == {"model.safetensors", "config.yaml"}
    model = (run_dir / "model.safetensors").read_bytes()
    assert digests["model.safetensors"] == base64.b64encode(hashlib.md5(model).digest()).decode()
    files = next(run_dir.glob("wandb/offline-run-*/files"))
    for name in ("config.yaml", "metrics.csv", "summary.json", "curves.png", "report.html"):
        assert (files / name).read_bytes() == (run_dir / name).read_bytes(), name
    [end] = of_type(records, "exit")
    assert end.exit_code == 0 and not of_type(records, "preempting")


def test_a_run_stopped_then_resumed_goes_on_in_the_same_wandb_run(tmp_path, offline):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    config = TrainConfig(data=str(data), model="resnet20", epochs=3, batch_size=16, workers=0, quiet=True,
                         report=False, optim=OptimConfig(lr=0.05), out=str(tmp_path / "runs"), name="resumed",
                         wandb="")

    def ctrl_c_after_the_first_epoch(row):
        raise KeyboardInterrupt  # as a second Ctrl-C would: last.pt already holds the epoch

    with pytest.raises(KeyboardInterrupt):
        train(config, epoch_end=ctrl_c_after_the_first_epoch)
    run_dir = tmp_path / "runs" / "resumed"
    [first] = logged_runs(run_dir)
    assert of_type(first, "preempting") and of_type(first, "exit")[0].exit_code == 130  # resumable
    assert [row["epoch"] for row in history(first) if "epoch" in row] == [1]

    train(resume=run_dir)
    stopped, resumed = logged_runs(run_dir)  # offline, each process keeps its part; `wandb sync` joins them
    assert of_type(resumed, "run")[0].run_id == of_type(first, "run")[0].run_id
    assert of_type(first, "run")[0].project == "residual"  # the default project
    assert of_type(first, "run")[0].run_group == ""  # no --group
    assert [row["epoch"] for row in history(resumed) if "epoch" in row] == [2, 3]
    assert [row["_step"] for row in history(resumed) if "step/train_loss" in row] == [4, 5, 6, 7, 8, 9]
    assert of_type(resumed, "exit")[0].exit_code == 0


def test_a_missing_client_no_login_or_a_failed_setup_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    args = ["train", str(data), "--model", "resnet20", "--epochs", "1", "--quiet", "--out", str(tmp_path / "runs")]
    assert main(args + ["--wandb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --wandb: No API key configured") and "WANDB_MODE=offline" in err
    assert err.count("\n") == 1 and not any((tmp_path / "runs").glob("*/config.yaml"))  # no half-made run

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    for image in (data / "val").rglob("*.png"):  # found only once the trainer loads the data, after W&B's run
        image.unlink()
    assert main(args + ["--wandb", "--name", "broken"]) != 0
    assert "the validation split is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "broken").exists()  # W&B's files and wandb.json with it: no resume of it

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    assert main(args + ["--wandb"]) == 2
    assert "pip install wandb (or residual[wandb])" in capsys.readouterr().err


def test_a_search_stops_at_a_tracker_that_cannot_start_and_goes_on_once_it_can(tmp_path, offline, monkeypatch):
    """Every trial would meet it, so it is not a trial's settings refused: the search stops at once, saying how to
    go on, and a resume trains the trial it stopped at."""
    pytest.importorskip("optuna")
    from residual.errors import TrackingError
    from residual.train.tune import tune

    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    config = TrainConfig(data=str(data), model="resnet20", epochs=1, batch_size=16, workers=0, quiet=True,
                         report=False, wandb="search")
    with monkeypatch.context() as missing:
        missing.setitem(sys.modules, "wandb", None)  # as if it were not installed
        with pytest.raises(TrackingError, match=r"^trial 0: --wandb: .*pip install wandb.*; once it is fixed, the "
                                                r"search goes on with: residual tune --resume "):
            tune(config, ["lr=0.01..0.1:log"], trials=2, pruner="none", out=str(tmp_path / "tune"))
    [tune_dir] = (tmp_path / "tune").iterdir()
    result = tune(resume=tune_dir)
    assert [(t.number, t.state) for t in result.trials] == [(0, "cut short"), (1, "complete"), (2, "complete")]
    assert result.trials[1].values == result.trials[0].values  # the trial it stopped at, trained
    for trial in result.trials[1:]:
        assert len(logged_runs(Path(trial.run_dir))) == 1
