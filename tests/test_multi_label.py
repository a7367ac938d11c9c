"""Multi-label classification: a CSV listing any number of labels per image, trained with one sigmoid per
class, evaluated by mAP and F1, predicted and served as the classes over the model's threshold."""

import csv
import io
import json
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import residual
from residual.calibrate import fit_class_temperatures
from residual.cli import main
from residual.deploy.prune import prune
from residual.label_errors import find_label_errors, judge_probabilities, label_suspects
from residual.robustness import robustness
from residual.data.datasets import DatasetError, open_dataset, split_labels
from residual.data.shapes import MULTI_LABEL_CSV, render_shapes, write_multi_label_shapes
from residual.data.transforms import mix_batch, soft_targets
from residual.errors import ConfigError, ResidualError
from residual.evaluate import evaluate, model_labels
from residual.metrics import (bootstrap_indices, bootstrap_maps, label_losses, multi_label_metrics, paired_bootstrap,
                              percentile_interval)
from residual.predict import Prediction, predict, write_csv, write_json, write_labels
from residual.serve import ModelServer, ServeConfig
from residual.train import TrainConfig, load_config, train
from residual.train.config import resolve
from residual.train.loss import label_loss_sum
from residual.train.optim import OptimConfig
from residual.train.preview import target_title
from residual.thresholds import best_f1_threshold, tune_thresholds
from residual.weights import load_model, read_metadata, save_model

# No warm-up: the tests here take a model of two epochs as sure of some labels as it was before runs warmed up.
QUICK = dict(model="resnet20", batch_size=16, optim=OptimConfig(lr=0.05, warmup_epochs=0), quiet=True, report=False)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """The multi-label shapes at 32 px: 60 training images, 12 each for val and test."""
    return write_multi_label_shapes(tmp_path_factory.mktemp("tagged"), size=32, train_images=60, progress=False)


@pytest.fixture(scope="module")
def tagged_run(tagged, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(data=str(tagged / MULTI_LABEL_CSV), epochs=2, out=str(out), name="tagged",
                             **(QUICK | {"report": True})))


def write_rows(folder, header, rows, name="labels.csv"):
    """A CSV of `rows` under `header`, with a small PNG for every image it names."""
    for row in rows:
        image = folder / row[0]
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(row[0]) * 20, 0, 0)).save(image)
    with open(folder / name, "w", newline="") as stream:
        csv.writer(stream).writerows([header, *rows])
    return folder / name


# --- data ---------------------------------------------------------------------------------------------

def test_a_labels_column_lists_any_number_of_classes_per_image_none_included(tmp_path):
    path = write_rows(tmp_path, ("file", "tags", "split"), [
        ("a.png", "cloudy water", "train"), ("b.png", "water  primary", "train"), ("c.png", "", "train"),
        ("d.png", "primary water water", "val"), ("e.png", "cloudy", "test")])
    data = open_dataset(path)
    assert data.multi_label and data.kind == "csv"
    assert data.classes == ["cloudy", "primary", "water"]
    assert data.train.labels == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert data.val.labels == [[0, 1, 1]] and data.test.labels == [[1, 0, 0]]
    assert data.class_counts(data.train) == [1, 1, 2]


def test_a_dataset_file_names_the_separator_and_val_is_a_seeded_share_of_the_images(tmp_path):
    write_rows(tmp_path, ("id", "attributes"), [(f"{i}.png", ["smile;hat", "hat", "smile ; glasses"][i % 3])
                                                 for i in range(20)])
    (tmp_path / "faces.yaml").write_text("csv: labels.csv\nimage_column: id\nlabel_column: attributes\n"
                                         "label_separator: ';'\n")
    data = open_dataset(tmp_path / "faces.yaml", val_split=0.25, seed=3)
    assert data.multi_label and data.classes == ["glasses", "hat", "smile"]
    assert (len(data.train), len(data.val)) == (15, 5)
    again = open_dataset(tmp_path / "faces.yaml", val_split=0.25, seed=3)
    assert again.val.files == data.val.files and again.val.labels == data.val.labels
    assert open_dataset(tmp_path / "faces.yaml", val_split=0.25, seed=4).val.files != data.val.files
    by_file = dict(zip(data.train.files + data.val.files, data.train.labels + data.val.labels))
    assert by_file[tmp_path / "2.png"] == [1, 0, 1]  # "smile ; glasses": spaces around a name are not part of it


def test_a_column_per_class_of_1_and_0_or_minus_1_is_multi_label_too(tmp_path):
    write_rows(tmp_path, ("image_id", "Smiling", "Eyeglasses", "Male", "partition"), [
        ("a.png", "1", "-1", "1", "train"), ("b.png", "-1", "-1", "-1", "train"), ("c.png", "1", "1", "-1", "train"),
        ("d.png", "-1", "1", "1", "val")], name="attributes.csv")
    (tmp_path / "all.yaml").write_text('csv: attributes.csv\nimage_column: image_id\nsplit_column: partition\n'
                                       'label_columns: "*"\n')
    data = open_dataset(tmp_path / "all.yaml")
    assert data.multi_label and data.classes == ["Smiling", "Eyeglasses", "Male"]  # the file's order
    assert data.train.labels == [[1, 0, 1], [0, 0, 0], [1, 1, 0]] and data.val.labels == [[0, 1, 1]]
    (tmp_path / "two.yaml").write_text("csv: attributes.csv\nimage_column: image_id\nsplit_column: partition\n"
                                       "label_columns: [male, smiling]\n")
    two = open_dataset(tmp_path / "two.yaml")
    assert two.classes == ["Male", "Smiling"] and two.train.labels == [[1, 1], [0, 0], [0, 1]]
    for spec, error in [("label_columns: [Age]\n", r"label_columns \['Age'\] are not columns of .*attributes.csv"),
                        ("label_columns: []\n", "label_columns must list the class columns"),
                        ("label_columns: '*'\nlabel_column: Male\n", "drop label_column and label_separator")]:
        (tmp_path / "bad.yaml").write_text("csv: attributes.csv\nimage_column: image_id\n" + spec)
        with pytest.raises(DatasetError, match=error):
            open_dataset(tmp_path / "bad.yaml")
    write_rows(tmp_path, ("image_id", "Smiling", "Male"), [("a.png", "1", "maybe"), ("b.png", "0", "1")],
               name="odd.csv")
    (tmp_path / "odd.yaml").write_text('csv: odd.csv\nimage_column: image_id\nlabel_columns: "*"\n')
    with pytest.raises(DatasetError, match="odd.csv: line 2: Male is 'maybe'; a class column holds 1"):
        open_dataset(tmp_path / "odd.yaml")


def test_split_labels_keeps_the_order_and_drops_repeats_and_blanks():
    assert split_labels("b a  b\tc") == ("b", "a", "c")
    assert split_labels("x|y||x", "|") == ("x", "y")
    assert split_labels("   ") == ()


def test_a_val_class_that_no_training_row_has_is_a_one_line_error(tmp_path):
    path = write_rows(tmp_path, ("image", "labels", "split"),
                      [("a.png", "cat dog", "train"), ("b.png", "dog", "train"), ("c.png", "dog owl", "val")])
    with pytest.raises(DatasetError, match=r"classes \['owl'\] of the val or test rows have no training rows"):
        open_dataset(path)


def test_multi_label_shapes_list_the_shapes_each_image_holds(tagged):
    rows = list(csv.DictReader(open(tagged / MULTI_LABEL_CSV)))
    assert len(rows) == 60 + 12 + 12
    counts = [len(row["labels"].split()) for row in rows]
    assert set(counts) <= {0, 1, 2, 3} and {0, 1, 2, 3} <= set(counts)  # 84 images show every count
    first = rows[0]
    assert np.asarray(Image.open(tagged / first["image"])).shape == (32, 32, 3)
    # Each image is its own seeded drawing: redrawn alone, it is the same picture.
    again = write_multi_label_shapes(tagged.parent / "again", size=32, train_images=60, progress=False)
    assert np.array_equal(np.asarray(Image.open(again / first["image"])),
                          np.asarray(Image.open(tagged / first["image"])))
    # An image with no shapes is background only; one with shapes is not.
    rng = np.random.default_rng(0)
    blank, painted = render_shapes([], 32, np.random.default_rng(0)), render_shapes(["star", "ring"], 32, rng)
    assert not np.array_equal(np.asarray(blank), np.asarray(painted))
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        render_shapes(["blob"], 32, rng)


# --- loss, targets and metrics ------------------------------------------------------------------------

def test_multi_hot_targets_are_smoothed_mixed_and_scored_with_one_sigmoid_per_class():
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.allclose(soft_targets(labels, 4, 0.2), torch.tensor([[0.85, 0.05, 0.85, 0.05], [0.05] * 4]))
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [-3.0, 1.0, 0.0, 2.0]])
    expected = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
    assert torch.allclose(label_loss_sum(logits, labels, labels, "bce", 0.0), expected)
    images = torch.rand(2, 3, 4, 4)
    torch.manual_seed(0)
    mixed, targets = mix_batch(images, labels, 4, mixup=1.0, cutmix=0.0)
    lam = float((mixed[0] - images[1]).flatten()[0] / (images[0] - images[1]).flatten()[0])
    assert torch.allclose(targets[0], lam * labels[0].float() + (1 - lam) * labels[1].float(), atol=1e-5)


def test_multi_label_metrics_match_their_definitions():
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.6], [0.3, 0.8, 0.4], [0.4, 0.7, 0.1], [0.1, 0.6, 0.2]])
    metrics = multi_label_metrics(probs, targets, ["a", "b", "c"], threshold=0.5)
    a, b, c = metrics["per_class"]
    # Class a: positives score 0.9 and 0.4, negatives 0.3 and 0.1: ranked 1st and 2nd, so AP 1, AUC 1.
    assert a["average_precision"] == pytest.approx(1.0) and a["roc_auc"] == pytest.approx(1.0)
    # Class b: positives 0.8, 0.7; negatives 0.6, 0.2: also ranked first. Class c: one positive, ranked first.
    assert b["average_precision"] == pytest.approx(1.0) and c["average_precision"] == pytest.approx(1.0)
    # At 0.5: a predicts image 0 only (recall 1/2), b predicts 1, 2 and 3 (precision 2/3), c image 0 (right).
    assert (a["precision"], a["recall"]) == (1.0, 0.5)
    assert (b["precision"], b["recall"]) == pytest.approx((2 / 3, 1.0))
    assert (c["precision"], c["recall"], c["f1"]) == (1.0, 1.0, 1.0)
    assert metrics["map"] == pytest.approx(1.0)
    tp, called, support = 1 + 2 + 1, 1 + 3 + 1, 2 + 2 + 1
    assert metrics["micro"]["precision"] == pytest.approx(tp / called)
    assert metrics["micro"]["recall"] == pytest.approx(tp / support)
    assert metrics["exact_match"] == pytest.approx(2 / 4)  # images 0 and 1; 2 misses a, 3 calls b
    assert metrics["hamming_loss"] == pytest.approx(2 / 12)
    expected_loss = -np.mean([sum(np.log(p) if t else np.log(1 - p) for p, t in zip(row, truth))
                              for row, truth in zip(probs, targets)])
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert metrics["labels_per_image"] == {"true": pytest.approx(5 / 4), "predicted": pytest.approx(5 / 4)}
    # A wrong ranking lowers AP: class a's positive at 0.4 now below a negative at 0.5.
    worse = probs.copy()
    worse[1, 0] = 0.5
    assert multi_label_metrics(worse, targets, ["a", "b", "c"])["per_class"][0]["average_precision"] == \
        pytest.approx((1 + 2 / 3) / 2)


def test_label_losses_sum_each_classes_binary_cross_entropy():
    probs, targets = np.array([[0.8, 0.1]]), np.array([[1, 0]])
    assert label_losses(probs, targets)[0] == pytest.approx(-np.log(0.8) - np.log(0.9))


def test_a_preview_title_lists_every_class_an_image_has():
    names = ["circle", "ring", "star"]
    assert target_title(torch.tensor([1.0, 0.0, 1.0]), names, multi_label=True) == "circle + star"
    assert target_title(torch.tensor([0.7, 0.3, 1.0]), names, multi_label=True) == "circle 0.70 + ring 0.30 + star"
    assert target_title(torch.zeros(3), names, multi_label=True) == "(no labels)"


# --- training -----------------------------------------------------------------------------------------

def test_a_multi_label_run_trains_sigmoids_and_keeps_the_best_map(tagged_run, tagged):
    run = tagged_run.run_dir
    config = load_config(run / "config.yaml")
    assert (config.loss, config.monitor) == ("bce", "val_map")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert list(rows[0])[:7] == ["epoch", "train_loss", "train_acc", "val_loss", "val_map", "val_f1",
                                 "val_exact_match"]
    best = max(rows, key=lambda row: float(row["val_map"]))
    assert tagged_run.best_epoch == int(best["epoch"])
    meta = read_metadata(run / "model.safetensors")
    assert meta["multi_label"] is True and meta["threshold"] == 0.5
    for name in ("report.html", "pr_curves.png", "reliability.png", "highest_loss.png", "predictions.csv"):
        assert (run / name).is_file(), name
    assert not (run / "confusion_matrix.png").exists()
    # What training recorded for the kept epoch is what evaluating the saved model on val gives.
    model = load_model(run / "model.safetensors")
    result = evaluate(model, open_dataset(tagged / MULTI_LABEL_CSV), "val", gallery_size=0)
    assert result.metrics["map"] == pytest.approx(meta["extra"]["val_map"], abs=1e-5)
    assert result.metrics["loss"] == pytest.approx(meta["extra"]["val_loss"], rel=1e-4)
    assert result.metrics["exact_match"] == pytest.approx(meta["extra"]["val_exact_match"])
    assert result.probs.shape == result.labels.shape == (12, 10)


def test_a_multi_label_model_file_keeps_it_and_its_threshold(tagged_run, tmp_path):
    model = load_model(tagged_run.model_path)
    assert model.multi_label and model.threshold == 0.5
    model.threshold = 0.3
    again = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert again.multi_label and again.threshold == 0.3
    assert not load_model(save_model(residual.create_model("resnet20", num_classes=3),
                                     tmp_path / "single.safetensors")).multi_label


@pytest.mark.parametrize("flags, refused", [
    (dict(loss="ce"), "--loss ce"), (dict(class_weights="auto"), "--class-weights"),
    (dict(monitor="val_top1"), "--monitor val_top1"), (dict(balanced_sampler=True), "--balanced-sampler")])
def test_options_built_on_one_class_per_image_are_refused_for_multi_label_data(tagged, flags, refused):
    with pytest.raises(ConfigError, match=f"is multi-label .*drop {refused}"):
        resolve(TrainConfig(data=str(tagged / MULTI_LABEL_CSV), **flags), open_dataset(tagged / MULTI_LABEL_CSV))


def test_val_map_is_refused_for_single_label_data(tmp_path):
    from residual.data.shapes import write_shapes
    data = write_shapes(tmp_path / "s", size=8, per_class=3, progress=False)
    with pytest.raises(ConfigError, match="--monitor val_map: .* one class per image"):
        resolve(TrainConfig(data=str(data), monitor="val_map"), open_dataset(data))


# --- evaluate, predict, serve -------------------------------------------------------------------------

def test_eval_renumbers_labels_into_the_models_classes_and_refuses_a_single_label_model(tagged_run, tagged):
    model = load_model(tagged_run.model_path)
    data = open_dataset(tagged / MULTI_LABEL_CSV)
    model.class_names = list(reversed(model.class_names))  # the model's own order differs from the data's
    targets = model_labels(data, data.val, model)
    assert np.array_equal(targets, np.asarray(data.val.labels)[:, ::-1])
    single = residual.create_model("resnet20", num_classes=10)
    single.class_names = list(data.classes)
    with pytest.raises(DatasetError, match="multi-label .* the model predicts one class per image"):
        model_labels(data, data.val, single)


def test_a_prediction_is_every_class_over_the_threshold(tagged_run, tagged, tmp_path):
    model = load_model(tagged_run.model_path)
    images = sorted((tagged / "test").glob("*.png"))[:4]
    logits = model(residual.preprocess_input(images, model)).detach()
    probs = logits.sigmoid()
    for threshold in (0.5, 0.2):
        model.threshold = threshold
        for prediction, row in zip(predict(model, images, topk=3).predictions, probs):
            expected = [model.class_names[c] for c in torch.argsort(row, descending=True).tolist()
                        if row[c] >= threshold]
            assert prediction.answer() == expected
            assert [p for _, _, p in prediction.top] == pytest.approx(row.sort(descending=True).values[:3].tolist(),
                                                                      abs=1e-5)


def test_multi_label_predictions_are_written_as_their_classes():
    rows = [Prediction("a.png", [(2, "star", 0.9), (0, "ring", 0.6), (1, "cross", 0.1)],
                       [(2, "star", 0.9), (0, "ring", 0.6)]),
            Prediction("b.png", [(1, "cross", 0.3), (0, "ring", 0.2), (2, "star", 0.1)], [])]
    labels, as_json, as_csv = io.StringIO(), io.StringIO(), io.StringIO()
    write_labels(iter(rows), labels, ("image", "tags"))
    assert labels.getvalue().splitlines() == ["image,tags", "a.png,star ring", "b.png,"]
    write_json(iter(rows), as_json)
    assert [row["labels"] for row in json.loads(as_json.getvalue())] == [["star", "ring"], []]
    write_csv(iter(rows), as_csv, multi_label=True)
    lines = as_csv.getvalue().splitlines()
    assert lines[0].endswith(",present") and lines[1].endswith(",1") and lines[3].endswith(",0")


def test_the_cli_trains_predicts_and_evaluates_multi_label_shapes(tmp_path, capsys):
    assert main(["shapes", str(tmp_path / "tags"), "--multi-label", "--size", "24", "--per-class", "3"]) == 0
    assert "0-3 shapes per image" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "tags" / MULTI_LABEL_CSV), "--model", "resnet20", "--epochs", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "runs"), "--name", "t", "--no-report", "--quiet"]) == 0
    assert "mAP" in capsys.readouterr().out
    model_file = str(tmp_path / "runs" / "t" / "model.safetensors")
    out = tmp_path / "predicted.csv"
    assert main(["predict", model_file, str(tmp_path / "tags" / "test"), "--format", "labels", "--out", str(out),
                 "--quiet"]) == 0
    assert open(out).readline().strip() == "image,label"
    assert main(["eval", model_file, str(tmp_path / "tags" / MULTI_LABEL_CSV), "--out", str(tmp_path / "eval")]) == 0
    assert "mAP" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 10
    assert main(["info", model_file]) == 0
    assert "multi-label: one sigmoid per class" in capsys.readouterr().out
    assert main(["predict", model_file, str(tmp_path / "tags" / "test"), "--threshold", "0.2", "--format", "json",
                 "--topk", "10", "--quiet"]) == 0
    for row in json.loads(capsys.readouterr().out):
        assert row["labels"] == [top["class_name"] for top in row["top"] if top["probability"] >= 0.2]
    single = save_model(residual.create_model("resnet20", num_classes=3), tmp_path / "single.safetensors")
    assert main(["predict", str(single), str(tmp_path / "tags" / "test"), "--threshold", "0.3"]) == 2
    assert "--threshold: " in capsys.readouterr().err


def test_a_served_multi_label_model_answers_the_classes_present(tagged_run, tagged):
    model = load_model(tagged_run.model_path)
    model.threshold = 0.3
    image = sorted((tagged / "test").glob("*.png"))[0]
    with ModelServer(model, ServeConfig(port=0, access_log=False), name="tags") as server:
        body = urllib.request.urlopen(urllib.request.Request(f"{server.url}/predict?topk=2",
                                                             data=image.read_bytes())).read()
        info = json.loads(urllib.request.urlopen(f"{server.url}/info").read())
    [answer] = json.loads(body)["predictions"]
    assert answer["labels"] == predict(model, image).predictions[0].answer()
    assert len(answer["top"]) == 2
    assert info["multi_label"] is True and info["threshold"] == 0.3


def test_label_suspects_are_each_classs_two_way_confident_joint_worst_first():
    targets = np.array([[1, 0], [1, 1], [1, 0], [0, 1], [0, 0], [0, 1]])
    probs = np.array([[0.9, 0.1], [0.8, 0.9], [0.1, 0.2], [0.2, 0.8], [0.1, 0.1], [0.85, 0.7]])
    # Class 0: present ones give it 0.6 on average, absent ones 1 - p = 0.6167: image 2 is surely without it
    # (labelled with it), image 5 surely has it (labelled without). Class 1's answers all stand.
    found = label_suspects(probs, targets)
    assert [image for image, _ in found] == [2, 5]  # its label's probability: 0.1, then 1 - 0.85
    assert [flagged.tolist() for _, flagged in found] == [[True, False], [True, False]]


def test_label_errors_judges_multi_label_data_class_by_class_with_models_that_left_each_image_out(tagged, tmp_path,
                                                                                                    capsys):
    config = TrainConfig(data=str(tagged / MULTI_LABEL_CSV), epochs=1, workers=0, **QUICK)
    result = find_label_errors(tagged / MULTI_LABEL_CSV, tmp_path / "audit", folds=2, config=config)
    data = open_dataset(tagged / MULTI_LABEL_CSV)
    given = {str(file.resolve()): [name for name, flag in zip(data.classes, row) if flag]
             for split in (data.train, data.val, data.test) for file, row in zip(split.files, split.labels)}
    assert result.multi_label and result.images == len(given) == 84 and len(result.fold_scores) == 2
    judged_by = {}
    for fold in (1, 2):  # each fold's listing is a multi-label dataset of every image, as labelled
        listing = open_dataset(tmp_path / "audit" / "folds" / f"fold-{fold}.yaml")
        assert listing.multi_label and listing.classes == data.classes
        for split in (listing.train, listing.val):
            assert all([name for name, flag in zip(data.classes, row) if flag] == given[str(file)]
                       for file, row in zip(split.files, split.labels))
        judged_by.update({str(file): fold for file in listing.val.files})
    assert sorted(judged_by) == sorted(given)
    rows = list(csv.DictReader(open(result.files["table"])))
    assert [row["image"] for row in rows] == [issue.image for issue in result.issues]
    for row in rows:  # the suggestion is the given labels with the edits made
        labels = set(row["given"].split())
        assert labels.isdisjoint(row["missing"].split()) and set(row["wrong"].split()) <= labels
        assert set(row["suggested"].split()) == (labels - set(row["wrong"].split())) | set(row["missing"].split())
        assert row["given"].split() == given[row["image"]]
    probabilities = list(csv.DictReader(open(result.files["probabilities"])))
    assert all(row["given"].split() == given[row["image"]] for row in probabilities)
    assert result.files["picture"].stat().st_size > 1000
    # judged again from its probabilities.csv (6 significant digits): the same suspects and edits
    again = judge_probabilities(tagged / MULTI_LABEL_CSV, result.files["probabilities"], tmp_path / "again")
    assert again.multi_label and sorted((issue.image, issue.change) for issue in again.issues) == sorted(
        (issue.image, issue.change) for issue in result.issues)
    assert main(["label-errors", str(tagged / MULTI_LABEL_CSV), "--model", "resnet20", "--epochs", "1", "--folds",
                 "2", "--batch-size", "16", "--workers", "0", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "fold models' mAP: " in printed


def test_robustness_measures_a_multi_label_model_by_map_from_evals_clean_figures(tagged_run, tagged, tmp_path,
                                                                                capsys):
    model = load_model(tagged_run.model_path).eval()
    metrics = evaluate(model, tagged / MULTI_LABEL_CSV, gallery_size=0).metrics
    result = robustness(model, tagged / MULTI_LABEL_CSV, corruptions=["gaussian_noise", "contrast"],
                        severities=[1, 5], baseline=model, out_dir=tmp_path / "r")
    assert result.metric == "map" and result.images == 12
    assert result.model.clean == pytest.approx(metrics["map"], abs=1e-6)  # every test image, as eval saw it
    assert result.model.clean_ece == pytest.approx(metrics["ece"], abs=1e-6)  # over every (image, class)
    assert result.model.scores["contrast"] != result.model.scores["gaussian_noise"]
    summary = json.loads(result.files["summary"].read_text())
    assert summary["metric"] == "map" and summary["clean_map"] == result.model.clean and "clean_top1" not in summary
    assert summary["mce"] == 1.0  # against itself: the same pixels, the same answers
    assert list(csv.DictReader(open(result.files["table"])))[0]["map"] == f"{metrics['map']:.4f}"
    single = residual.create_model("resnet20", num_classes=len(model.class_names)).eval()
    with pytest.raises(ConfigError, match="^--baseline: a single-label model, and the model is not"):
        robustness(model, tagged / MULTI_LABEL_CSV, corruptions=["contrast"], baseline=single)
    assert main(["robustness", str(tagged_run.model_path), str(tagged / MULTI_LABEL_CSV), "--corruptions", "contrast",
                 "--severities", "3", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.replace("\n", " ")
    assert "mAP on 12 test images" in printed and f"clean mAP {metrics['map']:.2%}" in printed


def test_each_class_temperature_is_the_one_its_labels_were_drawn_with():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 3, generator=generator, dtype=torch.float64)
    drawn_with = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    targets = torch.bernoulli(torch.sigmoid(logits / drawn_with), generator=generator)
    assert fit_class_temperatures(logits.numpy(), targets.numpy()) == pytest.approx([2.0, 0.5, 1.0], rel=0.05)
    targets[:, 1] = 0  # a class never present: nothing to fit, it keeps T = 1
    assert fit_class_temperatures(logits.numpy(), targets.numpy())[1] == 1.0


def test_calibrating_a_multi_label_model_keeps_its_map_and_every_images_labels(tagged_run, tagged, tmp_path,
                                                                               capsys):
    model = load_model(tagged_run.model_path)
    model.threshold = [0.3, 0.4, 0.5, 0.6, 0.7, 0.35, 0.45, 0.55, 0.65, 0.75][:model.num_classes]
    source = save_model(model, tmp_path / "tuned.safetensors")
    out = tmp_path / "calibrated.safetensors"
    assert main(["calibrate", str(source), str(tagged / MULTI_LABEL_CSV), "-o", str(out),
                 "--out", str(tmp_path / "report"), "--quiet"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "per-class temperatures" in printed and "every image's labels unchanged" in printed
    report = json.loads((tmp_path / "report" / "calibration.json").read_text())
    assert report["metric"] == "map" and len(report["temperature"]) == model.num_classes
    assert any(t != 1.0 for t in report["temperature"])
    val = report["splits"]["val"]
    assert val["after"]["nll"] <= val["before"]["nll"] + 1e-9  # T = 1 was one of the choices the fit had
    calibrated = load_model(out)
    assert read_metadata(out)["extra"]["temperature"] == pytest.approx(report["temperature"])
    for split in ("val", "test"):
        before = evaluate(load_model(source), tagged / MULTI_LABEL_CSV, split, gallery_size=0)
        after = evaluate(calibrated, tagged / MULTI_LABEL_CSV, split, gallery_size=0)
        assert after.metrics["map"] == pytest.approx(before.metrics["map"], abs=1e-9)
        assert after.metrics["map"] == pytest.approx(report["splits"][split]["map"], abs=1e-9)
        assert after.metrics["ece"] == pytest.approx(report["splits"][split]["after"]["ece"], abs=1e-4)
        assert after.metrics["loss"] == pytest.approx(report["splits"][split]["after"]["nll"], rel=1e-3)
        assert np.array_equal(after.answers(), before.answers())  # the thresholds moved with the probabilities
    assert calibrated.threshold != model.threshold


def test_explain_gives_each_class_a_multi_label_model_predicts_its_own_heatmap(tagged_run, tagged, tmp_path):
    model = load_model(tagged_run.model_path)
    model.threshold = 0.3
    images = sorted((tagged / "test").glob("*.png"))[:3]
    x = residual.preprocess_input(images, model)
    probs = model(x).detach().sigmoid()
    result = residual.explain(model, images, out_dir=tmp_path)
    expected = [(str(image), c) for image, row in zip(images, probs)
                for c in (torch.argsort(row, descending=True)[(row.sort(descending=True).values >= 0.3)].tolist()
                          or [int(row.argmax())])]
    assert [(e.source, e.class_id) for e in result.explanations] == expected
    first = result.explanations[0]
    assert first.path == tmp_path / f"{images[0].stem}.{first.class_name}.gradcam.png" and first.path.is_file()
    assert first.probability == pytest.approx(float(probs[0, first.class_id]), abs=1e-5)
    assert first.predicted == (first.probability >= 0.3)
    alone = residual.explain(model, images[0], target=first.class_name).explanations[0]
    assert np.allclose(alone.heatmap, first.heatmap, atol=1e-5)  # the heatmap of that class, as asked for alone


def test_decode_predictions_takes_a_multi_label_models_logits_through_each_sigmoid(tagged_run):
    model = load_model(tagged_run.model_path)
    logits = torch.tensor([[2.0, -1.0] + [-5.0] * 8])
    top = residual.decode_predictions(logits, top=2, class_names=model)[0]
    assert [p for _, _, p in top] == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item(),
                                                    torch.sigmoid(torch.tensor(-1.0)).item()])


def test_check_data_counts_labels_and_finds_one_picture_listed_with_two_label_sets(tmp_path):
    from residual.data.check import check_data
    path = write_rows(tmp_path, ("image", "labels"), [("a.png", "cat dog"), ("b.png", "dog"), ("c.png", "")]
                      + [(f"x{i}.png", "cat") for i in range(6)])
    for name in ("a.png", "b.png"):  # the same picture under both names
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    report = check_data(path, progress=False)
    assert [sum(counts) for counts in zip(*report.counts.values())] == [7, 2]  # cat 7 images, dog 2
    assert report.conflicts == [[f"{tmp_path / 'a.png'} (cat dog)", f"{tmp_path / 'b.png'} (dog)"]]


# --- per-class thresholds -----------------------------------------------------------------------------

def test_the_best_f1_threshold_sits_midway_below_the_lowest_score_it_calls():
    scores, positive = np.array([0.9, 0.8, 0.4, 0.3, 0.2]), np.array([1, 0, 1, 1, 0])
    # Calling the top 1, 2, 3, 4, 5 gives F1 2/4, 2/5, 4/6, 6/7, 6/8: the best calls down to 0.3.
    assert best_f1_threshold(scores, positive) == pytest.approx(0.25)
    assert best_f1_threshold(np.array([0.7, 0.2]), np.array([1, 0])) == pytest.approx(0.45)
    assert best_f1_threshold(scores, np.ones(5)) is None and best_f1_threshold(scores, np.zeros(5)) is None


def test_per_class_thresholds_are_fitted_on_val_saved_and_used_by_predict(tagged_run, tagged, tmp_path):
    result = tune_thresholds(tagged_run.model_path, tagged / MULTI_LABEL_CSV, tmp_path / "tuned.safetensors",
                             report_dir=tmp_path / "report")
    val = result.report["splits"]["val"]
    # Each class's F1 on val can only rise (what 0.5 predicts is one of the choices), so their mean does.
    assert val["after"]["f1_macro"] >= val["before"]["f1_macro"]
    assert list(result.report["splits"]) == ["val", "test"]
    assert json.loads((tmp_path / "report" / "thresholds.json").read_text())["thresholds"] == \
        dict(zip(load_model(tagged_run.model_path).class_names, result.thresholds))
    tuned = load_model(result.path)
    assert tuned.threshold == result.thresholds and len(set(result.thresholds)) > 1
    data = open_dataset(tagged / MULTI_LABEL_CSV)
    evaluated = evaluate(tuned, data, "val", gallery_size=0)
    assert evaluated.metrics["macro"]["f1"] == pytest.approx(val["after"]["f1_macro"])
    images = sorted((tagged / "test").glob("*.png"))[:4]
    probs = tuned(residual.preprocess_input(images, tuned)).detach().sigmoid()
    for prediction, row in zip(predict(tuned, images).predictions, probs):
        assert {name for name in prediction.answer()} == {tuned.class_names[c] for c in range(10)
                                                          if row[c] >= result.thresholds[c]}
    # A new head (other classes) starts from the one default threshold.
    assert load_model(result.path, num_classes=4).threshold == 0.5
    with pytest.raises(ConfigError, match="one class per image .* residual calibrate"):
        tune_thresholds(save_model(residual.create_model("resnet20", num_classes=3), tmp_path / "s.safetensors"),
                        tagged / MULTI_LABEL_CSV)


def test_the_thresholds_command_prints_their_effect_and_writes_the_model(tagged_run, tagged, tmp_path, capsys):
    assert main(["thresholds", str(tagged_run.model_path), str(tagged / MULTI_LABEL_CSV), "--out",
                 str(tmp_path / "report"), "-o", str(tmp_path / "tuned.safetensors"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "per-class thresholds fitted on val" in out and "mAP unchanged" in out
    assert isinstance(read_metadata(tmp_path / "tuned.safetensors")["threshold"], list)
    assert main(["info", str(tmp_path / "tuned.safetensors")]) == 0
    assert "(per class " in capsys.readouterr().out


def test_an_onnx_export_carries_the_per_class_thresholds_and_answers_the_same(tagged_run, tagged, tmp_path,
                                                                               capsys):
    from residual.deploy.onnx import OnnxModel, export_onnx
    model = load_model(tagged_run.model_path)
    model.threshold = [0.2 + 0.05 * c for c in range(10)]
    images = sorted((tagged / "test").glob("*.png"))[:6]
    exported = OnnxModel(export_onnx(model, tmp_path / "tags.onnx", images, "test").path)
    assert exported.multi_label and exported.threshold == model.threshold
    onnx_answers = [p.answer() for p in predict(exported, images).predictions]
    assert onnx_answers == [p.answer() for p in predict(model, images).predictions]
    parity = json.loads((tmp_path / "tags.parity.json").read_text())  # agreement of the label sets, not top-1
    assert parity["answers"] == "labels" and parity["agreement"] == 1.0 and "top1_agreement" not in parity
    assert main(["info", str(tmp_path / "tags.onnx")]) == 0  # says its thresholds, as the model file's info does
    assert "reaches the threshold (per class 0.2-0.65)" in " ".join(capsys.readouterr().out.split())


def test_an_executorch_program_carries_the_per_class_thresholds_and_answers_the_same(tagged_run, tagged, tmp_path):
    pytest.importorskip("executorch.runtime")
    from residual.deploy.executorch import ExecuTorchModel, export_executorch
    model = load_model(tagged_run.model_path)
    model.threshold = [0.2 + 0.05 * c for c in range(10)]
    images = sorted((tagged / "test").glob("*.png"))[:6]
    program = ExecuTorchModel(export_executorch(model, tmp_path / "tags.pte", images, "test", max_batch=4).path)
    assert program.multi_label and program.threshold == model.threshold
    assert [p.answer() for p in predict(program, images).predictions] == [
        p.answer() for p in predict(model, images).predictions]
    parity = json.loads((tmp_path / "tags.parity.json").read_text())
    assert parity["answers"] == "labels" and parity["agreement"] == 1.0


def test_an_exports_parity_compares_a_multi_label_models_label_sets_not_its_top_class(tagged_run, tagged):
    from residual.deploy.exported import parity
    model = load_model(tagged_run.model_path).eval()
    images = sorted((tagged / "test").glob("*.png"))

    def one_more_label(x):  # the top class kept, and the least likely class put just over 0.5 everywhere
        logits = model(x).detach().clone()
        rows = torch.arange(len(logits))
        logits[rows, logits.argmin(1)] = torch.minimum(logits.max(1).values - 1e-3, torch.full((len(x),), 0.01))
        return logits

    checked = parity(model, one_more_label, images, "test", tolerance=100.0)
    assert checked.answers == "labels" and checked.agreement < 0.5 and not checked.passed


def test_quantize_and_prune_judge_a_multi_label_model_by_its_map(tagged_run, tagged, tmp_path):
    from residual.deploy.onnx import OnnxModel
    from residual.deploy.quantize import quantize
    data = open_dataset(tagged / MULTI_LABEL_CSV)
    result = quantize(tagged_run.model_path, tagged / MULTI_LABEL_CSV, tmp_path / "tags.int8.onnx", max_drop=100)
    report = result.report
    assert report["metric"] == "map" and "top1" not in report["float"] and "top1_agreement" not in report
    assert report["drop_points"] == pytest.approx(100 * (report["float"]["map"] - report["int8"]["map"]), abs=1e-3)
    int8 = OnnxModel(result.path)
    assert int8.multi_label and int8.threshold == 0.5
    assert report["int8"]["map"] == pytest.approx(evaluate(int8, data, "val", gallery_size=0).metrics["map"])
    versus = report["versus_float"]
    assert versus["images"] == 12 and 0.0 <= report["agreement"] <= 1.0
    model = load_model(tagged_run.model_path)
    model.threshold = [0.3] * 10
    save_model(model, tmp_path / "tuned.safetensors")
    pruned = prune(tmp_path / "tuned.safetensors", tagged / MULTI_LABEL_CSV, tmp_path / "pruned.safetensors",
                   amount=0.25, epochs=0)
    assert pruned.report["metric"] == "map"
    assert pruned.report["before"]["map"] == pytest.approx(evaluate(model, data, "val", gallery_size=0).metrics["map"])
    kept = load_model(pruned.path)
    assert kept.multi_label and kept.threshold == [0.3] * 10  # pruned, not retrained: its thresholds still hold


def test_training_from_a_model_with_per_class_thresholds_starts_again_from_one(tagged_run, tagged, tmp_path):
    model = load_model(tagged_run.model_path)
    model.threshold = [0.3] * 10
    start = save_model(model, tmp_path / "tuned.safetensors")
    result = train(TrainConfig(data=str(tagged / MULTI_LABEL_CSV), pretrained=str(start), epochs=1,
                               out=str(tmp_path), name="again", **QUICK))
    assert load_model(result.model_path).threshold == 0.5  # fitted to the old weights, not to the new ones


def test_a_soup_of_multi_label_models_is_chosen_by_map(tagged_run, tagged, tmp_path):
    from residual.soup import soup
    again = train(TrainConfig(data=str(tagged / MULTI_LABEL_CSV), pretrained=str(tagged_run.model_path), epochs=1,
                              out=str(tmp_path), name="again", **QUICK))
    result = soup([tagged_run.model_path, again.model_path], tagged / MULTI_LABEL_CSV, tmp_path / "soup.safetensors")
    data = open_dataset(tagged / MULTI_LABEL_CSV)
    assert result.metric == "map" and set(result.test[result.ingredients[0]]) == {"map"}
    for path in (tagged_run.model_path, again.model_path):
        assert result.held_out[str(path)] == pytest.approx(
            evaluate(load_model(path), data, "val", gallery_size=0).metrics["map"])
    assert load_model(result.path).multi_label
    single = residual.create_model("resnet20", num_classes=10)
    single.class_names = list(data.classes)
    with pytest.raises(ConfigError, match="output \\(single- or multi-label\\) differs"):
        soup([tagged_run.model_path, save_model(single, tmp_path / "single.safetensors")], tagged / MULTI_LABEL_CSV,
             tmp_path / "mixed.safetensors")


def test_compare_ranks_multi_label_runs_by_map_and_keeps_them_apart_from_single_label_ones(tagged_run, tagged,
                                                                                            tmp_path, capsys):
    from residual.data.shapes import write_shapes
    from residual.tables import runs_table
    from residual.train.compare import compare_runs
    from residual.train.history import plot_runs
    shorter = train(TrainConfig(data=str(tagged / MULTI_LABEL_CSV), epochs=1, out=str(tmp_path), name="shorter",
                                **QUICK))
    records, differing = compare_runs([tagged_run.run_dir, shorter.run_dir])
    maps = [read_metadata(record.path / "model.safetensors")["extra"]["val_map"] for record in records]
    assert maps == sorted(maps, reverse=True) and [record.score for record in records] == ["val_map"] * 2
    assert "epochs" in differing
    assert runs_table(records, differing).columns[1].header == "val mAP"
    plot_runs([(record.name, record.history) for record in records], tmp_path / "compare.png")
    # On data: each run's mAP with a bootstrap interval, the gap to the best tested on the same resamples.
    assert main(["compare", str(tagged_run.run_dir), str(shorter.run_dir), "--data", str(tagged / MULTI_LABEL_CSV),
                 "--quiet", "--out", str(tmp_path / "cmp")]) == 0
    assert "the gap to the best by a paired bootstrap of mAP" in " ".join(capsys.readouterr().out.split())
    scored = json.loads((tmp_path / "cmp" / "scores.json").read_text())["runs"]
    results = [evaluate(load_model(f"{run['run']}/model.safetensors"), tagged / MULTI_LABEL_CSV, "test",
                        gallery_size=0) for run in scored]
    resamples = bootstrap_indices(12)
    replicates = [bootstrap_maps(result.probs, result.labels, resamples) for result in results]
    for run, result, maps in zip(scored, results, replicates):
        assert run["map"] == pytest.approx(result.metrics["map"]) and run["images"] == 12
        assert run["map_ci95"] == pytest.approx(list(percentile_interval(maps)))
    assert scored[0]["versus_best"] is None and scored[0]["map"] >= scored[1]["map"]
    versus = scored[1]["versus_best"]
    assert versus["difference"] == pytest.approx(scored[0]["map"] - scored[1]["map"])
    assert versus["p_value"] == pytest.approx(paired_bootstrap(*replicates)["p_value"])
    assert versus["only_first"] == int((results[0].right() & ~results[1].right()).sum())  # exact matches
    assert (tmp_path / "cmp" / "scores.png").stat().st_size > 0
    single = train(TrainConfig(data=str(write_shapes(tmp_path / "s", size=8, per_class=3, progress=False)), epochs=1,
                               out=str(tmp_path), name="single", **QUICK))
    with pytest.raises(ResidualError, match="shorter: multi-label, ranked by validation mAP"):
        compare_runs([single.run_dir, shorter.run_dir])


def test_unknown_images_of_a_multi_label_model_are_counted_by_the_labels_they_get(tagged_run, tagged, tmp_path):
    model = load_model(tagged_run.model_path)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 90)).save(unknown / f"{i}.png")
    result = evaluate(model, tagged / MULTI_LABEL_CSV, "val", out_dir=tmp_path / "report", gallery_size=0,
                      unknown=unknown)
    labelled = (result.unknown_probs >= result.thresholds).any(1).mean()
    assert result.metrics["unknown"]["labelled"] == pytest.approx(labelled)
    assert result.metrics["unknown"]["unknown_images"] == 6 and "nearest" in result.metrics["unknown"]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Unknown images</h2>" in page and "--min-confidence" not in page  # a threshold per class instead
    with pytest.raises(ConfigError, match="--min-confidence: a multi-label model answers"):
        list(residual.predict(model, unknown, min_confidence=0.5).predictions)
