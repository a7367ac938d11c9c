"""Datasets on disk: shapes, ImageFolder layouts, CIFAR pickles, loaders and check-data."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from payloads import WritesAMarker
from residual.data.check import check_data
from residual.data.datasets import DatasetError, data_name, input_images, open_dataset
from residual.data.decode import image_files
from residual.data.loaders import (BadFileLog, FileLoader, InMemoryLoader, balanced_weights, decoding_workers,
                                   epoch_order, load_into_memory, shard)
from residual.data.shapes import SHAPE_CLASSES, write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), size=16, per_class=20, seed=3, masks=True, progress=False)


def test_shapes_is_a_real_image_folder_with_masks_outside_the_classes(shapes):
    for split, count in [("train", 20), ("val", 10), ("test", 10)]:
        for name in SHAPE_CLASSES:
            files = sorted((shapes / split / name).glob("*.png"))
            assert len(files) == count
            assert Image.open(files[0]).size == (16, 16)
            assert (shapes / "masks" / split / name / files[0].name).is_file()
    dataset = open_dataset(shapes)
    assert dataset.classes == sorted(SHAPE_CLASSES)
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (200, 100, 100)
    assert "masks" not in dataset.classes and not dataset.ignored


def test_shapes_is_deterministic_and_not_redrawn(shapes, tmp_path):
    again = write_shapes(tmp_path / "again", size=16, per_class=20, seed=3, progress=False)
    for path in (shapes / "train").rglob("*.png"):
        assert path.read_bytes() == (again / path.relative_to(shapes)).read_bytes()
    stamp = (again / "train" / "star" / "00000.png").stat().st_mtime_ns
    write_shapes(again, size=16, per_class=20, seed=3, progress=False)
    assert (again / "train" / "star" / "00000.png").stat().st_mtime_ns == stamp
    other = write_shapes(tmp_path / "other", size=16, per_class=20, seed=4, progress=False)
    assert (other / "train/star/00000.png").read_bytes() != (again / "train/star/00000.png").read_bytes()


def test_a_linear_model_fails_on_shapes(tmp_path):
    data = write_shapes(tmp_path / "s", size=32, per_class=150, seed=0, progress=False)
    bad = BadFileLog()
    dataset = open_dataset(data)
    x_train, y_train = load_into_memory(dataset.train, 32, 32, "bilinear", bad, progress=False)
    x_val, y_val = load_into_memory(dataset.val, 32, 32, "bilinear", bad, progress=False)
    flat = lambda x: (x.float() / 255).flatten(1)  # noqa: E731
    mean, std = flat(x_train).mean(0), flat(x_train).std(0) + 1e-3
    x_train, x_val = (flat(x_train) - mean) / std, (flat(x_val) - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(32 * 32 * 3, 10)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(linear(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_acc = (linear(x_train).argmax(1) == y_train).float().mean().item()
        val_acc = (linear(x_val).argmax(1) == y_val).float().mean().item()
    assert train_acc > 0.9, "the linear model did fit its training set"
    assert val_acc < 0.35, f"a linear model should not generalise on shapes, got {val_acc:.2%}"


def _folder(root, counts, extension=".png"):
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 7 % 256, len(name) * 20, 9)).save(root / name / f"{index}{extension}")


def test_decoding_workers_use_the_cores_left_over(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert decoding_workers() == 15, "one core for the training loop"
    assert decoding_workers(processes=8) == 1, "eight GPUs share the sixteen cores"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert decoding_workers() == 1


def test_flat_folder_gets_a_seeded_stratified_split(tmp_path):
    _folder(tmp_path / "d", {"cat": 20, "dog": 10, "eel": 3})
    (tmp_path / "d" / "cat" / "notes.txt").write_text("hello")
    dataset = open_dataset(tmp_path / "d", val_split=0.2, seed=1)
    assert dataset.classes == ["cat", "dog", "eel"]
    assert dataset.class_counts(dataset.val) == [4, 2, 1]
    assert dataset.class_counts(dataset.train) == [16, 8, 2]
    assert [p.name for p in dataset.ignored] == ["notes.txt"]
    same = open_dataset(tmp_path / "d", val_split=0.2, seed=1)
    other = open_dataset(tmp_path / "d", val_split=0.2, seed=2)
    assert same.val.files == dataset.val.files and other.val.files != dataset.val.files
    assert not set(dataset.val.files) & set(dataset.train.files)
    for fraction in (0.0, 1.0):  # 0 was read as "not given" and held out the default tenth
        with pytest.raises(DatasetError, match="--val-split must be between 0 and 1"):
            open_dataset(tmp_path / "d", val_split=fraction)


def test_files_systems_leave_beside_images_are_neither_classes_nor_images(tmp_path):
    """A zip made on a Mac holds __MACOSX/ and an AppleDouble ._NAME.jpg per image: not images, though they carry
    an image's extension. Counted as unreadable images, 20 in a row (they sort first) stopped training."""
    _folder(tmp_path / "d", {"cat": 3, "dog": 3})
    for name in ("cat", "dog"):
        for index in range(3):
            (tmp_path / "d" / name / f"._{index}.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (tmp_path / "d" / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (tmp_path / "d" / "cat" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (tmp_path / "d" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    dataset = open_dataset(tmp_path / "d", val_split=0.34)
    assert dataset.classes == ["cat", "dog"]
    assert sorted(p.name for p in dataset.train.files + dataset.val.files) == ["0.png", "0.png", "1.png", "1.png",
                                                                                "2.png", "2.png"]
    assert len(dataset.ignored) == 7  # named in check-data and in the run summary, not dropped unseen
    assert check_data(tmp_path / "d", progress=False).bad == []
    assert [p.name for p in image_files([tmp_path / "d" / "cat"])] == ["0.png", "1.png", "2.png"]  # predict, eval


def test_folders_linked_into_a_dataset_are_read_once_each_and_a_link_loop_ends(tmp_path):
    """A dataset assembled from symbolic links to folders elsewhere: predict and eval list the linked folders'
    images (they found none before 2026-12-06), and training reads a class folder's linked subfolders."""
    _folder(tmp_path / "store", {"cat": 2, "dog": 3})
    (tmp_path / "store" / "cat" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "store" / "cat" / "more" / "9.png")
    (tmp_path / "store" / "cat" / "loop").symlink_to(tmp_path / "store" / "cat")  # a link back up the tree
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("cat", "dog"):
        (linked / name).symlink_to(tmp_path / "store" / name)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "5.png")
    (tmp_path / "store" / "dog" / "extra").symlink_to(tmp_path / "elsewhere")
    found = [p.relative_to(linked).as_posix() for p in image_files([linked])]
    assert found == ["cat/0.png", "cat/1.png", "cat/more/9.png", "dog/0.png", "dog/1.png", "dog/2.png",
                     "dog/extra/5.png"]
    dataset = open_dataset(linked, val_split=0.0001)
    files, labels = dataset.train.files + dataset.val.files, dataset.train.labels + dataset.val.labels
    by_class = sorted((dataset.classes[label], path.name) for path, label in zip(files, labels))
    assert by_class == [("cat", "0.png"), ("cat", "1.png"), ("cat", "9.png"), ("dog", "0.png"), ("dog", "1.png"),
                        ("dog", "2.png"), ("dog", "5.png")]


def test_a_link_to_a_file_that_is_gone_is_reported_as_unreadable_not_left_out(tmp_path):
    """A link whose image was moved or deleted is listed, and its reader says where it points (until 2026-12-07
    it was left out of the listing without a word); a pipe named like an image is not a file, and is left out
    (opening it would wait for a writer)."""
    _folder(tmp_path / "d", {"cat": 2, "dog": 2})
    (tmp_path / "d" / "cat" / "gone.png").symlink_to(tmp_path / "moved.png")
    os.mkfifo(tmp_path / "d" / "dog" / "pipe.png")
    assert [path.name for path in image_files([tmp_path / "d" / "cat"])] == ["0.png", "1.png", "gone.png"]
    report = check_data(tmp_path / "d", progress=False)
    assert report.bad == [f"{tmp_path / 'd' / 'cat' / 'gone.png'}: a link to {tmp_path / 'moved.png'}, which is "
                          f"not there; fix the link or remove it"]
    dataset = open_dataset(tmp_path / "d", val_split=0.0001)
    assert sorted(path.name for path in dataset.train.files + dataset.val.files) == ["0.png", "0.png", "1.png",
                                                                                       "1.png", "gone.png"]


def test_split_folders_and_clear_errors(tmp_path):
    _folder(tmp_path / "d" / "train", {"a": 3, "b": 3})
    _folder(tmp_path / "d" / "val", {"a": 1, "b": 1})
    dataset = open_dataset(tmp_path / "d")
    assert (len(dataset.train), len(dataset.val), dataset.test) == (6, 2, None)
    with pytest.raises(DatasetError, match="--val-split: .*val is the validation set; drop --val-split"):
        open_dataset(tmp_path / "d", val_split=0.5)  # it split train and left val/ unused
    _folder(tmp_path / "d" / "val", {"zebra": 1})
    with pytest.raises(DatasetError, match="zebra"):
        open_dataset(tmp_path / "d")
    _folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DatasetError, match="need at least 2"):
        open_dataset(tmp_path / "one")
    with pytest.raises(DatasetError, match="no such folder"):
        open_dataset(tmp_path / "absent")


def _csv_dataset(root, text: str, images: int = 12):
    """images/0.png ... in `root` and the CSV `text` beside them as labels.csv."""
    _folder(root, {"images": images})
    (root / "labels.csv").write_text(text, encoding="utf-8")
    return root / "labels.csv"


def test_a_csv_of_labels_with_a_split_column(tmp_path):
    # As a spreadsheet saves it: a byte-order mark, semicolons, its own header spelling; one path absolute.
    rows = ([f"images/{i}.png;{2 if i % 2 else 10};train" for i in range(8)]
            + [f"images/{i}.png;{2 if i % 2 else 10};Valid" for i in (8, 9)]
            + [f"{tmp_path / 'd' / 'images' / '10.png'};10;test", "images/notes.txt;2;train"])
    labels = _csv_dataset(tmp_path / "d", "\ufeffFile ; Class;Split\n" + "\n".join(rows) + "\n")
    (tmp_path / "d" / "images" / "notes.txt").write_text("hello")
    dataset = open_dataset(labels)
    assert (dataset.kind, dataset.classes, dataset.flat) == ("csv", ["2", "10"], False)  # numbers in number order
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (8, 2, 1)
    assert dataset.val.files == [tmp_path / "d" / "images" / "8.png", tmp_path / "d" / "images" / "9.png"]
    assert dataset.val.labels == [1, 0] and dataset.class_counts(dataset.train) == [4, 4]
    assert [p.name for p in dataset.ignored] == ["notes.txt"]
    with pytest.raises(DatasetError, match="has val rows, which are the validation set; drop --val-split"):
        open_dataset(labels, val_split=0.5)
    # The folder moved elsewhere is the same data: a resumed run compares this digest.
    (tmp_path / "d").rename(tmp_path / "moved")
    labels = tmp_path / "moved" / "labels.csv"
    labels.write_text(labels.read_text().replace(str(tmp_path / "d"), str(tmp_path / "moved")))
    assert open_dataset(labels).fingerprint(open_dataset(labels).train) == dataset.fingerprint(dataset.train)


def test_a_csv_of_labels_without_a_split_column_is_split_as_a_class_folder_would_be(tmp_path):
    rows = "".join(f"images/{i}.png,{'cat' if i < 8 else 'dog'}\n" for i in range(12))
    labels = _csv_dataset(tmp_path / "d", "filepath,Category\n" + rows)  # other names a header may use
    dataset = open_dataset(labels, val_split=0.25, seed=1)
    assert dataset.flat and dataset.test is None and dataset.classes == ["cat", "dog"]
    assert dataset.class_counts(dataset.val) == [2, 1] and dataset.class_counts(dataset.train) == [6, 3]
    assert open_dataset(labels, val_split=0.25, seed=1).val.files == dataset.val.files
    assert open_dataset(labels, val_split=0.25, seed=2).val.files != dataset.val.files


@pytest.mark.parametrize("text, message", [
    ("", "empty file; the first line must name the columns"),
    ("image,label\n", "no rows under the header"),
    ("id,breed\nimages/0.png,cat\n", "no image column; the header must name one of image, file, filename, filepath, "
                                      "path \\(it has: id, breed\\)"),
    ("path\nimages/0.png\n", "no label column"),
    ("image,label\nimages/0.png,cat\n\nimages/1.png,\n", "line 4 has no label"),  # blank lines count
    ("image,label\nimages/0.png,cat\nimages/a.png,dog\nimages/b.png,dog\n",
     "2 listed image\\(s\\) do not exist, the first on line 3: .*a.png \\(image paths are relative to the CSV's"),
    ("image,label,split\nimages/0.png,cat,train\nimages/1.png,dog,holdout\n", "line 3: split 'holdout' is not"),
    ("image,label,split\nimages/0.png,cat,train\nimages/1.png,dog,train\nimages/1.png,eel,val\n",
     "classes \\['eel'\\] of the val or test rows have no training rows"),
    ("image,label\nimages/0.png,cat\nimages/1.png,cat\n", "name 1 class\\(es\\); need at least 2"),
])
def test_a_csv_of_labels_that_cannot_be_used_is_a_one_line_error(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message) as error:
        open_dataset(_csv_dataset(tmp_path / "d", text, images=2))
    assert "\n" not in str(error.value) and str(tmp_path / "d" / "labels.csv") in str(error.value)
    with pytest.raises(DatasetError, match="no such file; give a CSV file of image,label rows, or a folder"):
        open_dataset(tmp_path / "absent.csv")


def test_the_images_a_user_names_are_files_folders_and_csv_lists_in_order(tmp_path):
    listing = _csv_dataset(tmp_path / "d", "path\nimages/3.png\nimages/1.png\nnot/there.png\n", images=4)
    folder = tmp_path / "d" / "images"
    assert input_images([folder / "2.png", listing, folder]) == [
        folder / "2.png", folder / "3.png", folder / "1.png", tmp_path / "d" / "not/there.png",
        *(folder / f"{i}.png" for i in range(4))]
    with pytest.raises(DatasetError, match="labels.csv: no image column; the header must name one of image"):
        input_images([_csv_dataset(tmp_path / "e", "name\nimages/0.png\n", images=1)])


def _kaggle_style(root, dataset_file: str):
    """Kaggle's layout: train/0.jpg ... named by id in labels.csv (id,breed,fold), and a dataset file."""
    _folder(root, {"train": 12}, extension=".jpg")
    (root / "labels.csv").write_text("id,breed,fold\n" + "".join(
        f"{i},{'husky' if i % 3 else 'pug'},{'holdout' if i >= 10 else 'fit'}\n" for i in range(12)))
    (root / "dogs.yaml").write_text(dataset_file)
    return root / "dogs.yaml"


def test_a_dataset_file_reads_a_csv_of_another_layout(tmp_path):
    described = _kaggle_style(tmp_path / "d", "# Kaggle's dog breeds\ncsv: labels.csv\nimage_column: id\n"
                                              "label_column: Breed\nimages: train\nsuffix: .jpg\n")
    dataset = open_dataset(described, val_split=0.25, seed=1)
    assert (dataset.kind, dataset.root, dataset.classes, dataset.flat) == ("csv", described, ["husky", "pug"], True)
    assert sorted(dataset.train.files + dataset.val.files) == sorted((tmp_path / "d" / "train").glob("*.jpg"))
    assert dataset.class_counts(dataset.val) == [2, 1] and data_name(described) == "dogs"
    # The folder moved elsewhere is the same data: the digest is of the names under the images' folder.
    (tmp_path / "d").rename(tmp_path / "moved")
    moved = open_dataset(tmp_path / "moved" / "dogs.yaml", val_split=0.25, seed=1)
    assert moved.fingerprint(moved.train) == dataset.fingerprint(dataset.train)
    # A split column of another name; its values are still train, val or test.
    labels = tmp_path / "moved" / "labels.csv"
    labels.write_text(labels.read_text().replace(",fit", ",train").replace(",holdout", ",val"))
    (tmp_path / "moved" / "split.yaml").write_text("csv: labels.csv\nimage_column: id\nlabel_column: breed\n"
                                                   "split_column: fold\nimages: train\nsuffix: .jpg\n")
    dataset = open_dataset(tmp_path / "moved" / "split.yaml")
    assert (len(dataset.train), [p.name for p in dataset.val.files], dataset.flat) == (10, ["10.jpg", "11.jpg"], False)
    # Images to predict: a listing without labels, in its order.
    (tmp_path / "moved" / "test.csv").write_text("id\n3\n1\n")
    (tmp_path / "moved" / "test.yaml").write_text("csv: test.csv\nimage_column: id\nimages: train\nsuffix: .jpg\n")
    assert input_images([tmp_path / "moved" / "test.yaml"]) == [tmp_path / "moved" / "train" / "3.jpg",
                                                                tmp_path / "moved" / "train" / "1.jpg"]


@pytest.mark.parametrize("text, message", [
    ("csv: [labels.csv\n", "dogs.yaml: cannot be read as a YAML dataset file \\(while parsing"),
    ("image_column: id\n", "dogs.yaml: a dataset file needs a csv: key naming the CSV \\(relative to the file\\), "
                           "and may say image_column, label_column, split_column, images, suffix"),
    ("csv: labels.csv\nimage_col: id\n", "dogs.yaml: unknown key\\(s\\) image_col; a dataset file may say csv, "),
    ("csv: labels.csv\nimage_column: 3\n", "dogs.yaml: image_column must be a name \\(text\\), got 3"),
    ("csv: labels.csv\nimage_column: name\nlabel_column: breed\n",
     "dogs.yaml: image_column 'name' is not a column of .*labels.csv \\(it has: id, breed, fold\\)"),
    ("csv: labels.csv\nimage_column: id\n", "labels.csv: no label column; the header must name one of label, class, "
                                             "category, target, labels, tags \\(it has: id, breed, fold\\), or name "
                                             "its label_column in a dataset file"),
    ("csv: labels.csv\nimage_column: id\nlabel_column: breed\nsuffix: .jpg\n",
     "labels.csv: 12 listed image\\(s\\) do not exist, the first on line 2: .*d/0.jpg \\(image paths are relative "
     "to .*d, as .*dogs.yaml says\\)"),
    ("csv: absent.csv\n", "absent.csv: no such file"),
])
def test_a_dataset_file_that_cannot_be_used_is_a_one_line_error(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message) as error:
        open_dataset(_kaggle_style(tmp_path / "d", text))
    assert "\n" not in str(error.value)
    with pytest.raises(DatasetError, match="absent.yaml: no such file; give a dataset file \\(.yaml\\), a CSV or"):
        open_dataset(tmp_path / "absent.yaml")


def _cifar_batch(path, count, label_key, seed):
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             label_key.encode(): rng.integers(0, 10, count).tolist(), b"batch_label": b"test batch"}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def test_cifar10_and_cifar100_python_layouts(tmp_path):
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    batches = [_cifar_batch(c10 / f"data_batch_{i}", 5, "labels", i) for i in range(1, 6)]
    test = _cifar_batch(c10 / "test_batch", 4, "labels", 9)
    (c10 / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    dataset = open_dataset(c10)
    assert dataset.kind == "cifar" and dataset.classes[3] == "c3"
    with pytest.raises(DatasetError, match="is CIFAR, whose test batch is the validation set"):
        open_dataset(c10, val_split=0.2)  # it was ignored
    assert dataset.train.images.shape == (25, 3, 32, 32) and len(dataset.val) == 4
    assert torch.equal(dataset.train.images[5].flatten(), torch.from_numpy(batches[1][b"data"][0]))
    assert dataset.val.labels == test[b"labels"]

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    _cifar_batch(c100 / "train", 6, "fine_labels", 1)
    _cifar_batch(c100 / "test", 2, "fine_labels", 2)
    (c100 / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    dataset = open_dataset(c100)
    assert len(dataset.classes) == 100 and len(dataset.train) == 6


def test_a_tampered_cifar_pickle_is_refused(tmp_path):
    c10 = tmp_path / "cifar"
    c10.mkdir()
    (c10 / "batches.meta").write_bytes(pickle.dumps({b"label_names": WritesAMarker(tmp_path / "marker")}))
    with pytest.raises(DatasetError, match="refused"):
        open_dataset(c10)
    assert not (tmp_path / "marker").exists()


def test_in_memory_loader_order_is_seeded_and_resumable():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    loader = InMemoryLoader(images, torch.arange(10), batch_size=3, shuffle=True, seed=5, device=torch.device("cpu"))
    full = [labels.tolist() for _, labels in loader.epoch(2)]
    assert len(full) == len(loader) == 4 and sorted(sum(full, [])) == list(range(10))
    assert [labels.tolist() for _, labels in loader.epoch(2, start=2)] == full[2:]
    assert [labels.tolist() for _, labels in loader.epoch(3)] != full


@pytest.mark.parametrize("weighted", [False, True])
def test_repeated_augmentation_draws_a_share_of_the_images_and_takes_each_in_a_row(weighted):
    """--aug-repeats N: an epoch of the same length, made of count/N images drawn as without it, each N times
    in a row; dealt to N workers, each worker gets one copy of each (its own augmentation of it)."""
    labels = torch.tensor([0] * 70 + [1] * 30)
    weights = balanced_weights(labels) if weighted else None
    plain = epoch_order(100, True, seed=4, epoch=2, weights=weights)
    for repeats, drawn in [(3, 34), (4, 25)]:
        order = epoch_order(100, True, seed=4, epoch=2, weights=weights, repeats=repeats)
        assert len(order) == 100
        firsts = order[::repeats]
        assert len(firsts) == drawn and torch.equal(order, firsts.repeat_interleave(repeats)[:100])
        if not weighted:  # the permutation's first images (a draw with replacement: its first draws)
            assert firsts.tolist() == plain[:drawn].tolist() and len(set(firsts.tolist())) == drawn
        shares = [shard(order, rank, repeats, pad=True) for rank in range(repeats)]
        assert all(torch.equal(share[:drawn - 1], firsts[:drawn - 1]) for share in shares)
    assert torch.equal(epoch_order(100, True, 4, 2, weights, repeats=1), plain)
    assert not torch.equal(epoch_order(100, True, 4, 3, weights, repeats=3)[::3],
                           epoch_order(100, True, 4, 2, weights, repeats=3)[::3]), "other images each epoch"
    assert torch.equal(epoch_order(10, False, 4, 2, repeats=3), torch.arange(10)), "evaluation: each image once"


def test_both_loaders_repeat_images_within_a_batch_and_resume_mid_epoch(tmp_path):
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    in_memory = InMemoryLoader(images, torch.arange(10), 4, True, 5, torch.device("cpu"), repeats=2)
    batches = [labels.tolist() for _, labels in in_memory.epoch(1)]
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert all(batch[0::2] == batch[1::2] for batch in batches) and len(set(sum(batches, []))) == 5
    assert [labels.tolist() for _, labels in in_memory.epoch(1, start=1)] == batches[1:]
    _folder(tmp_path / "d", {"a": 5, "b": 5})
    split = open_dataset(tmp_path / "d", val_split=0.2).train  # 8 images
    files = FileLoader(split, 3, True, 5, torch.device("cpu"), 8, 8, "bilinear", workers=0, bad=BadFileLog(),
                       repeats=2)
    batches = [(images, labels) for images, labels in files.epoch(1)]
    assert [len(labels) for _, labels in batches] == [3, 3, 2]
    together = torch.cat([images for images, _ in batches])
    assert torch.equal(together[0::2], together[1::2]) and not torch.equal(together[0], together[2])


def test_file_loader_skips_and_counts_bad_files(tmp_path, caplog):
    _folder(tmp_path / "d", {"a": 6, "b": 6})
    (tmp_path / "d" / "a" / "0.png").write_bytes(b"")
    (tmp_path / "d" / "b" / "1.png").write_bytes(b"garbage")
    dataset = open_dataset(tmp_path / "d", val_split=0.2)
    split = dataset.train
    bad = BadFileLog(max_streak=5)
    loader = FileLoader(split, 4, True, 0, torch.device("cpu"), 8, 8, "bilinear", workers=2, bad=bad)
    seen = sum(len(labels) for _, labels in loader.epoch(0))
    broken = [p for p in split.files if p.name in ("0.png", "1.png") and p.stat().st_size < 10]
    assert seen == len(split) - len(broken)
    assert sorted(bad.files) == sorted(str(p) for p in broken)
    # A batch none of whose files could be read comes empty, in its place: a resume counts positions.
    single = FileLoader(split, 1, True, 0, torch.device("cpu"), 8, 8, "bilinear", workers=0, bad=bad)
    batches = list(single.epoch(0))
    assert len(batches) == len(single) == len(split)
    empty = [(images.shape, labels.shape) for images, labels in batches if len(labels) == 0]
    assert empty == [((0, 3, 8, 8), (0,))] * len(broken)
    assert all(str(p) in caplog.text for p in broken)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_file_loader_batches_are_page_locked_for_the_gpu(tmp_path, request, device):
    """DataLoader(pin_memory=True) pins tensors and containers and leaves other objects alone, so the batch
    object pins its images itself; from pageable memory their copy to the GPU would wait for the device.
    Without a GPU, pinning is stood in for by a marked copy, and the DataLoader's own pinning function runs."""
    _folder(tmp_path / "d", {"a": 4, "b": 4})
    split = open_dataset(tmp_path / "d", val_split=0.25).train
    loader = FileLoader(split, 4, True, 0, torch.device(device), 8, 8, "bilinear", workers=0, bad=BadFileLog())
    if device == "cuda":
        assert next(iter(loader.loader)).images.is_pinned()
        images, labels = next(loader.epoch(0))
        assert images.is_cuda and labels.is_cuda
        return
    request.getfixturevalue("stand_in_pinning")
    batch = next(iter(loader.loader))
    pinned = torch.utils.data._utils.pin_memory.pin_memory(batch)
    assert pinned.images.page_locked and torch.equal(pinned.images, batch.images)
    assert (pinned.indices, pinned.failed) == (batch.indices, batch.failed)


def test_too_many_bad_files_in_a_row_stop_with_a_clear_error(tmp_path):
    _folder(tmp_path / "d", {"a": 8, "b": 8})
    for path in (tmp_path / "d" / "a").glob("*.png"):
        path.write_bytes(b"")
    dataset = open_dataset(tmp_path / "d", val_split=0.1)
    with pytest.raises(DatasetError, match="in a row could not be read"):
        load_into_memory(dataset.train, 8, 8, "bilinear", BadFileLog(max_streak=3), progress=False)


def test_the_decoding_workers_also_start_by_forkserver(tmp_path):
    """Python 3.14 starts processes by forkserver, not fork: the workers' datasets and collate functions
    then travel pickled, and a lambda or a local function among them would fail there only."""
    data = write_shapes(tmp_path / "s", size=16, per_class=4, seed=0, progress=False)
    script = f"""
import multiprocessing, torch
from residual.data.datasets import open_dataset
from residual.data.loaders import BadFileLog, FileLoader, inference_batches
if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")
    train = open_dataset({str(data)!r}).train
    loader = FileLoader(train, 16, True, 0, torch.device("cpu"), 16, 16, "bilinear", 2, BadFileLog())
    trained = sum(len(labels) for _, labels in loader.epoch(0))
    predicted = sum(len(batch.images) for batch in inference_batches(train.files, 16, 16, batch_size=16, workers=2))
    print(trained, predicted, len(train))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    trained, predicted, count = map(int, result.stdout.split())
    assert trained == predicted == count == 40


def test_check_data_reports_bad_files_duplicates_leaks_and_imbalance(tmp_path):
    _folder(tmp_path / "d" / "train", {"a": 30, "b": 2})
    _folder(tmp_path / "d" / "val", {"a": 2, "b": 1})
    (tmp_path / "d" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    (tmp_path / "d" / "train" / "a" / "copy.png").write_bytes((tmp_path / "d" / "train" / "a" / "3.png").read_bytes())
    report = check_data(tmp_path / "d", progress=False)
    assert len(report.bad) == 1 and "broken.jpg" in report.bad[0]
    assert any(any(p.endswith("copy.png") for p in group) for group in report.duplicates)
    # val/a/0.png has the same pixels and bytes as train/a/0.png: leakage.
    assert any(item.endswith("val/a/0.png") for _, item, _ in report.leaks)
    assert report.imbalance > 10 and not report.ok and report.empty_classes == []
    # The same image in two classes is a labelling error, wherever the copies are; it was only a duplicate.
    stray = tmp_path / "d" / "val" / "b" / "stray.png"
    stray.write_bytes((tmp_path / "d" / "train" / "a" / "7.png").read_bytes())
    assert [f"{tmp_path / 'd' / 'train' / 'a' / '7.png'} (a)", f"{stray} (b)"] in check_data(tmp_path / "d",
                                                                                             progress=False).conflicts


def test_copies_under_two_classes_are_one_conflict_however_they_are_joined(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "d"
    for split, name in (("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")):
        (root / split / name).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(
                (40, 40), Image.Resampling.BICUBIC).save(root / split / name / f"{index}.png")
    original = root / "train" / "a" / "0.png"
    exact = root / "val" / "b" / "copy.png"  # the same bytes under another class
    exact.write_bytes(original.read_bytes())
    near = root / "train" / "a" / "0-again.jpg"  # the same picture re-encoded, same class as the original
    Image.open(original).save(near, quality=80)
    report = check_data(root, progress=False)
    assert report.conflicts == [[f"{near} (a)", f"{original} (a)", f"{exact} (b)"]]
    assert report.leaks == [("val", str(exact), str(original))]
    assert report.near_duplicates == [[str(near), str(original)]] and not report.near_leaks


def test_check_data_names_a_class_without_training_images(tmp_path, capsys):
    from residual.cli import main

    _folder(tmp_path / "d" / "train", {"a": 3, "b": 2})
    _folder(tmp_path / "d" / "val", {"a": 1, "b": 1, "c": 1}, extension=".jpg")  # no leak: other bytes
    (tmp_path / "d" / "train" / "c").mkdir()
    report = check_data(tmp_path / "d", progress=False)
    assert report.empty_classes == ["c"] and report.imbalance == 1.5 and not report.leaks and not report.ok
    assert main(["check-data", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert "classes without training images" in out and "class 'c'" in out and "infx" not in out


def test_check_data_finds_near_identical_copies_and_the_leaks_they_make(tmp_path, capsys):
    from residual.cli import main

    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    for split, count in (("train", 6), ("val", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for index in range(count):  # pictures of their own: smooth random colour fields
                Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(
                    (40, 40), Image.Resampling.BICUBIC).save(root / split / name / f"{index}.png")
    train_a = root / "train" / "a"
    Image.open(train_a / "0.png").save(train_a / "0-again.jpg", quality=80)  # the same picture, other bytes
    leak = root / "val" / "b" / "from-train.png"  # enlarged, in val, and under another class
    Image.open(train_a / "1.png").resize((80, 80), Image.Resampling.BICUBIC).save(leak)
    report = check_data(root, progress=False)
    assert report.near_duplicates == [[str(train_a / "0-again.jpg"), str(train_a / "0.png")]]
    assert report.near_leaks == [("val", str(leak), str(train_a / "1.png"))]
    assert report.conflicts == [[f"{train_a / '1.png'} (a)", f"{leak} (b)"]]
    assert not (report.duplicates or report.leaks) and not report.ok
    assert main(["check-data", str(root), "--out", str(tmp_path / "report")]) == 1
    out = capsys.readouterr().out
    assert "val near-copy of train" in out and "near-identical" in out
    assert "wrote check-data.json, copies.png in" in out
    saved = json.loads((tmp_path / "report" / "check-data.json").read_text())
    assert saved["near_leaks"] == [{"split": "val", "image": str(leak), "train_image": str(train_a / "1.png")}]
    assert saved["near_duplicates"] == report.near_duplicates and saved["ok"] is False
    assert saved["counts"]["train"] == [7, 6]
    assert Image.open(tmp_path / "report" / "copies.png").size[1] > 300  # three rows: the group, the leak, the conflict


def test_check_data_finds_a_cifar_test_image_that_is_a_training_image_with_noise(tmp_path):
    """CIFAR's own test set has such near-copies of training images (Barz and Denzler 2020, "ciFAIR")."""
    from cifar_files import write_cifar10

    folder = write_cifar10(tmp_path / "cifar-10-batches-py", train=20, test=20)
    train = pickle.loads((folder / "data_batch_1").read_bytes())
    test = pickle.loads((folder / "test_batch").read_bytes())
    noise = np.random.default_rng(1).integers(-3, 4, 3072)
    test[b"data"][5] = np.clip(train[b"data"][2].astype(int) + noise, 0, 255).astype(np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    report = check_data(folder, progress=False)
    assert report.near_leaks == [("val", "val#5", "train#2")] and not report.leaks  # CIFAR's test batch: val
    assert report.image("val#5").size == (32, 32)
