"""`residual eval`: metrics that agree with a direct computation, and a report that stands alone."""

import copy
import csv
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import residual
from residual import load_model
from residual.calibrate import calibrate
from residual.cli import main
from residual.data.check import check_data
from residual.data.datasets import DatasetError, open_dataset
from residual.data.decode import read_image
from residual.data.shapes import write_shapes
from residual.errors import ConfigError
from residual.data.transforms import normalize, resize_center_crop
from residual.deploy.prune import prune
from residual.embed import embed
from residual.feature_bank import FeatureBank
from residual.evaluate import bank_images, evaluate, split_as_trained
from residual.metrics import ranking_scores
from residual.predict import class_probabilities, predict
from residual.train import TrainConfig, train
from cifar_files import write_cifar10


@pytest.fixture(scope="module")
def model(demo_run):
    return load_model(demo_run["model"]).eval()


def test_eval_metrics_agree_with_the_model_run_directly(model, demo_run, tmp_path):
    result = evaluate(model, demo_run["data"], out_dir=tmp_path / "report")
    assert result.metrics["images"] == len(result.sources) == 1200  # the test split, by default
    assert all("/test/" in source for source in result.sources)
    # Probabilities of a few images, computed by hand from their files.
    pre = model.preprocessing
    picks = [0, 500, 1199]
    images = torch.stack([resize_center_crop(read_image(result.sources[i]), pre.resize_size, pre.input_size)
                          for i in picks])
    with torch.inference_mode():
        direct = model(normalize(images.float() / 255, pre)).softmax(1).numpy()
    np.testing.assert_allclose(result.probs[picks], direct, atol=1e-5)
    predicted = result.probs.argmax(1)
    assert result.metrics["top1"] == pytest.approx((predicted == result.labels).mean())
    assert result.metrics["top1"] >= 0.95
    names = model.class_names
    assert [names[i] for i in result.labels[picks]] == [re.split(r"/", s)[-2] for s in np.array(result.sources)[picks]]
    matrix = np.array(result.metrics["confusion_matrix"])
    assert matrix.sum() == 1200 and np.trace(matrix) == (predicted == result.labels).sum()


def test_report_is_self_contained_and_matches_metrics_json(model, demo_run, tmp_path):
    result = evaluate(model, demo_run["data"], split="val", out_dir=tmp_path, gallery_size=4)
    for name in ("metrics.json", "confusion_matrix.png", "reliability.png", "roc_curves.png", "highest_loss.png",
                 "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == result.metrics["top1"] and saved["split"] == "val"
    assert saved["per_class"][3]["roc_auc"] == ranking_scores(result.probs[:, 3], result.labels == 3)[0] > 0.9
    assert len(saved["highest_loss"]) == 4
    losses = [item["loss"] for item in saved["highest_loss"]]
    assert losses == sorted(losses, reverse=True)
    true_probs = result.probs[np.arange(len(result.labels)), result.labels]
    assert max(losses) == pytest.approx(float((-np.log(true_probs)).max()), rel=1e-4)
    page = (tmp_path / "report.html").read_text()
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch: it opens offline
    assert f"{result.metrics['top1']:.2%}" in page
    # predictions.csv: every image of the split, in its order, agreeing with the probabilities and metrics.json.
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == result.sources and len(rows) == saved["images"]
    names = model.class_names
    assert [row["true"] for row in rows] == [names[label] for label in result.labels]
    assert [row["predicted"] for row in rows] == [names[i] for i in result.probs.argmax(1)]
    assert [float(row["true_probability"]) for row in rows] == pytest.approx(true_probs.tolist(), abs=1e-6)
    assert np.mean([int(row["correct"]) for row in rows]) == pytest.approx(saved["top1"])
    assert np.mean([float(row["loss"]) for row in rows]) == pytest.approx(saved["loss"], rel=1e-4)
    worst = max(rows, key=lambda row: float(row["loss"]))
    assert worst["image"] == saved["highest_loss"][0]["source"]


def test_gallery_explains_the_predicted_and_the_true_class(model, demo_run):
    result = evaluate(model, demo_run["data"], gallery_size=3)
    for item in result.gallery:
        assert item.cam_predicted.shape == item.cam_true.shape == (32, 32)
        assert item.cam_predicted.max() == pytest.approx(1.0)
        if item.true != item.predicted:
            assert not np.allclose(item.cam_predicted, item.cam_true)


def test_flip_tta_averages_the_image_and_its_mirror(model, demo_run, tmp_path):
    for name in model.class_names[::2]:  # half the test split keeps the three evaluations quick
        shutil.copytree(demo_run["data"] / "test" / name, tmp_path / "half" / name)
    plain = evaluate(model, tmp_path / "half", gallery_size=0)
    flipped = evaluate(model, tmp_path / "half", tta="flip", gallery_size=0)
    shifted = evaluate(model, tmp_path / "half", tta="flip-shift", gallery_size=0)
    assert plain.metrics["images"] == 600
    pre = model.preprocessing
    images = torch.stack([resize_center_crop(read_image(s), pre.resize_size, pre.input_size)
                          for s in plain.sources[:8]])
    with torch.inference_mode():
        x = normalize(images.float() / 255, pre)
        expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    np.testing.assert_allclose(flipped.probs[:8], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(class_probabilities(model, images, "flip"), expected, atol=1e-5)
    assert not np.allclose(shifted.probs, flipped.probs)
    for result in (flipped, shifted):
        assert result.metrics["top1"] >= plain.metrics["top1"] - 0.01


def test_a_flat_folder_is_renumbered_into_the_models_classes(model, demo_run, tmp_path):
    for name in ("star", "circle"):
        shutil.copytree(demo_run["data"] / "test" / name, tmp_path / "mine" / name)
    (tmp_path / "mine" / "star" / "broken.png").write_bytes(b"not a png")
    result = evaluate(model, tmp_path / "mine", gallery_size=0)
    assert result.metrics["images"] == 240  # a flat folder is evaluated whole
    assert set(model.class_names[i] for i in result.labels) == {"star", "circle"}
    assert len(result.failed) == 1 and "broken.png" in result.failed[0]
    assert result.metrics["top1"] >= 0.95
    with pytest.raises(DatasetError, match="mine: no test split; choose --split from train, val or all"):
        evaluate(model, tmp_path / "mine", split="test")
    (tmp_path / "mine" / "dodecagon").mkdir()
    shutil.copy(demo_run["data"] / "test" / "star" / "00000.png", tmp_path / "mine" / "dodecagon" / "a.png")
    with pytest.raises(DatasetError, match=r"\['dodecagon'\] are not classes of the model"):
        evaluate(model, tmp_path / "mine")


def test_cli_eval_prints_tables_and_writes_the_report(demo_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "eval"
    assert main(["eval", str(demo_run["model"]), str(demo_run["data"]), "--split", "val", "--out", str(out),
                 "--gallery", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for text in ("top-1", "ECE", "macro avg", "weighted avg", "most confused", "report.html", "macro ROC AUC",
                 "roc_curves.png", "accepting only predictions at least this sure"):
        assert text in printed
    assert (out / "report.html").is_file() and (out / "roc_curves.png").is_file()
    assert "<h2>ROC curves</h2>" in (out / "report.html").read_text()
    low, high = json.loads((out / "metrics.json").read_text())["top1_ci95"]  # how sure the top-1 is
    assert f"{low:.2%} - {high:.2%}" in printed and f"{low:.2%} - {high:.2%}" in (out / "report.html").read_text()
    # The demo model's label smoothing leaves it under-confident (ECE 0.10): eval points to the remedy.
    assert f"`residual calibrate {demo_run['model']} {demo_run['data']}` fits temperature scaling" in printed
    with pytest.raises(SystemExit):
        main(["eval", str(demo_run["model"]), str(demo_run["data"]), "--tta", "sideways"])
    assert main(["eval", str(demo_run["model"]), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nowhere" in err


def test_eval_and_prune_on_the_flat_folder_a_model_trained_on_keep_its_held_out_images(tmp_path, capsys):
    flat = tmp_path / "photos"
    shutil.copytree(write_shapes(tmp_path / "shapes", size=16, per_class=8, seed=2, progress=False) / "train", flat)
    result = train(TrainConfig(data=str(flat), model="resnet20", epochs=1, batch_size=32, val_split=0.25, seed=3,
                               quiet=True, report=False, out=str(tmp_path / "runs"), name="flat"))
    held_out = split_as_trained(result.model_path, flat)
    assert held_out.val.files == open_dataset(flat, 0.25, 3).val.files and len(held_out.val) == 20
    assert main(["eval", str(result.model_path), str(flat), "--gallery", "0", "--quiet",
                 "--out", str(tmp_path / "eval")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the data" in printed and "was trained on, so its 20 images that training held out" in printed
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 20  # it scored all 80
    assert main(["eval", str(result.model_path), str(flat), "--split", "all", "--gallery", "0", "--quiet",
                 "--out", str(tmp_path / "all")]) == 0
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["images"] == 80
    assert split_as_trained(result.model_path, tmp_path / "shapes") is None  # another folder: used as it is
    # prune fine-tunes on the train split and reports top-1 on val: the run's, not the default tenth with seed 0
    pruned = prune(result.model_path, flat, tmp_path / "pruned.safetensors", epochs=1, batch_size=32,
                   runs=str(tmp_path / "prune"))
    config = yaml.safe_load((pruned.run_dir / "config.yaml").read_text())
    assert (config["val_split"], config["seed"]) == (0.25, 3)
    # quantize calibrates on the run's 60 training images (the default split has 72) and compares on its 20 held out
    assert main(["quantize", str(result.model_path), "--calib", str(flat), "--calib-size", "100", "--force",
                 "-o", str(tmp_path / "int8.onnx"), "--quiet"]) == 0
    assert "(split as the model was trained)" in " ".join(capsys.readouterr().out.split())
    report = json.loads((tmp_path / "int8.quantize.json").read_text())
    assert (report["images"], report["calibration"]["images"], report["split_as_trained"]) == (20, 60, True)
    # calibrate fits its temperature on those 20 held-out images too
    calibrated = calibrate(result.model_path, flat, tmp_path / "calibrated.safetensors")
    assert calibrated.report["split_as_trained"] and calibrated.report["splits"]["val"]["images"] == 20


def _trained_and_evaluated(data, shapes, tmp_path):
    """A resnet20 trained one epoch on `data` (80 shapes, no split column) -> its model file, evaluated:
    like a flat folder, eval scores the 40 images training held out, not the 80."""
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--batch-size", "32",
                 "--val-split", "0.5", "--quiet", "--no-report", "--out", str(tmp_path / "runs")]) == 0
    (model_file,) = (tmp_path / "runs").glob("*/model.safetensors")
    assert load_model(model_file).class_names == sorted(path.name for path in (shapes / "train").iterdir())
    assert main(["eval", str(model_file), str(data), "--gallery", "0", "--quiet",
                 "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 40
    return model_file


def test_a_csv_of_labels_trains_evaluates_and_is_checked_like_a_folder(tmp_path, capsys):
    shapes = write_shapes(tmp_path / "shapes", size=16, per_class=8, seed=2, progress=False)
    images = sorted((shapes / "train").glob("*/*.png"))  # 80: 8 of each of 10 classes
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"{path.relative_to(tmp_path)},{path.parent.name}\n"
                                                 for path in images))
    model_file = _trained_and_evaluated(labels, shapes, tmp_path)
    assert model_file == tmp_path / "runs" / "resnet20-labels" / "model.safetensors"
    assert "was trained on, so its 40 images that training held out" in " ".join(capsys.readouterr().out.split())
    calibrated = calibrate(model_file, labels, tmp_path / "calibrated.safetensors")  # fitted on those 40 too
    assert calibrated.report["split_as_trained"] and calibrated.report["splits"]["val"]["images"] == 40
    # One image listed under a second class: check-data names the labelling error; one listed twice, the repeat.
    with labels.open("a") as f:
        f.write(f"{images[0].relative_to(tmp_path)},star\n{images[1].relative_to(tmp_path)},{images[1].parent.name}\n")
    assert main(["check-data", str(labels)]) == 1
    out = capsys.readouterr().out
    assert f"{labels} (csv, 10 classes)" in out
    assert "listed 2 times" in out and f"{images[1].name} = " not in out
    assert check_data(labels, progress=False).conflicts == [[f"{images[0]} ({images[0].parent.name})",
                                                             f"{images[0]} (star)"]]


def test_a_dataset_file_trains_evaluates_and_predicts_a_kaggle_style_csv(tmp_path, capsys, monkeypatch):
    # Kaggle's layout: images named by id in one folder, their classes in labels.csv (id,breed), and the
    # images to predict in sample_submission.csv (id and a column per class, here ignored).
    shapes = write_shapes(tmp_path / "shapes", size=16, per_class=8, seed=2, progress=False)
    images = sorted((shapes / "train").glob("*/*.png"))
    (tmp_path / "kaggle" / "train").mkdir(parents=True)
    for number, path in enumerate(images):
        shutil.copy(path, tmp_path / "kaggle" / "train" / f"{number:04d}.png")
    (tmp_path / "kaggle" / "labels.csv").write_text(
        "id,breed\n" + "".join(f"{number:04d},{path.parent.name}\n" for number, path in enumerate(images)))
    classes = ",".join(sorted(folder.name for folder in (shapes / "train").iterdir()))
    (tmp_path / "kaggle" / "sample_submission.csv").write_text(f"id,{classes}\n0007{',0.1' * 10}\n0003{',0.1' * 10}\n")
    described = tmp_path / "kaggle" / "shapes.yaml"
    described.write_text("csv: labels.csv\nimage_column: id\nlabel_column: breed\nimages: train\nsuffix: .png\n")
    (tmp_path / "kaggle" / "test.yaml").write_text(
        "csv: sample_submission.csv\nimage_column: id\nimages: train\nsuffix: .png\n")
    model_file = _trained_and_evaluated(described, shapes, tmp_path)
    assert model_file == tmp_path / "runs" / "resnet20-shapes" / "model.safetensors"  # named after the file
    monkeypatch.chdir(tmp_path)  # where calibrate's default runs/calibrate/MODEL-DATA is made
    assert main(["calibrate", str(model_file), str(described), "--quiet"]) == 0
    assert (tmp_path / "runs" / "calibrate" / "model-shapes" / "calibration.json").is_file()
    capsys.readouterr()
    # The test set's predictions are a submission: its ids, under its id column, in its order.
    test = str(tmp_path / "kaggle" / "test.yaml")
    assert main(["predict", str(model_file), test, "--topk", "1", "--format", "csv", "--quiet"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [row["id"] for row in rows] == ["0007", "0003"]
    assert main(["predict", str(model_file), test, "--format", "labels", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == ["id,label", *(f"{row['id']},{row['class_name']}" for row in rows)]
    assert main(["predict", str(model_file), test, "--format", "probabilities", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"id,{classes}"  # the sample submission's header
    (tmp_path / "kaggle" / "test.yaml").write_text(
        "csv: sample_submission.csv\nimage_column: id\nlabel_column: breed\nimages: train\nsuffix: .png\n")
    assert main(["predict", str(model_file), test, "--format", "labels", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "id,breed"  # the label column it names


def test_eval_and_predict_at_another_image_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the title line names long paths
    data = write_shapes(tmp_path / "shapes", size=32, per_class=5, seed=2, progress=False)
    model = residual.create_model("resnet20", num_classes=10).eval()
    model.class_names = sorted(path.name for path in (data / "train").iterdir())
    model.preprocessing = residual.Preprocessing(input_size=32, resize_size=36)
    residual.save_model(model, tmp_path / "model.safetensors")
    assert main(["eval", str(tmp_path / "model.safetensors"), str(data), "--split", "val", "--image-size", "48",
                 "--gallery", "0", "--quiet", "--out", str(tmp_path / "eval")]) == 0
    assert re.search(r"[0-9] images, 48 px", capsys.readouterr().out)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (saved["input_size"], saved["resize_size"]) == (48, 54)  # the resize keeps its ratio to the crop
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        first = next(csv.DictReader(f))
    pixels = resize_center_crop(read_image(first["image"]), 54, 48)
    with torch.inference_mode():
        direct = model(normalize(pixels[None].float() / 255, residual.Preprocessing(48, 54))).softmax(1)[0]
    assert float(first["probability"]) == pytest.approx(direct.max().item(), abs=1e-5)
    assert main(["predict", str(tmp_path / "model.safetensors"), first["image"], "--image-size", "48", "--format",
                 "csv", "--topk", "1", "--quiet"]) == 0
    assert f"{direct.max().item():.6f}" in capsys.readouterr().out
    (tmp_path / "model.onnx").write_bytes(b"")
    assert main(["predict", str(tmp_path / "model.onnx"), first["image"], "--image-size", "48"]) == 2
    assert "was exported for one input size" in capsys.readouterr().err


def test_ten_crop_averages_the_ten_crops_of_the_resized_image_in_eval_and_predict(model, demo_run, tmp_path):
    with pytest.raises(ConfigError, match="--tta ten-crop cuts 32 px crops from the image resized to 32 px"):
        evaluate(model, demo_run["data"], tta="ten-crop")  # the demo model takes its 32 px images whole
    wider = copy.deepcopy(model)
    wider.preprocessing = dataclasses.replace(model.preprocessing, resize_size=40)  # 32 px crops of 40 px images
    for name in model.class_names[:2]:
        shutil.copytree(demo_run["data"] / "test" / name, tmp_path / "few" / name)
    result = evaluate(wider, tmp_path / "few", tta="ten-crop", gallery_size=0, out_dir=tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["tta"] == "ten-crop"
    squares = torch.stack([resize_center_crop(read_image(source), 40, 40) for source in result.sources[:4]])
    with torch.inference_mode():
        x = normalize(squares.float() / 255, wider.preprocessing)
        crops = [x[..., top:top + 32, left:left + 32] for top, left in ((0, 0), (0, 8), (8, 0), (8, 8), (4, 4))]
        expected = torch.stack([wider(view).softmax(1) for crop in crops for view in (crop, crop.flip(3))]).mean(0)
    np.testing.assert_allclose(result.probs[:4], expected.numpy(), atol=1e-5)
    predicted = residual.predict(wider, result.sources[:4], topk=1, tta="ten-crop").predictions
    assert [p.top[0][2] for p in predicted] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)
    plain = evaluate(wider, tmp_path / "few", gallery_size=0)
    assert not np.allclose(plain.probs, result.probs)


def test_cifar_in_memory_images_are_evaluated_with_their_positions(tmp_path):
    import pickle

    from residual import create_model
    from residual.models.preprocessing import CIFAR_EVAL

    folder = write_cifar10(tmp_path / "cifar-10-batches-py", train=4, test=6)
    model = create_model("resnet20", num_classes=10).eval()
    model.class_names, model.preprocessing = [f"c{i}" for i in range(10)], CIFAR_EVAL
    result = evaluate(model, folder, out_dir=tmp_path / "report", gallery_size=2)
    assert result.sources == [f"val#{i}" for i in range(6)]  # CIFAR's test batch is its validation split
    images = torch.from_numpy(np.frombuffer(pickle.loads((folder / "test_batch").read_bytes())[b"data"],
                                            dtype=np.uint8).reshape(6, 3, 32, 32).copy())
    np.testing.assert_allclose(result.probs, class_probabilities(model, images), atol=1e-5)
    assert (tmp_path / "report" / "highest_loss.png").is_file()


@pytest.fixture(scope="module")
def unknown_folder(tmp_path_factory):
    """Images of none of the demo's classes: uniform noise and flat colours, in two subfolders, and a file
    that is no image."""
    folder = tmp_path_factory.mktemp("unknown")
    rng = np.random.default_rng(0)
    (folder / "noise").mkdir()
    (folder / "flat").mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "noise" / f"{i}.png")
        Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(0, 256, 3))).save(folder / "flat" / f"{i}.png")
    (folder / "flat" / "broken.png").write_bytes(b"no image")
    return folder


def test_unknown_images_are_scored_and_the_floor_eval_suggests_is_the_one_predict_applies(
        model, demo_run, unknown_folder, tmp_path, capsys, monkeypatch):
    result = evaluate(model, demo_run["data"], "val", out_dir=tmp_path / "report", gallery_size=0,
                      unknown=unknown_folder)
    unknown = result.metrics["unknown"]
    assert (unknown["known_images"], unknown["unknown_images"]) == (1200, 60)
    assert any("broken.png" in line for line in result.failed)  # reported, not dropped
    # The unknown images' probabilities are predict's for the same files.
    predicted = predict(model, unknown_folder).predictions
    assert [p.source for p in predicted] == result.unknown_sources
    assert result.unknown_probs.max(1) == pytest.approx([p.top[0][2] for p in predicted], abs=1e-6)
    # The floor keeps at least 95% of the known images and is the highest four-decimal one that does.
    known = result.probs.max(1)
    assert (known >= unknown["floor"]).mean() >= 0.95 > (known >= unknown["floor"] + 1e-4).mean()
    assert unknown["at_floor"]["unknown_passed"] == pytest.approx((result.unknown_probs.max(1) >= unknown["floor"])
                                                                  .mean())
    # The second score: the cosine similarity of an image's pooled features (embed's) to the nearest training
    # image's, the whole training split in the bank.
    nearest = unknown["nearest"]
    train = open_dataset(demo_run["data"]).train
    assert (nearest["k"], nearest["bank_images"]) == (1, len(train)) == (1, len(result.bank.features))
    # Its rows are embed's features of the training images, in the split's order, made unit length.
    rows = [0, len(train) // 2, len(train) - 1]
    embedded = embed(model, [train.files[i] for i in rows]).features
    np.testing.assert_allclose(result.bank.features[rows].numpy(),
                               embedded / np.linalg.norm(embedded, axis=1, keepdims=True), atol=1e-5)
    bank = result.bank.features.numpy()
    for i in (0, 31):
        feature = embed(model, [result.unknown_sources[i]]).features[0]
        assert result.unknown_similarity[i] == pytest.approx((bank @ feature).max() / np.linalg.norm(feature),
                                                             abs=1e-5)
    assert (result.known_similarity >= nearest["floor"]).mean() >= 0.95
    assert nearest["roc_auc"] > 0.9 > unknown["roc_auc"]  # noise fools the probability, not the features
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())["unknown"]
    assert saved["floor"] == unknown["floor"] and saved["folder"] == str(unknown_folder)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Unknown images</h2>" in page and f"{unknown['floor']:.4f}" in page
    assert (tmp_path / "report" / "unknown.png").is_file()

    # The command line prints the floor; predict with it turns away the images eval said it would.
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "cli"
    assert main(["eval", str(demo_run["model"]), str(demo_run["data"]), "--split", "val", "--unknown",
                 str(unknown_folder), "--out", str(out), "--gallery", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"--min-confidence {unknown['floor']:.4f} (predict, serve) keeps" in printed
    assert "telling 60 unknown images from the 1,200 known" in printed and "similarity to the nearest" in printed
    floor = str(unknown["floor"])
    answers = tmp_path / "answers.json"
    assert main(["predict", str(demo_run["model"]), str(unknown_folder), "--min-confidence", floor, "--out",
                 str(answers), "--quiet"]) == 1  # the broken file
    rows = json.loads(answers.read_text())
    assert np.mean([row["unsure"] for row in rows]) == pytest.approx(1 - unknown["at_floor"]["unknown_passed"])
    labels = tmp_path / "labels.csv"
    main(["predict", str(demo_run["model"]), str(unknown_folder), "--min-confidence", floor, "--format", "labels",
          "--out", str(labels), "--quiet"])
    with open(labels, newline="") as stream:
        written = list(csv.DictReader(stream))
    assert [row["label"] == "" for row in written] == [row["unsure"] for row in rows]
    # The feature bank eval wrote does the same for the similarity, in predict and in the Python API.
    bank_file = tmp_path / "report" / "feature_bank.safetensors"
    assert result.files["feature_bank"] == bank_file
    assert main(["predict", str(demo_run["model"]), str(unknown_folder), "--feature-bank", str(bank_file),
                 "--out", str(answers), "--quiet"]) == 1
    rows = json.loads(answers.read_text())
    assert np.mean([row["unsure"] for row in rows]) == pytest.approx(1 - nearest["at_floor"]["unknown_passed"])
    assert [row["similarity"] for row in rows] == pytest.approx(result.unknown_similarity.tolist(), abs=1e-5)
    as_csv = tmp_path / "answers.csv"
    main(["predict", str(demo_run["model"]), str(unknown_folder), "--feature-bank", str(bank_file), "--format", "csv",
          "--topk", "1", "--out", str(as_csv), "--quiet"])
    with open(as_csv, newline="") as stream:
        assert [float(row["similarity"]) for row in csv.DictReader(stream)] == pytest.approx(
            [row["similarity"] for row in rows], abs=1e-5)
    val = sorted((demo_run["data"] / "val").rglob("*.png"))
    kept = [not p.unsure for p in predict(model, val, min_confidence=unknown["floor"]).predictions]
    assert np.mean(kept) == pytest.approx(unknown["at_floor"]["coverage"])
    kept = [not p.unsure for p in predict(model, val, feature_bank=FeatureBank.load(bank_file)).predictions]
    assert np.mean(kept) == pytest.approx(nearest["at_floor"]["coverage"])


def test_unknown_and_min_confidence_refuse_what_they_cannot_use(demo_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for given in (tmp_path / "empty", demo_run["model"]):
        assert main(["eval", str(demo_run["model"]), str(demo_run["data"]), "--unknown", str(given),
                     "--out", str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--unknown {given}" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["predict", str(demo_run["model"]), str(demo_run["data"] / "test"), "--min-confidence", "1.5"])
    assert "--min-confidence: must be between 0 and 1" in capsys.readouterr().err
    for bank, refusal in ((demo_run["model"], "not a feature bank"), (tmp_path / "none.safetensors", "no such file")):
        assert main(["predict", str(demo_run["model"]), str(demo_run["data"] / "test"), "--feature-bank",
                     str(bank)]) == 2
        err = capsys.readouterr().err
        assert f"--feature-bank {bank}: {refusal}" in err and len(err.strip().splitlines()) == 1


def test_the_nearest_neighbour_score_says_why_it_was_not_measured(demo_run):
    dataset = open_dataset(demo_run["data"])
    items, why = bank_images(dataset, "val", nearest=True, compiled=False)
    assert len(items) == len(dataset.train) and why == ""
    for split, nearest, compiled, reason in (("train", True, False, "the train split holds the training images"),
                                             ("all", True, False, "the all split holds the training images"),
                                             ("val", False, True, "torch.compile runs the model whole"),
                                             ("val", False, False, "the bank is made from the .safetensors model")):
        items, why = bank_images(dataset, split, nearest, compiled)
        assert items == [] and reason in why
