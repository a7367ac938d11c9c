"""Multi-label classification: a CSV listing any number of labels per image, trained with one sigmoid per
class, evaluated by mAP and F1, predicted and served as the classes over the model's threshold."""

import csv

import numpy as np
import pytest
from PIL import Image

from residual.data.datasets import DatasetError, open_dataset, split_labels
from residual.data.shapes import MULTI_LABEL_CSV, render_shapes, write_multi_label_shapes


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """The multi-label shapes at 32 px: 60 training images, 12 each for val and test."""
    return write_multi_label_shapes(tmp_path_factory.mktemp("tagged"), size=32, train_images=60, progress=False)


def write_rows(folder, header, rows, name="labels.csv"):
    """A CSV of `rows` under `header`, with a small PNG for every image it names."""
    for row in rows:
        image = folder / row[0]
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(row[0]) * 20, 0, 0)).save(image)
    with open(folder / name, "w", newline="") as stream:
        csv.writer(stream).writerows([header, *rows])
    return folder / name


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


def test_check_data_counts_labels_and_finds_one_picture_listed_with_two_label_sets(tmp_path):
    from residual.data.check import check_data
    path = write_rows(tmp_path, ("image", "labels"), [("a.png", "cat dog"), ("b.png", "dog"), ("c.png", "")]
                      + [(f"x{i}.png", "cat") for i in range(6)])
    for name in ("a.png", "b.png"):  # the same picture under both names
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    report = check_data(path, progress=False)
    assert [sum(counts) for counts in zip(*report.counts.values())] == [7, 2]  # cat 7 images, dog 2
    assert report.conflicts == [[f"{tmp_path / 'a.png'} (cat dog)", f"{tmp_path / 'b.png'} (dog)"]]
