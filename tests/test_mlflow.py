"""`--mlflow`: a run's settings, every epoch's and step's numbers, its files and how it ended, in an MLflow run,
read back through MLflow's own client; a resumed run goes on in the same MLflow run; a server lost mid-run does
not stop the training; one that cannot be reached, or a missing client, is a one-line refusal before training."""

import csv
import functools
import json
import logging
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from residual.cli import main
from residual.data.shapes import write_shapes
from residual.errors import ConfigError
from residual.train import remote_log
from residual.train import TrainConfig, train
from residual.train.optim import OptimConfig
from residual.train.tune import tune

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402  (after the skip: the client is a test dependency)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tracking store in a folder: MLflow's file store, which it keeps for tests and offline use (it asks for
    MLFLOW_ALLOW_FILE_STORE); the run goes to it as to a server."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shapes-runs")
    return (tmp_path / "mlruns").as_uri()


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(metric.step, metric.value) for metric in sorted(client.get_metric_history(run_id, key),
                                                              key=lambda metric: (metric.step, metric.timestamp))]


def test_a_run_sends_its_settings_every_epoch_and_step_its_best_numbers_and_its_files(tmp_path, store, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)  # 40 training images
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "2", "--batch-size", "16", "--workers", "0",
                 "--lr", "0.05", "--mlflow", store, "--group", "lr-sweep", "--quiet", "--out",
                 str(tmp_path / "runs"), "--name", "tracked"]) == 0
    assert "tracked (model.safetensors" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tracked"
    record = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(store)
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "shapes-runs" == record["experiment"]
    assert run.data.tags["residual.run_dir"] == str(run_dir.resolve())
    assert run.data.tags["residual.group"] == "lr-sweep"
    params = run.data.params
    assert params["model"] == "resnet20" and float(params["optim.lr"]) == 0.05 and params["epochs"] == "2"
    assert params["augment.hflip"] == "True" and "teacher" not in params  # unset settings left out
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    for column in ("train_loss", "val_top1", "val_loss", "lr", "images_per_s"):
        assert history(client, run.info.run_id, column) == [
            (int(row["epoch"]), pytest.approx(float(row[column]), rel=1e-5)) for row in rows]
    # Three optimizer steps an epoch (16, 16 and 8 images), each sent once, at its number.
    assert [step for step, _ in history(client, run.info.run_id, "step/train_loss")] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in history(client, run.info.run_id, "step/lr")] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["best/val_top1"] == pytest.approx(summary["best"]["val_top1"])
    assert run.data.metrics["best/epoch"] == summary["best_epoch"]
    sent = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "config.yaml", "metrics.csv", "summary.json", "curves.png", "train_batch.png",
            "report.html", "confusion_matrix.png"} <= sent and "last.pt" not in sent
    copy = client.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path / "downloaded"))
    assert open(copy, "rb").read() == (run_dir / "model.safetensors").read_bytes()


def test_a_run_stopped_then_resumed_goes_on_in_the_same_mlflow_run(tmp_path, store):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    config = TrainConfig(data=str(data), model="resnet20", epochs=3, batch_size=16, workers=0, quiet=True,
                         report=False, optim=OptimConfig(lr=0.05), out=str(tmp_path / "runs"), name="resumed",
                         mlflow=store)

    def ctrl_c_after_the_first_epoch(row):
        raise KeyboardInterrupt  # as a second Ctrl-C would: last.pt already holds the epoch

    with pytest.raises(KeyboardInterrupt):
        train(config, epoch_end=ctrl_c_after_the_first_epoch)
    run_dir = tmp_path / "runs" / "resumed"
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "KILLED"
    assert [step for step, _ in history(client, run_id, "val_top1")] == [1]

    train(resume=run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1 and "residual.group" not in run.data.tags
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert history(client, run_id, "val_top1") == [(int(row["epoch"]), pytest.approx(float(row["val_top1"])))
                                                   for row in rows] and len(rows) == 3


def test_a_search_is_a_run_with_its_trials_nested_under_it_and_a_resumed_search_goes_on_in_it(tmp_path, store):
    pytest.importorskip("optuna")
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    config = TrainConfig(data=str(data), model="resnet20", epochs=2, batch_size=16, workers=0, quiet=True,
                         report=False, mlflow=store)
    first = tune(config, ["lr=0.01..0.3:log"], trials=2, pruner="none", out=str(tmp_path / "tune"))
    search_id = json.loads((first.tune_dir / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(store)
    assert client.get_run(search_id).info.status == "FINISHED"
    assert client.get_run(search_id).data.tags["residual.trials"] == "2"
    # Two more trials, in the same search run, by two worker processes: each sends its own trials' scores.
    result = tune(resume=first.tune_dir, trials=4, jobs=2)

    search = client.get_run(search_id)
    assert search.info.run_name == first.tune_dir.name and search.info.status == "FINISHED"
    assert search.data.tags["residual.search"] == "true" and search.data.tags["residual.group"] == first.tune_dir.name
    assert search.data.tags["residual.best_trial"] == str(result.best.number)
    assert search.data.params["search.lr"] == "0.01..0.3:log" and search.data.tags["residual.trials"] == "4"
    assert "trials" not in search.data.params  # a parameter could not be raised
    assert search.data.params["monitor"] == "val_top1" and search.data.params["model"] == "resnet20"
    complete = [trial for trial in result.trials if trial.state == "complete"]
    assert len(complete) == 4
    assert history(client, search_id, "trial/val_top1") == [(t.number, pytest.approx(t.score)) for t in complete]
    assert history(client, search_id, "best/val_top1") == [
        (t.number, pytest.approx(max(o.score for o in complete[:index + 1]))) for index, t in enumerate(complete)]
    sent = {artifact.path for artifact in client.list_artifacts(search_id)}
    assert {"trials.csv", "best.yaml", "search.png", "tune.yaml"} <= sent
    trained = {Path(t.run_dir).name: t.values["lr"] for t in result.trials}  # settings drawn again share a run
    nested = {}
    for name in trained:
        run = client.get_run(json.loads((first.tune_dir / "trials" / name / "mlflow.json").read_text())["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == search_id and run.info.status == "FINISHED"
        assert run.data.tags["residual.group"] == first.tune_dir.name and "residual.search" not in run.data.tags
        nested[run.info.run_name] = float(run.data.params["optim.lr"])
    assert nested == pytest.approx(trained)
    assert len(client.search_runs([search.info.experiment_id])) == 1 + len(trained)


def test_a_search_whose_server_cannot_be_reached_is_refused_and_leaves_no_folder(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    with socket.socket() as closed:  # bound, not listening
        closed.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with pytest.raises(ConfigError, match=f"--mlflow {uri}: cannot connect .*Check the tracking URI"):
            tune(TrainConfig(data=str(data), model="resnet20", epochs=1, quiet=True, mlflow=uri), ["lr=0.01..0.1"],
                 trials=1, out=str(tmp_path / "tune"))
    assert not any((tmp_path / "tune").iterdir())


def test_a_tracking_store_lost_mid_run_is_said_once_and_the_training_goes_on(tmp_path, store, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    config = TrainConfig(data=str(data), model="resnet20", epochs=3, batch_size=16, workers=0, quiet=True,
                         report=False, optim=OptimConfig(lr=0.05), out=str(tmp_path / "runs"), name="lost",
                         mlflow=store)

    def the_store_goes_away(row):
        shutil.rmtree(tmp_path / "mlruns", ignore_errors=True)

    result = train(config, epoch_end=the_store_goes_away)
    assert len(result.history) == 3 and (result.run_dir / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert out.count("--mlflow: sending") == 1 and "failed" in out and "training goes on" in out
    assert "of the run's sends to" in out and f"the run directory {result.run_dir} holds everything" in out


def test_a_server_that_stops_answering_mid_run_does_not_hold_the_training_up(tmp_path, store, capsys, monkeypatch):
    """MLflow's client waits about four minutes on a server that takes a send and never answers. The sends go from a
    thread of their own, so the training runs on past such a server; at the end, the sends left are counted as
    lost once one has waited SEND_PATIENCE seconds, not waited on one by one."""
    answering, sends = threading.Event(), []
    send_batch = MlflowClient.log_batch

    def stops_answering(client, *args, **kwargs):
        sends.append(kwargs)
        if len(sends) > 2:  # the first two reach the server; then it hangs (until the test is done)
            answering.wait(timeout=60)
        return send_batch(client, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", stops_answering)
    monkeypatch.setattr(remote_log, "CLOSE_PATIENCE", 0.5)
    monkeypatch.setattr(remote_log, "SEND_PATIENCE", 1.0)  # a folder's store is always "there"
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    result = train(TrainConfig(data=str(data), model="resnet20", epochs=3, batch_size=16, workers=0, quiet=True,
                               report=False, optim=OptimConfig(lr=0.05), out=str(tmp_path / "runs"), name="hung",
                               mlflow=store))
    answering.set()
    assert len(result.history) == 3 and (result.run_dir / "model.safetensors").is_file()
    out = capsys.readouterr().out
    left = re.search(r"--mlflow: \S+ has not answered for 1 s; the (\d+) send\(s\) left are not made", out)
    assert left and int(left[1]) > 1 and f"{left[1]} of the run's sends to" in out  # the hung one, and after it
    client = MlflowClient(store)
    run_id = json.loads((result.run_dir / "mlflow.json").read_text())["run_id"]
    assert history(client, run_id, "step/train_loss")  # what came before the server stopped answering arrived


@pytest.mark.parametrize("there", [True, False], ids=["server-there", "server-gone"])
def test_the_end_waits_on_a_slow_send_while_the_server_takes_connections(tmp_path, monkeypatch, there):
    """A large model file on a slow link takes minutes to send: the end waits past CLOSE_PATIENCE while the server
    still takes connections, and gives up after it where it takes none."""
    monkeypatch.setattr(remote_log, "CLOSE_PATIENCE", 0.2)
    said, sent, released = [], [], threading.Event()  # released: the slow send done (at once where the server is gone)
    log = remote_log.RemoteLog("--mlflow", tmp_path, said.append, in_background=True, reachable=lambda: there)
    log.where = "http://mlflow.internal:5000"
    log._call(lambda: (released.wait(timeout=0.7 if there else 30), sent.append("model.safetensors")),
              "model.safetensors")
    log._call(lambda: sent.append("the run's end"), "the run's end")
    log.send_the_rest()
    if there:
        assert sent == ["model.safetensors", "the run's end"] and said == [] and log.lost == 0
    else:
        assert sent == [] and log.lost == 2 and said == [
            "--mlflow: http://mlflow.internal:5000 has not answered for 0.2 s and takes no connection; the 2 send(s) "
            "left are not made"]
    released.set()


def test_the_http_librarys_retries_from_the_sender_are_one_line_an_outage(tmp_path, caplog):
    """MLflow's client sends through requests and urllib3, which logs a long line for each of its retries (seven a
    send): from the sender's thread they become one line an outage, said again after a send goes through; the
    same library's lines from other threads are left as they are."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(total=3, backoff_factor=0)))
    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        said = []
        log = remote_log.RemoteLog("--mlflow", tmp_path, said.append, in_background=True)
        log.where = url
        refused = functools.partial(session.get, url, timeout=5)
        for send in (refused, refused, lambda: None, refused):  # an outage of two sends, one through, another
            log._call(send, "steps")
        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"), pytest.raises(requests.ConnectionError):
            refused()  # from this thread: its retries are logged as urllib3 logs them
        log.send_the_rest()
    outages = [line for line in said if "does not answer" in line]
    assert outages == [f"--mlflow: {url} does not answer (Connection refused); its client tries again in the "
                       f"background, and training goes on"] * 2
    assert caplog.text.count("Retrying") == 3 and log.lost == 3


def test_sends_that_fail_for_a_while_are_let_go_and_those_after_arrive_in_order(tmp_path, store, capsys,
                                                                               monkeypatch):
    """A server that is down for a while and back: the sends it refused are counted, and the later ones (the last
    epochs, the best numbers, the files, the run's end) arrive."""
    refused, send_batch = [], MlflowClient.log_batch

    def down_for_a_while(client, *args, **kwargs):
        if len(refused) < 2 and any(metric.key == "step/train_loss" for metric in kwargs.get("metrics", [])):
            refused.append(kwargs)
            raise ConnectionError("Connection refused")
        return send_batch(client, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", down_for_a_while)
    data = write_shapes(tmp_path / "data", size=16, per_class=4, seed=0, progress=False)
    result = train(TrainConfig(data=str(data), model="resnet20", epochs=3, batch_size=16, workers=0, quiet=True,
                               report=False, optim=OptimConfig(lr=0.05), out=str(tmp_path / "runs"), name="down",
                               mlflow=store))
    out = capsys.readouterr().out
    assert out.count("--mlflow: sending steps to") == 1 and "2 of the run's sends to" in out
    client = MlflowClient(store)
    run = client.get_run(json.loads((result.run_dir / "mlflow.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["best/epoch"] >= 0
    assert [step for step, _ in history(client, run.info.run_id, "val_loss")] == [1, 2, 3]
    assert {path.path for path in client.list_artifacts(run.info.run_id)} >= {"model.safetensors", "metrics.csv"}


def test_a_run_that_fails_before_its_first_step_ends_its_mlflow_run_as_failed(tmp_path, store, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    for image in (data / "val").rglob("*.png"):  # found only once the trainer loads the data, after MLflow's run
        image.unlink()
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--mlflow", store, "--tensorboard",
                 "--quiet", "--out", str(tmp_path / "runs"), "--name", "broken"]) != 0
    assert "the validation split is empty" in capsys.readouterr().err
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("shapes-runs").experiment_id])
    assert run.info.run_name == "broken" and run.info.status == "FAILED"  # not RUNNING for ever
    assert not (tmp_path / "runs" / "broken").exists()  # nor its mlflow.json and event files: a run started again
    # there begins its own MLflow run


def test_an_unreachable_server_or_a_missing_client_is_refused_before_training(tmp_path, monkeypatch, capsys):
    data = write_shapes(tmp_path / "data", size=16, per_class=2, seed=0, progress=False)
    # MLflow's own retries (about four minutes) are left as they are: the refused connection is caught first.
    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
        assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--mlflow", uri, "--quiet",
                     "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --mlflow {uri}: cannot connect (Connection refused); is the tracking server running "
                   f"there? Check the tracking URI (or MLFLOW_TRACKING_URI), or leave --mlflow out\n")
    assert not any((tmp_path / "runs").glob("*/config.yaml"))  # no half-made run

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if it were not installed
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--mlflow", "--quiet",
                 "--out", str(tmp_path / "runs")]) == 2
    assert "pip install mlflow-skinny (or residual[mlflow])" in capsys.readouterr().err
