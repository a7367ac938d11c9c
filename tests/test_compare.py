"""`residual compare`: runs side by side, best first, with what differs between their recipes."""

import pytest

from residual.cli import main
from residual.data.shapes import write_shapes
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
    # What differs: the learning rate, schedule, epochs and early stopping; not the name or folder.
    assert differing == ["epochs", "optim.lr", "optim.schedule", "early_stopping", "monitor"]
    by_name = {record.name: record for record in records}
    assert recipe_differences(by_name["fast"], differing) == ("epochs=3, lr=0.1, schedule=cosine, early_stopping=None, "
                                                              "monitor=val_top1")
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
