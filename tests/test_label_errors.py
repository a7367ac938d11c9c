"""Finding mislabelled images: folds are stratified, each image is judged only by a model that did not
train on it, and the confident-learning rule flags what it should."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

import residual
from residual.cli import main
from residual.data.shapes import write_shapes
from residual.label_errors import (class_thresholds, copies_together, find_label_errors, judge_probabilities,
                                    label_suspects, stratified_folds, suspects)
from residual.train import TrainConfig
from cifar_files import write_cifar10


def test_folds_spread_every_class_evenly_and_follow_the_seed():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    fold = stratified_folds(labels, 3, seed=4)
    for label in range(3):
        counts = np.bincount(fold[labels == label], minlength=3)
        assert counts.max() - counts.min() <= 1 and counts.sum() == (labels == label).sum()
    assert np.array_equal(fold, stratified_folds(labels, 3, seed=4))
    assert not np.array_equal(fold, stratified_folds(labels, 3, seed=5))


def test_exact_and_near_identical_copies_of_an_image_share_its_fold(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("one", "two", "three"):  # pictures of their own: smooth random colour fields
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(
            (40, 40), Image.Resampling.BICUBIC).save(tmp_path / f"{name}.png")
    (tmp_path / "one-copy.png").write_bytes((tmp_path / "one.png").read_bytes())
    Image.open(tmp_path / "two.png").save(tmp_path / "two-again.jpg", quality=80)  # other bytes, same picture
    (tmp_path / "broken.png").write_bytes(b"not an image")
    names = ["one.png", "one-copy.png", "two.png", "two-again.jpg", "three.png", "broken.png", "missing.png"]
    fold, moved = copies_together(np.array([0, 1, 2, 0, 1, 2, 0]), [tmp_path / name for name in names])
    assert fold.tolist() == [0, 0, 2, 2, 1, 2, 0] and moved == 2


def test_the_frames_of_one_clip_share_its_first_frames_fold(tmp_path):
    """Frames as `residual unpack` names them (<clip>.t=SECONDS.jpg), each a picture of its own: a clip's are kept
    in one fold, as copies are; a clip of the same name in another class folder is another clip."""
    rng = np.random.default_rng(1)
    names = ["cat/a.mp4.t=0.000.jpg", "cat/a.mp4.t=1.000.jpg", "cat/b.mp4.t=0.000.jpg", "cat/a.mp4.t=2.000.jpg",
             "dog/a.mp4.t=0.000.jpg", "dog/a.mp4.t=1.000.jpg", "cat/a.mp4.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(
            (40, 40), Image.Resampling.BICUBIC).save(tmp_path / name, quality=95)
    fold, moved = copies_together(np.array([0, 1, 2, 2, 1, 0, 1]), [tmp_path / name for name in names])
    assert fold.tolist() == [0, 0, 2, 0, 1, 1, 1] and moved == 3


def test_suspects_are_the_off_diagonal_of_the_confident_joint():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9],  # image 2: labelled 0, its model says 1
                      [0.7, 0.3],
                      [0.2, 0.8], [0.1, 0.9], [0.3, 0.7],
                      [0.45, 0.55]])  # image 7: no class reaches its threshold: not counted
    thresholds = class_thresholds(probs, labels)
    assert thresholds == pytest.approx([(0.9 + 0.8 + 0.1 + 0.7) / 4, (0.8 + 0.9 + 0.7 + 0.55) / 4])
    assert suspects(probs, labels) == [(2, 1)]
    # Ranked by the given label's probability, lowest first; a class without images has no threshold.
    three = np.array([[0.1, 0.86, 0.04], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.1, 0.85, 0.05]])
    assert suspects(three, np.array([0, 0, 0, 1])) == [(1, 1), (0, 1)]
    # Its own class reaching its threshold does not clear an image another class beats there.
    beaten = np.array([[0.35, 0.6, 0.05], [0.2, 0.1, 0.7], [0.2, 0.1, 0.7], [0.3, 0.5, 0.2], [0.3, 0.5, 0.2]])
    assert class_thresholds(beaten, np.array([0, 0, 0, 1, 1]))[:2] == pytest.approx([0.25, 0.5])
    assert suspects(beaten, np.array([0, 0, 0, 1, 1])) == [(0, 1)]


def test_suspects_are_the_ones_cleanlab_finds_by_the_confident_learning_filter():
    """30 images of 3 classes, 5 labels flipped, probabilities to 2 decimals; cleanlab 2.9.0's
    find_label_issues(labels, pred_probs, filter_by="confident_learning") flags images 1 and 19 (run once in an
    environment with cleanlab, where 20 random draws of 300 images also all agreed, 2026-12-04)."""
    labels = np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 0, 2, 2, 2, 2, 2, 2, 2])
    probs = np.array([
        [0.98, 0.0, 0.02], [0.78, 0.1, 0.12], [0.5, 0.33, 0.17], [0.99, 0.0, 0.01], [0.89, 0.07, 0.04],
        [0.72, 0.19, 0.09], [0.93, 0.03, 0.04], [0.95, 0.04, 0.01], [0.47, 0.11, 0.42], [0.66, 0.08, 0.26],
        [0.04, 0.7, 0.26], [0.13, 0.73, 0.14], [0.0, 0.98, 0.02], [0.01, 0.84, 0.15], [0.14, 0.65, 0.21],
        [0.02, 0.92, 0.06], [0.04, 0.93, 0.03], [0.02, 0.88, 0.1], [0.13, 0.67, 0.2], [0.0, 0.91, 0.09],
        [0.04, 0.23, 0.73], [0.36, 0.02, 0.62], [0.33, 0.51, 0.16], [0.09, 0.2, 0.71], [0.27, 0.02, 0.71],
        [0.03, 0.31, 0.66], [0.01, 0.0, 0.99], [0.07, 0.07, 0.86], [0.24, 0.09, 0.67], [0.07, 0.61, 0.32]])
    assert sorted(index for index, _ in suspects(probs, labels)) == [1, 19]


def test_suspects_follow_cleanlabs_refinements_where_a_weak_model_ranks_classes_below_their_thresholds():
    """cleanlab 2.9.0's confident-learning filter, run on these two cases (2026-12-05): an image whose label is
    its most probable class is never flagged, though its label is below threshold and another class reaches
    its own (image 2 of the first); with several classes confident the image belongs to its most probable
    class, confident or not (image 6 of the second: labelled 1, confident for 1 and 2, most probable 0).
    300 random draws of weak to strong models, single- and multi-label, all agreed with cleanlab that day."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.45, 0.35, 0.2], [0.3, 0.4, 0.3], [0.5, 0.3, 0.2],
                      [0.1, 0.35, 0.55]])
    assert suspects(probs, labels) == []
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7],
                      [0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.1, 0.7, 0.2]])
    assert sorted(suspects(probs, labels)) == [(4, 2), (5, 2), (6, 0), (7, 1), (8, 1), (9, 1)]
    # multi-label, one class judged as present/absent: image 5 is labelled without it and "absent" is the more
    # probable answer (0.7), though "present" (0.3) reaches that answer's low threshold (0.25)
    present = np.array([[0.3], [0.25], [0.2], [0.1], [0.05], [0.3]])
    assert label_suspects(present, np.array([[1], [1], [1], [0], [0], [0]])) == []


def test_every_image_is_judged_once_by_a_model_that_left_it_out(tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", size=16, per_class=6, seed=0, progress=False)
    copied = sorted((data / "train").glob("*/*.png"))[:2]  # one image filed again under another class
    shutil.copy(copied[0], copied[-1].parent / "copy.png")
    shutil.copy(copied[0], copied[0].parent / "copy-too.png")
    config = TrainConfig(data=str(data), model="resnet20", epochs=1, batch_size=32, quiet=True, workers=0)
    result = find_label_errors(data, tmp_path / "audit", folds=2, config=config)
    images = sorted(str(path.resolve()) for path in data.glob("*/*/*.png"))
    assert result.images == len(images) and len(result.fold_scores) == 2 and not result.unreadable
    judged_by = {}
    for fold in (1, 2):
        rows = list(csv.DictReader(open(tmp_path / "audit" / "folds" / f"fold-{fold}.csv")))
        assert sorted(row["image"] for row in rows) == images  # every image, once per listing
        for row in rows:
            if row["split"] == "val":
                judged_by.setdefault(row["image"], []).append(fold)
        run = residual.read_metadata(tmp_path / "audit" / "runs" / f"fold-{fold}" / "model.safetensors")
        assert run["extra"]["epoch"] == 1
    assert sorted(judged_by) == images and all(len(folds) == 1 for folds in judged_by.values())
    copies = [copied[0], copied[-1].parent / "copy.png", copied[0].parent / "copy-too.png"]
    assert len({tuple(judged_by[str(path.resolve())]) for path in copies}) == 1  # judged together
    with open(result.files["table"]) as stream:
        rows = list(csv.DictReader(stream))
    assert [row["image"] for row in rows] == [issue.image for issue in result.issues]
    assert all(row["given"] != row["suggested"] for row in rows)
    assert result.files["picture"].stat().st_size > 1000
    with open(result.files["probabilities"]) as stream:
        table = list(csv.DictReader(stream))
    assert sorted(row["image"] for row in table) == images
    assert all(sum(float(row[name]) for name in sorted(path.name for path in (data / "train").iterdir()))
               == pytest.approx(1.0, abs=1e-4) for row in table)
    # judged again from its own probabilities.csv (6 significant digits), no model trained: the same suspects
    again = judge_probabilities(data, result.files["probabilities"], tmp_path / "again")
    assert again.images == result.images and not again.fold_scores and result.issues
    assert [(issue.image, issue.suggested) for issue in again.issues] == [(issue.image, issue.suggested)
                                                                          for issue in result.issues]
    assert [issue.p_given for issue in again.issues] == pytest.approx([issue.p_given for issue in result.issues],
                                                                      abs=1e-6)
    with pytest.raises(residual.ConfigError, match="fewer images than --folds 50"):
        find_label_errors(data, tmp_path / "audit2", folds=50, config=config)
    cifar = write_cifar10(tmp_path / "cifar-10-batches-py", train=30, test=30)
    with pytest.raises(residual.ConfigError, match="CIFAR's batches hold no image files to list per fold"):
        find_label_errors(cifar, tmp_path / "audit3", folds=2, config=config)


def test_probabilities_from_elsewhere_are_judged_without_training(tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", size=16, per_class=3, seed=2, progress=False)
    images = sorted((data / "train").glob("*/*.png"))  # 30 images of 10 classes; val and test left unjudged
    classes = sorted(path.name for path in (data / "train").iterdir())
    labels = np.array([classes.index(path.parent.name) for path in images])
    probs = np.full((len(images), len(classes)), 0.02)
    probs[np.arange(len(images)), labels] = 0.82
    probs[4], probs[4, 7] = 0.02, 0.82  # a model sure that image 4 (labelled 1) is of class 7
    listing = tmp_path / "probabilities.csv"
    with open(listing, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", *classes, "comment"])  # other columns are allowed and ignored
        writer.writerows([str(image), *row, "-"] for image, row in zip(images, probs.tolist()))
    result = judge_probabilities(data, listing, tmp_path / "audit")
    assert result.images == 30 and [(issue.image, issue.given, issue.suggested) for issue in result.issues] == [
        (str(images[4].resolve()), classes[1], classes[7])]
    assert main(["label-errors", str(data), "--probabilities", str(listing), "--out", str(tmp_path / "runs")]) == 0
    assert f"each image judged by the probabilities in {listing}" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "runs" / "shapes" / "label_issues.csv")))
    assert [row["suggested"] for row in rows] == [classes[7]]

    def refused(text, match):
        listing.write_text(text)
        with pytest.raises(residual.ConfigError, match=match):
            judge_probabilities(data, listing, tmp_path / "refused")

    header = ",".join(["image", *classes])
    refused("image,circle\n", r"no column 'arrow', 'crescent'")
    refused(header + "\n", "no rows")
    refused(header + "\n" + ",".join([str(tmp_path / "other.png")] + ["0.1"] * 10) + "\n",
            "line 2: .*other.png is not a labelled image of the data")
    refused(header + "\n" + ",".join([str(images[0])] + ["x"] * 10) + "\n", "line 2: a probability that is not")
    refused(header + "\n" + ",".join([str(images[0])] + ["1.5"] * 10) + "\n", "line 2: a probability outside 0..1")


def test_label_errors_cli(tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", size=16, per_class=4, seed=1, progress=False)
    assert main(["label-errors", str(data), "--model", "resnet20", "--epochs", "1", "--batch-size", "32", "--folds",
                 "2", "--workers", "0", "--quiet", "--out", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out
    assert "each image judged by the model that did not train on it" in printed and "warning" not in printed
    assert (tmp_path / "runs" / "shapes" / "label_issues.csv").is_file()
    with pytest.raises(SystemExit):
        main(["label-errors", str(data), "--folds", "1"])
