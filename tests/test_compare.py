"""`residual compare`: runs side by side, best first, with what differs between their recipes."""

import json

import pytest

import residual
from residual.cli import main
from residual.data.shapes import write_shapes
from residual.evaluate import evaluate
from residual.metrics import mcnemar_exact, wilson_interval
from residual.train import TrainConfig, train
from residual.train.compare import compare_runs, recipe_differences
from residual.train.optim import OptimConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of one recipe on the same data: two learning rates, and one stopped early."""
    root = tmp_path_factory.mktemp("compare")
    data = write_shapes(root / "shapes", size=16, per_class=12, seed=4, progress=False)
    common = dict(data=str(data), model="resnet20", batch_size=32, quiet=True, report=False, out=str(root / "runs"))
    for name, lr, epochs in [("slow", 0.01, 3), ("fast", 0.1, 3)]:
        train(TrainConfig(name=name, epochs=epochs, optim=OptimConfig(lr=lr), **common))
    train(TrainConfig(name="stuck", epochs=6, early_stopping=1, monitor="val_loss",
                      optim=OptimConfig(lr=1e-12, schedule="constant"), **common))
    return root / "runs"


def test_runs_are_ranked_by_their_kept_model_and_only_their_differences_are_named(runs):
    records, differing = compare_runs([runs])
    assert sorted(record.name for record in records) == ["fast", "slow", "stuck"]
    top1 = [record.best["val_top1"] for record in records]
    assert top1 == sorted(top1, reverse=True)
    # What differs: the learning rate, schedule (and the cosine one's automatic warm-up), epochs and early
    # stopping; not the name or folder.
    assert differing == ["epochs", "optim.lr", "optim.schedule", "optim.warmup_epochs", "early_stopping", "monitor"]
    by_name = {record.name: record for record in records}
    assert recipe_differences(by_name["fast"], differing) == ("epochs=3, lr=0.1, schedule=cosine, warmup_epochs=0.5, "
                                                              "early_stopping=None, monitor=val_top1")
    assert by_name["fast"].state == "3/3"
    stuck = by_name["stuck"]
    assert stuck.state.endswith("/6 stopped early") and len(stuck.history) < 6
    assert stuck.best["epoch"] == stuck.summary["best_epoch"]


def test_an_unfinished_or_older_run_counts_with_what_it_kept(runs, tmp_path):
    # A run killed after its second epoch has no summary.json yet, and metrics.csv up to where it got.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "model.safetensors").write_bytes((runs / "fast" / "model.safetensors").read_bytes())
    # Written before distillation existed: settings it lacks are their defaults, not differences.
    config = (runs / "fast" / "config.yaml").read_text().splitlines()
    (tmp_path / "killed" / "config.yaml").write_text("\n".join(line for line in config
                                                               if not line.startswith(("teacher:", "distill_"))))
    lines = (runs / "fast" / "metrics.csv").read_text().splitlines()
    assert lines[0].endswith(",epoch_seconds")  # left out, as a much older run would have it
    (tmp_path / "killed" / "metrics.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines[:3]) + "\n")
    records, differing = compare_runs([runs / "fast", tmp_path / "killed"])
    assert differing == [] and [record.state for record in records] == ["3/3", "2/3 unfinished"]
    assert records[0].seconds > 0 and records[1].seconds == 0


def test_compare_command_prints_the_table_draws_the_curves_and_refuses_what_is_no_run(
        runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["compare", str(runs / "slow"), str(runs / "fast"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "2 training runs, best validation top-1 first" in out and "lr=0.01" in out and "lr=0.1" in out
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert main(["compare", str(tmp_path / "cmp")]) == 2
    assert "neither a training run (no config.yaml) nor a folder of runs" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_compare_on_data_pairs_every_runs_answers_on_the_same_images(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    data = runs.parent / "shapes"
    (tmp_path / "fresh").mkdir()  # a run that has not finished an epoch: no model to score
    (tmp_path / "fresh" / "config.yaml").write_text((runs / "slow" / "config.yaml").read_text())
    assert main(["compare", str(runs), str(tmp_path / "fresh"), "--data", str(data), "--quiet",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"on {data} (test): 100 images, the same for every run" in out
    assert "not scored (no model.safetensors yet): fresh" in out
    assert (tmp_path / "cmp" / "scores.png").stat().st_size > 10_000  # each top-1 with its interval
    scores = json.loads((tmp_path / "cmp" / "scores.json").read_text())
    assert scores["split"] == "test" and [run["images"] for run in scores["runs"]] == [100] * 3
    correct = {}
    for run in scores["runs"]:  # each model's own answers, image by image
        result = evaluate(residual.load_model(f"{run['run']}/model.safetensors"), data, "test", gallery_size=0,
                          workers=0)
        correct[run["run"]] = result.probs.argmax(1) == result.labels
        assert run["top1"] == pytest.approx(correct[run["run"]].mean())
        assert run["top1_ci95"] == pytest.approx(list(wilson_interval(int(correct[run["run"]].sum()), 100)))
    best, *others = scores["runs"]
    assert best["versus_best"] is None and best["top1"] >= max(run["top1"] for run in others)
    for run in others:
        only_best = int((correct[best["run"]] & ~correct[run["run"]]).sum())
        only_it = int((correct[run["run"]] & ~correct[best["run"]]).sum())
        assert run["versus_best"] == {"images": 100, "only_first": only_best, "only_second": only_it,
                                      "p_value": pytest.approx(mcnemar_exact(only_best, only_it))}
        assert only_best - only_it == round(100 * (best["top1"] - run["top1"]))  # the gap is the discordant split's


def test_runs_that_held_out_other_images_of_a_flat_folder_are_not_paired(tmp_path, capsys):
    flat = write_shapes(tmp_path / "shapes", size=16, per_class=8, seed=5, progress=False) / "train"
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["train", str(flat), "--model", "resnet20", "--epochs", "1", "--seed", str(seed), "--quiet",
                     "--no-report", "--out", str(tmp_path / "runs"), "--name", name]) == 0
    # The same seed holds out the same images: they are what is scored, not the ones the runs learned.
    assert main(["compare", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"), "--data", str(flat),
                 "--quiet", "--out", str(tmp_path / "ab")]) == 0
    scores = json.loads((tmp_path / "ab" / "scores.json").read_text())
    assert scores["split"] == "val" and scores["runs"][0]["images"] == 10  # one of each class's 8
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "c"), "--data", str(flat),
                 "--quiet"]) == 2
    assert "so their answers cannot be paired (runs trained on this flat folder with another --val-split or seed" \
        in capsys.readouterr().err
