"""residual tune: a hyperparameter search whose trials are real training runs, pruned, resumable after a kill."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console

from residual.cli import main
from residual.data.shapes import write_shapes
from residual.errors import ConfigError
from residual.train import TrainConfig
from residual.train.compare import compare_runs
from residual.train.config import options_as_asked
from residual.train import tune as tune_module
from residual.train.tune import Search, Searched, tune

pytest.importorskip("optuna")

QUICK = dict(model="resnet20", batch_size=32, quiet=True, report=False)
FAST = {**QUICK, "batch_size": 16}  # five steps an epoch on `colours`


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes16"), size=16, per_class=24, seed=1, progress=False)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Two classes any ResNet tells apart within an epoch at a usable rate (reddish and bluish noise), so a
    trial's score at epoch 2 says plainly whether its rate learns, on any machine."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("colours")
    for split, count in (("train", 40), ("val", 10)):
        for name, channel in (("red", 0), ("blue", 2)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 120, (16, 16, 3))
                pixels[..., channel] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    return root


def _trials(tune_dir):
    with (tune_dir / "trials.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _count_drawings(monkeypatch, every_s: float) -> list[int]:
    """search.png's drawings (the trials each drew), with SEARCH_DRAWN_EVERY_S as `every_s`."""
    drawn, real = [], tune_module.draw_search

    def counted(trials, *args):
        drawn.append(len(trials))
        real(trials, *args)

    monkeypatch.setattr(tune_module, "draw_search", counted)
    monkeypatch.setattr(tune_module, "SEARCH_DRAWN_EVERY_S", every_s)
    return drawn


def test_a_search_prunes_the_trials_that_fall_behind_and_writes_the_best_recipe(colours, tmp_path, monkeypatch):
    drawn = _count_drawings(monkeypatch, 3600.0)
    # residual train's own rate at batch 16 (0.1 per 128) is trial 0 and learns at once; far lower rates hardly
    # learn, so the trials that draw them are behind the median of the trials before them at epoch 2 and are
    # stopped there.
    result = tune(TrainConfig(data=str(colours), epochs=3, monitor="val_loss", **FAST), ["lr=0.0000001..0.0125:log"],
                  trials=6, out=str(tmp_path), pruner="median")
    rows = {int(row["trial"]): row for row in _trials(result.tune_dir)}
    assert len(rows) == 6 and rows[0]["note"] == "residual train's own settings" and float(rows[0]["lr"]) == 0.0125
    assert drawn == [6], "search.png once, at the end: the interval has not passed since the start"
    pruned = [row for row in rows.values() if row["state"] == "pruned"]
    complete = [row for row in rows.values() if row["state"] == "complete"]
    assert pruned and len(pruned) + len(complete) == 6
    for row in pruned:
        assert int(row["trial"]) >= 2 and row["epochs"] == "2" and row["note"] == "at epoch 2"
        run = result.tune_dir / "trials" / f"trial-{int(row['trial']):03d}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["stopped_by"].startswith(f"trial {row['trial']} pruned at epoch 2: val loss")
        assert float(row["lr"]) < max(float(other["lr"]) for other in complete)
    assert all(row["epochs"] == "3" for row in complete)
    assert result.best.score == pytest.approx(min(float(row["score"]) for row in complete), rel=1e-5)
    for row in rows.values():  # finished trials keep their model, not their checkpoint
        run = result.tune_dir / "trials" / f"trial-{int(row['trial']):03d}"
        assert (run / "model.safetensors").is_file() and not (run / "last.pt").exists()
        # One group in W&B and MLflow (--wandb, --mlflow): the search's.
        assert yaml.safe_load((run / "config.yaml").read_text())["group"] == result.tune_dir.name
    best = options_as_asked(result.files["best.yaml"])  # what residual train --config TUNE/best.yaml starts from
    again = TrainConfig.from_dict(best)
    assert again.optim.lr == pytest.approx(result.best.values["lr"], rel=1e-12)
    assert again.out == "runs/train" and again.name is None and again.report is False  # the base recipe's
    assert again.group is None
    assert again.epochs == 3 and again.model == "resnet20" and again.batch_size == 16
    assert result.files["search.png"].stat().st_size > 10_000
    runs, _ = compare_runs([result.tune_dir / "trials"])  # the trials side by side, pruned ones said to be
    states = {run.name: run.state for run in runs}
    for row in pruned:
        assert states[f"trial-{int(row['trial']):03d}"] == f"2/3 trial {row['trial']} pruned at epoch 2"


def test_no_trial_is_pruned_before_prune_from(colours, tmp_path):
    # The search above, judged from epoch 3 of 3: the last epoch, where no trial is stopped.
    result = tune(TrainConfig(data=str(colours), epochs=3, monitor="val_loss", **FAST), ["lr=0.0000001..0.0125:log"],
                  trials=6, out=str(tmp_path), pruner="median", prune_from=3)
    assert [trial.state for trial in result.trials] == ["complete"] * 6
    assert yaml.safe_load((result.tune_dir / "tune.yaml").read_text())["prune_from"] == 3
    with pytest.raises(ConfigError, match=r"--prune-from is the first epoch a trial can be stopped at: 1 to --epochs "
                                          r"\(3\), got 4"):
        tune(TrainConfig(data=str(colours), epochs=3, **QUICK), ["lr=0.01..0.1"], out=str(tmp_path), prune_from=4)


def test_settings_drawn_again_are_not_trained_again(shapes16, tmp_path, monkeypatch):
    drawn = _count_drawings(monkeypatch, 0.0)
    result = tune(TrainConfig(data=str(shapes16), epochs=2, monitor="val_loss", **QUICK), ["lr=0.025,0.0000001"],
                  trials=4, out=str(tmp_path), pruner="none")  # two choices, four trials: two drawn again at least
    rows = _trials(result.tune_dir)
    first = {}
    for row in rows:
        if row["lr"] in first:
            assert row["note"] == f"the settings of trial {first[row['lr']]['trial']}, not trained again"
            assert (row["state"], row["score"], row["run_dir"]) == tuple(first[row["lr"]][key]
                                                                         for key in ("state", "score", "run_dir"))
        else:
            first[row["lr"]] = row
    assert len(first) == 2 and len(rows) == 4
    assert drawn == [1, 2, 3, 4, 4], "search.png after each trial, trained or not, and at the end"
    assert sorted(path.name for path in (result.tune_dir / "trials").iterdir()) == sorted(
        f"trial-{int(row['trial']):03d}" for row in first.values())


def test_settings_that_clash_refuse_their_trial_alone(shapes16, tmp_path):
    result = tune(TrainConfig(data=str(shapes16), epochs=1, **QUICK),
                  ["loss=ce,bce", "bce-target-threshold=0.1..0.3"], trials=4, out=str(tmp_path))
    rows = _trials(result.tune_dir)
    assert {row["loss"] for row in rows} == {"ce", "bce"}, "the seed draws both"
    for row in rows:
        if row["loss"] == "ce":
            assert row["state"] == "refused" and "--bce-target-threshold goes with --loss bce" in row["note"]
            assert not (tmp_path / row["run_dir"]).exists()
        else:
            assert row["state"] == "complete"


def test_a_pruned_trial_drawn_again_is_pruned_again_at_its_score(shapes16, tmp_path):
    import optuna

    study = optuna.create_study(direction="maximize")
    lr = {"lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)}
    pruned = study.ask(lr)  # as a search's trial is pruned: its scores reported, then told
    pruned.report(0.3, 1)
    pruned.report(0.4, 2)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    search = Search(study, optuna, tmp_path, TrainConfig(data=str(shapes16), epochs=3, **QUICK),
                    [Searched("lr", 0.01, 1.0, log=True)], "val_top1", 3, Console(file=io.StringIO()))
    study.enqueue_trial(pruned.params)
    search.run_trial(study.ask(lr), 1, 2, time.monotonic())
    assert [(row["state"], row["score"], row["epochs"]) for row in _trials(tmp_path)] == [("pruned", "0.4", "2")] * 2
    assert _trials(tmp_path)[1]["note"].startswith("the settings of trial 0, not trained again")


def test_a_diverging_trial_counts_as_pruned_and_the_search_goes_on(shapes16, tmp_path):
    result = tune(TrainConfig(data=str(shapes16), epochs=2, **QUICK), ["lr=10000..100000:log"], trials=1,
                  out=str(tmp_path))
    (row,) = _trials(result.tune_dir)
    assert row["state"] == "diverged" and row["note"].startswith("non-finite loss") and result.best is None
    assert not (result.tune_dir / "best.yaml").exists()
    # A kill in the middle of writing the journal leaves half a line; a resume drops it, and the next event
    # written is read back (appended to the half line, it would have made the journal unreadable).
    journal = result.tune_dir / "study.log"
    with journal.open("ab") as file:
        file.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "ste')
    again = tune(resume=result.tune_dir, trials=2)
    assert [trial.state for trial in again.trials] == ["diverged", "diverged"]
    assert journal.read_bytes().endswith(b"\n")
    assert yaml.safe_load((result.tune_dir / "tune.yaml").read_text())["trials"] == 2  # the next resume's budget
    # Two rates that both diverge, three trials: one is drawn again, and takes the diverged (pruned) outcome.
    result = tune(TrainConfig(data=str(shapes16), epochs=2, **QUICK), ["lr=10000,100000"], trials=3,
                  out=str(tmp_path))
    rows = _trials(result.tune_dir)
    assert [row["state"] for row in rows] == ["diverged"] * 3
    assert sum("not trained again" in row["note"] for row in rows) >= 1


def test_no_trial_starts_after_the_time_limit(shapes16, tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 45))  # every look at the clock: 45 s later
    monkeypatch.setattr(tune_module.time, "monotonic", lambda: next(clock))
    log = io.StringIO()
    result = tune(TrainConfig(data=str(shapes16), epochs=1, **QUICK), ["lr=10000..100000:log"], trials=20,
                  time_limit=1, out=str(tmp_path), console=Console(file=log, width=300))
    assert 1 <= len(result.trials) < 20 and "minutes spent; no new trial starts" in log.getvalue()


def _tune_cli(*args):
    return [sys.executable, "-m", "residual", "tune", *map(str, args)]


def _start_and_wait(args, metrics, epochs_done, env):
    """`residual tune ARGS` in a process, returned once `metrics` (a trial's metrics.csv) has `epochs_done` rows."""
    process = subprocess.Popen(_tune_cli(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") > epochs_done:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the search ended before it could be stopped: {process.stderr.read()}"
    return process


def test_ctrl_c_stops_a_search_after_a_checkpoint_and_says_how_to_go_on(shapes16, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = _start_and_wait([shapes16, "--model", "resnet20", "--epochs", "6", "--batch-size", "32", "--quiet",
                               "--no-report", "--trials", "1", "--search", "lr=0.01..0.1:log", "--out", tmp_path,
                               "--name", "search"], tmp_path / "search" / "trials" / "trial-000" / "metrics.csv", 1,
                              env)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    err = process.stderr.read()
    assert "checkpoint saved" in err and f"the search goes on with: residual tune --resume {tmp_path / 'search'}" in err
    assert err.count("\n") == 1


def test_a_search_killed_mid_trial_resumes_that_trial_from_its_checkpoint(shapes16, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = _start_and_wait([shapes16, "--model", "resnet20", "--epochs", "4", "--batch-size", "32", "--quiet",
                               "--no-report", "--trials", "2", "--search", "lr=0.01..0.1:log", "--out", tmp_path,
                               "--name", "search"], tmp_path / "search" / "trials" / "trial-001" / "metrics.csv", 2,
                              env)  # trial 1 has finished two epochs
    process.send_signal(signal.SIGKILL)
    process.wait()

    resumed = subprocess.run(_tune_cli("--resume", tmp_path / "search"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing trial 1 in" in resumed.stdout and "resuming" in resumed.stdout
    rows = {int(row["trial"]): row for row in _trials(tmp_path / "search")}
    assert [rows[n]["state"] for n in sorted(rows)] == ["complete", "cut short", "complete"]
    assert rows[1]["note"] == "continued by trial 2" and rows[1]["lr"] == rows[2]["lr"]
    assert rows[2]["run_dir"] == rows[1]["run_dir"] and rows[2]["epochs"] == "4"  # its epochs before the kill too
    history = (tmp_path / "search" / "trials" / "trial-001" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3", "4"]


def _study(tune_dir):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tune_dir / "study.log")))
    return optuna.load_study(study_name="tune", storage=storage)


def test_parallel_trials_train_at_once_within_the_budget_each_line_naming_its_trial(shapes16, tmp_path,
                                                                                   monkeypatch):
    mlflow_client = pytest.importorskip("mlflow.tracking")
    store = (tmp_path / "mlruns").as_uri()  # MLflow's file store: each worker sends its own trials
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_tune_cli(shapes16, "--model", "resnet20", "--epochs", "3", "--batch-size", "32", "--quiet",
                                    "--no-report", "--trials", "5", "--jobs", "2", "--search", "lr=0.01..0.3:log",
                                    "--out", tmp_path, "--name", "search", "--mlflow", store),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "5 trials of 3 epochs" in done.stdout and "2 trials at a time, on cpu, cpu" in done.stdout
    rows = _trials(tmp_path / "search")
    assert len(rows) == 5 and {row["state"] for row in rows} <= {"complete", "pruned"}, "never over the budget"
    trials = sorted(_study(tmp_path / "search").trials, key=lambda t: t.datetime_start)
    assert any(later.datetime_start < earlier.datetime_complete for earlier, later in zip(trials, trials[1:])), \
        "some trials trained at the same time"
    epoch_lines = [line for line in done.stdout.splitlines() if " epoch " in line and "train loss" in line]
    for number in range(5):
        mine = [line for line in epoch_lines if line.startswith(f"trial {number}: epoch ")]
        assert [line.split()[3] for line in mine] == ["1/3", "2/3", "3/3"] or rows[number]["state"] == "pruned"
    assert len(epoch_lines) == sum(int(row["epochs"]) for row in rows), "every epoch line names its trial"
    best = yaml.safe_load((tmp_path / "search" / "best.yaml").read_text())
    assert (best["device"], best["workers"]) == ("auto", None), "the search's own, not a worker's"
    trial = yaml.safe_load((tmp_path / "search" / "trials" / "trial-000" / "config.yaml").read_text())
    assert trial["workers"] == 1  # the two workers share this machine's cores
    client = mlflow_client.MlflowClient(store)
    search_id = json.loads((tmp_path / "search" / "mlflow.json").read_text())["run_id"]
    assert client.get_run(search_id).info.status == "FINISHED"
    sent = sorted(metric.step for metric in client.get_metric_history(search_id, "trial/val_top1"))
    assert sent == [int(row["trial"]) for row in rows if row["state"] == "complete"]
    for run_dir in {row["run_dir"] for row in rows}:
        run = client.get_run(json.loads((Path(run_dir) / "mlflow.json").read_text())["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == search_id


def test_parallel_trials_go_on_the_gpus_in_turn_each_its_workers_current_device(monkeypatch):
    monkeypatch.setattr(tune_module.torch.cuda, "device_count", lambda: 2)
    assert tune_module._worker_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert tune_module._worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert tune_module._worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    monkeypatch.setattr(tune_module.torch.cuda, "device_count", lambda: 0)
    assert tune_module._worker_devices("auto", 2) == ["auto", "auto"]
    current, threads = [], torch.get_num_threads()
    monkeypatch.setattr(tune_module.torch.cuda, "set_device", current.append)
    try:
        tune_module._place_worker("cuda:1", 2)  # each worker's GPU its current one
        tune_module._place_worker("cpu", 2)
        assert current == [torch.device("cuda:1")] and torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parallel_trials_on_cuda_train_on_the_gpus_in_turn(shapes16, tmp_path):
    result = tune(TrainConfig(data=str(shapes16), epochs=2, **QUICK), ["lr=0.01..0.1:log"], trials=4, jobs=2,
                  pruner="none", out=str(tmp_path))
    assert [t.state for t in result.trials] == ["complete"] * 4
    gpus = torch.cuda.device_count()
    devices = {yaml.safe_load((Path(t.run_dir) / "config.yaml").read_text())["device"] for t in result.trials}
    assert devices <= {f"cuda:{index % gpus}" for index in range(2)}  # the workers' own, never "auto"


def _group_alive(group: int) -> list[int]:
    """The processes of process group `group` that still run (zombies left for init to reap do not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table in /proc")
def test_a_parallel_search_killed_stops_its_workers_and_resumes_every_trial_cut_short(shapes16, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    search = tmp_path / "search"
    process = subprocess.Popen(_tune_cli(shapes16, "--model", "resnet20", "--epochs", "8", "--batch-size", "16",
                                         "--quiet", "--no-report", "--trials", "2", "--jobs", "2", "--pruner", "none",
                                         "--search", "lr=0.01..0.1:log", "--out", tmp_path, "--name", "search"),
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    metrics = [search / "trials" / f"trial-00{number}" / "metrics.csv" for number in (0, 1)]
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if all(path.is_file() and path.read_text().count("\n") > 1 for path in metrics):
            break  # both trials have finished an epoch
        time.sleep(0.05)
    assert process.poll() is None, f"the search ended before it could be stopped: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)  # the workers are left without the process that started them
    process.wait()
    deadline = time.time() + 120
    while _group_alive(process.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _group_alive(process.pid), "every worker stopped"
    assert all((path.parent / "last.pt").is_file() for path in metrics), "each saved its trial's checkpoint"
    cut_at = [path.read_text().count("\n") - 1 for path in metrics]
    assert all(1 <= epochs < 8 for epochs in cut_at)

    resumed = subprocess.run(_tune_cli("--resume", search, "--jobs", "2"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = {int(row["trial"]): row for row in _trials(search)}
    assert [rows[n]["state"] for n in sorted(rows)] == ["cut short", "cut short", "complete", "complete"]
    continued = {rows[n]["note"].split("; ")[-1]: rows[n]["run_dir"] for n in (0, 1)}  # after "own settings; "
    assert sorted(continued) == ["continued by trial 2", "continued by trial 3"]
    for number in (2, 3):
        row = rows[number]
        assert row["run_dir"] == continued[f"continued by trial {number}"] and row["epochs"] == "8"
        history = (Path(row["run_dir"]) / "metrics.csv").read_text().splitlines()
        assert [line.split(",")[0] for line in history[1:]] == [str(epoch) for epoch in range(1, 9)]


@pytest.mark.parametrize("text, message", [
    ("lr", "give NAME=LOW..HIGH"),
    ("learning-rate=0.01..0.1", "'learning-rate' is not a setting a search can vary; those are: "),
    ("seed=0..9", "'seed' is not a setting"),
    ("lr=0.1..0.01", "the range needs LOW < HIGH"),
    ("lr=0..0.1:log", "both above 0 on a log scale"),
    ("lr=0.01..0.1:ln", "a range ends with :log"),
    ("optimizer=0..1", "--optimizer is not a number; give its choices"),
    ("warmup-epochs=a..b", "the range's ends must be numbers"),
    ("plateau-patience=1.5..4", "--plateau-patience counts whole numbers"),
    ("optimizer=sgd", "two or more different choices"),
])
def test_a_search_that_cannot_be_drawn_is_refused_in_one_line(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Searched.parse(text)


def test_search_texts_parse_to_ranges_and_choices_and_back():
    assert Searched.parse("--lr=0.01..0.3:log") == Searched("lr", 0.01, 0.3, log=True)
    assert Searched.parse("plateau-patience=2..6") == Searched("plateau-patience", 2, 6, integer=True)
    assert Searched.parse("hflip=true,false").choices == (True, False)
    assert Searched.parse("lr=1e-3,0.01,1").choices == (0.001, 0.01, 1)  # YAML would read 1e-3 as text
    for text in ("lr=0.01..0.3:log", "plateau-patience=2..6", "optimizer=sgd,adamw", "drop-path=0..0.2",
                 "augment=cifar,none", "hflip=true,false", "batch-size=64,128"):
        assert Searched.parse(text).text() == text
    for searched in (Searched("lr", 0.05 / 10, 0.05 * 3, log=True), Searched("lr", choices=(1e-3, 0.5))):
        assert Searched.parse(searched.text()) == searched  # tune.yaml keeps the ranges exactly


def test_settings_that_cannot_go_together_are_refused_before_a_trial_runs(shapes16, tmp_path):
    with pytest.raises(ConfigError, match="--layer-lr-decay is the lr's factor"):
        tune(TrainConfig(data=str(shapes16), **QUICK), ["layer-lr-decay=0.5..2"], out=str(tmp_path))
    assert not any(tmp_path.iterdir())  # no search folder is left for a search refused before it began
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'"):
        tune(TrainConfig(data=str(shapes16), **QUICK), ["model=resnet20,resnet9000"], out=str(tmp_path))
    with pytest.raises(ConfigError, match="--search names a setting twice: lr"):
        tune(TrainConfig(data=str(shapes16), **QUICK), ["lr=0.01..0.1", "lr=0.1,0.2"], out=str(tmp_path))
    # Trials training small validate low until their full-size epochs: the pruner would judge them unfairly.
    with pytest.raises(ConfigError, match="--search progressive-resize: trials training at smaller sizes validate "
                                          "low until their full-size epochs, so --pruner median would stop them"):
        tune(TrainConfig(data=str(shapes16), epochs=4, **QUICK), ["progressive-resize=8,12"], out=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_the_cli_refuses_a_setting_both_fixed_and_searched_and_settings_with_resume(shapes16, tmp_path, capsys):
    assert main(["tune", str(shapes16), "--lr", "0.1", "--search", "lr=0.01..0.1"]) == 2
    assert "--lr given both as a flag and in --search" in capsys.readouterr().err
    assert main(["tune", str(shapes16), "--nproc", "2"]) == 2
    assert "drop --nproc" in capsys.readouterr().err
    assert main(["tune", "--resume", str(tmp_path), "--epochs", "3", "--pruner", "none"]) == 2
    assert "would be ignored: drop them" in capsys.readouterr().err
    assert main(["tune", "--resume", str(tmp_path)]) == 2
    assert "not a search folder" in capsys.readouterr().err
