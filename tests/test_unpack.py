"""residual unpack: datasets stored as the Hugging Face Hub stores them (Parquet files of encoded images with a
ClassLabel column declared in the `huggingface` schema metadata), written here with pyarrow in that format."""

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from residual.cli import main
from residual.data.datasets import open_dataset
from residual.data import unpack
from residual.data.unpack import UnpackError, card_features, unpack_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]  # beans' ClassLabel names, in its order


def encoded(colour: tuple[int, int, int], kind: str = "PNG", size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=kind)
    return buffer.getvalue()


def write_hub_file(path: Path, rows: list[tuple[bytes | None, str | None, int | None]], features: dict | None = None,
                   label_column: str = "labels", extra: dict | None = None) -> None:
    """A Parquet file as `datasets` writes one: image {bytes, path} structs and a ClassLabel column."""
    features = features if features is not None else {
        "image": {"_type": "Image"}, label_column: {"names": CLASSES, "_type": "ClassLabel"}}
    columns = {"image": [{"bytes": data, "path": name} for data, name, _ in rows],
               label_column: [label for _, _, label in rows], **(extra or {})}
    table = pa.table(columns)
    if features:
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)  # several row groups, as a real shard has


def hub_dataset(root: Path) -> dict[str, list]:
    """beans' layout (data/{split}-0000N-of-0000M.parquet), with what real downloads hold besides clean rows:
    a JPEG, a name used twice in one class, a row that is not an image, a hidden test label (-1), and a split
    residual does not train on. Returns the rows written per file."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    train_a = [(encoded(colours[i % 3]), f"train.{i}.png", i % 3) for i in range(7)]
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 million pixels in 18 KB
    train_b = [(encoded(colours[0], "JPEG"), "/home/someone/cache/leaf.jpeg", 0),  # a path, as a local build writes
               (encoded(colours[1]), "same.png", 1), (encoded(colours[1], size=13), "same.png", 1),
               (b"<html>rate limited</html>", "broken.png", 2), (encoded(colours[2]), None, 2),
               (bomb.getvalue(), "bomb.png", 2)]
    validation = [(encoded(colours[i % 3]), f"val.{i}.png", i % 3) for i in range(6)]
    test = [(encoded(colours[i % 3]), f"test.{i}.png", -1) for i in range(3)]
    files = {"data/train-00000-of-00002.parquet": train_a, "data/train-00001-of-00002.parquet": train_b,
             "data/validation-00000-of-00001.parquet": validation, "data/test-00000-of-00001.parquet": test,
             "data/extra-00000-of-00001.parquet": validation[:2]}
    for name, rows in files.items():
        write_hub_file(root / name, rows)
    return files


def test_a_hub_dataset_unpacks_to_the_image_folder_residual_trains_on(tmp_path):
    files = hub_dataset(tmp_path / "beans")
    result = unpack_dataset(tmp_path / "beans", tmp_path / "images", progress=False)
    out = tmp_path / "images"
    assert result.label_column == "labels" and result.classes == CLASSES
    assert {split: sum(counts.values()) for split, counts in result.counts.items()} == {"train": 11, "val": 6}
    assert result.unlabelled == {"test": 3}
    assert result.left_out == [(tmp_path / "beans/data/extra-00000-of-00001.parquet", "extra")]
    assert result.skipped_count == 2
    assert result.skipped[0].startswith(f"{tmp_path / 'beans/data/train-00001-of-00002.parquet'} row 3: not an image")
    assert "row 5: refused as a possible decompression bomb" in result.skipped[1]
    # The bytes as they were, under their own names with their real format's extension.
    first, second = files["data/train-00000-of-00002.parquet"], files["data/train-00001-of-00002.parquet"]
    assert (out / "train/angular_leaf_spot/train.0.png").read_bytes() == first[0][0]
    assert (out / "train/angular_leaf_spot/leaf.jpg").read_bytes() == second[0][0]
    same = sorted(p.name for p in (out / "train/bean_rust").glob("*same.png"))
    assert same == ["0000010-same.png", "same.png"]  # the second image of that name is kept, by its row number
    assert len(list((out / "train/healthy").glob("0000012.png"))) == 1  # no name: its row in the split
    assert sorted(p.name for p in (out / "unlabelled/test").iterdir()) == ["test.0.png", "test.1.png", "test.2.png"]
    assert not list(tmp_path.glob(".images.*"))  # the staging folder became `images`
    dataset = open_dataset(out)
    assert dataset.classes == CLASSES and (len(dataset.train), len(dataset.val)) == (11, 6)
    assert dataset.test is None and not dataset.flat


def test_split_says_what_the_files_of_a_split_become(tmp_path, capsys):
    hub_dataset(tmp_path / "svhn")  # extra: more training images, as SVHN's
    result = unpack_dataset(tmp_path / "svhn", tmp_path / "out", splits={"extra": "train", "test": "skip"},
                            progress=False)
    assert result.images == {"train": 11 + 2, "val": 6} and not result.unlabelled
    assert result.left_out == [(tmp_path / "svhn/data/test-00000-of-00001.parquet", "test")]
    assert main(["unpack", str(tmp_path / "svhn"), str(tmp_path / "out2"), "--split", "test=skip", "--split",
                 "validation=test"]) == 0
    out = capsys.readouterr().out
    assert "left out" in out and "test-00000-of-00001.parquet: --split test=skip" in out
    assert "test/: 6 images" in out and "val/" not in out  # validation's files became the test split
    for bad, message in (("extra", "--split extra: give WORD=SPLIT"), ("extra=more", "--split extra=more: a split "
                                                                                   "becomes train, val, test or skip")):
        assert main(["unpack", str(tmp_path / "svhn"), str(tmp_path / "out3"), "--split", bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()
    with pytest.raises(UnpackError, match=r"every file's split is left out \(extra, test, train, validation\); "
                                          "--split WORD=train takes one in"):
        unpack_dataset(tmp_path / "svhn", tmp_path / "out4", progress=False,
                       splits={"train": "skip", "validation": "skip", "test": "skip"})


def test_files_that_name_no_split_are_one_training_pool_and_cifar100s_second_label_column_is_offered(tmp_path):
    features = {"img": {"_type": "Image"}, "fine_label": {"names": ["apple", "a/b", ".hidden"], "_type": "ClassLabel"},
                "coarse_label": {"names": ["fruit", "other"], "_type": "ClassLabel"}}
    rows = [(encoded((i * 40, 0, 0)), None, i % 3) for i in range(6)]
    table = pa.table({"img": [{"bytes": data, "path": None} for data, _, _ in rows],
                      "fine_label": [label for *_, label in rows], "coarse_label": [label % 2 for *_, label in rows]})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}),
                   tmp_path / "cifar.parquet")
    result = unpack_dataset(tmp_path / "cifar.parquet", tmp_path / "fine", progress=False)
    assert (result.label_column, result.other_label_columns) == ("fine_label", ["coarse_label"])
    assert result.classes == ["_.hidden", "a_b", "apple"]  # a folder name for each: none hidden, no separator
    assert sum(result.counts["train"].values()) == 6 and len(open_dataset(tmp_path / "fine").train) > 0
    coarse = unpack_dataset(tmp_path / "cifar.parquet", tmp_path / "coarse", label_column="coarse_label",
                            progress=False)
    assert coarse.classes == ["fruit", "other"] and coarse.counts["train"] == {"fruit": 4, "other": 2}


def test_without_hub_metadata_a_label_column_of_names_is_used_and_a_split_without_one_is_unlabelled(tmp_path):
    rows = [(encoded((0, 0, 0)), f"{i}.png", name) for i, name in enumerate(["cat", "dog", "cat", "dog"])]
    write_hub_file(tmp_path / "train.parquet", rows, features={}, label_column="label")
    write_hub_file(tmp_path / "val.parquet", [(encoded((0, 0, 0)), "v.png", "dog")], features={}, label_column="label")
    pq.write_table(pa.table({"image": [{"bytes": encoded((0, 0, 0)), "path": "t.png"}]}), tmp_path / "test.parquet")
    result = unpack_dataset(tmp_path, tmp_path / "out", progress=False)
    assert result.counts == {"train": {"cat": 2, "dog": 2}, "val": {"dog": 1}}
    assert result.unlabelled == {"test": 1} and (tmp_path / "out/unlabelled/test/t.png").is_file()


MULTI_LABEL_CLASSES = ["cloudy", "partly cloudy", "water"]  # a space in a name: a 1/0 column per class holds it


def planet_dataset(root: Path) -> None:
    """A multi-label Hub dataset (a List of ClassLabel): images with two classes, none, one, a missing label
    and a class index out of range."""
    features = {"image": {"_type": "Image"},
                "labels": {"feature": {"names": MULTI_LABEL_CLASSES, "_type": "ClassLabel"}, "_type": "List"}}
    labels = [[0, 2], [], [1], None, [7], [2]]
    train = [(encoded((9, 9, 9)), f"{name}.png", label) for name, label in zip("abcdef", labels)]
    write_hub_file(root / "data/train-00000-of-00001.parquet", train, features)
    write_hub_file(root / "data/validation-00000-of-00001.parquet", [(encoded((1, 1, 1)), "v.png", [1, 2])], features)


DATASET_CARD = """---
license: mit
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
          '0': angular_leaf_spot
          '1': bean_rust
          '2': healthy
  splits:
  - name: train
    num_examples: 4
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# beans
"""


def test_files_written_without_the_hub_metadata_take_their_class_names_from_the_dataset_card(tmp_path):
    (tmp_path / "beans/data").mkdir(parents=True)
    (tmp_path / "beans/README.md").write_text(DATASET_CARD)
    rows = [(encoded((i, 0, 0)), f"{i}.png", i % 3) for i in range(4)]  # as pandas' to_parquet writes: no metadata
    write_hub_file(tmp_path / "beans/data/train-00000-of-00001.parquet", rows, features={}, label_column="label")
    result = unpack_dataset(tmp_path / "beans", tmp_path / "out", progress=False)
    assert result.classes == CLASSES and result.counts["train"]["angular_leaf_spot"] == 2
    # Two configurations naming the classes differently: which one is meant is not known, so the indices stay.
    (tmp_path / "beans/README.md").write_text(DATASET_CARD.replace(
        "dataset_info:\n  features:", "dataset_info:\n- config_name: default\n  features:").replace(
        "  splits:", "- config_name: other\n  features:\n  - name: label\n    dtype:\n      class_label:\n"
                     "        names:\n          '0': a\n          '1': b\n          '2': c\n  splits:"))
    assert card_features(tmp_path / "beans") == {"image": {"_type": "Image"}}  # read, the label left out
    assert unpack_dataset(tmp_path / "beans", tmp_path / "out2", progress=False).classes == ["0", "1", "2"]


def test_a_multi_label_column_becomes_a_listing_residual_trains_on_as_multi_label(tmp_path):
    names = MULTI_LABEL_CLASSES
    planet_dataset(tmp_path / "planet")
    result = unpack_dataset(tmp_path / "planet", tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert result.multi_label and result.data == out / "dataset.yaml" and result.classes == names
    assert result.images == {"train": 4, "val": 1} and result.unlabelled == {"train": 1}
    assert result.counts["train"] == {"cloudy": 1, "partly cloudy": 1, "water": 2}
    assert result.skipped_count == 1 and "row 4: label 7 is not one of the 3 classes" in result.skipped[0]
    assert (out / "labels.csv").read_text().splitlines()[:3] == [
        "image,split,cloudy,partly cloudy,water", "images/train/a.png,train,1,0,1", "images/train/b.png,train,0,0,0"]
    dataset = open_dataset(result.data)
    assert dataset.multi_label and dataset.classes == names
    assert dataset.train.labels == [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]] and dataset.val.labels == [[0, 1, 1]]
    assert [path.name for path in dataset.train.files] == ["a.png", "b.png", "c.png", "f.png"]
    # Without the Hub's metadata: a labels column of lists of names.
    write_hub_file(tmp_path / "tags/train.parquet", [(encoded((0, 0, 0)), f"{i}.png", tags) for i, tags in
                                                     enumerate([["clear", "water"], ["haze"], []])],
                   features={}, label_column="tags")
    tags = unpack_dataset(tmp_path / "tags", tmp_path / "tags-out", progress=False)
    assert tags.multi_label and tags.classes == ["clear", "haze", "water"] and tags.images == {"train": 3}
    # Nor with a card naming them: `list:` of ClassLabels as datasets 5 writes it, `sequence:` as earlier ones did.
    for key in ("list", "sequence"):
        (tmp_path / key / "data").mkdir(parents=True)
        (tmp_path / key / "README.md").write_text(
            f"---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: tags\n    {key}:\n"
            f"      class_label:\n        names:\n          '0': clear\n          '1': haze\n---\n")
        write_hub_file(tmp_path / key / "data/train-00000-of-00001.parquet",
                       [(encoded((0, 0, 0)), f"{i}.png", tags) for i, tags in enumerate([[0, 1], [1], []])],
                       features={}, label_column="tags")
        carded = unpack_dataset(tmp_path / key, tmp_path / f"{key}-out", progress=False)
        assert carded.multi_label and carded.classes == ["clear", "haze"]
        assert carded.counts["train"] == {"clear": 1, "haze": 2}


def test_arrow_files_as_the_datasets_library_keeps_them_and_rows_that_hold_only_a_path(tmp_path):
    """save_to_disk's train/data-00000-of-00001.arrow (Arrow's stream format) beside the cache's
    beans-validation.arrow (here in Arrow's file format); a row with only a path is read from that file."""
    metadata = {"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}}})}
    (tmp_path / "saved/train").mkdir(parents=True)
    (tmp_path / "saved/train/leaf.png").write_bytes(encoded((5, 5, 5)))  # as datasets keeps a local file's image
    images = [{"bytes": encoded((1, 1, 1)), "path": "a.png"}, {"bytes": None, "path": "leaf.png"},
              {"bytes": None, "path": "/nowhere/gone.png"}, {"bytes": encoded((2, 2, 2)), "path": None}]
    table = pa.table({"image": images, "label": [0, 1, 2, 2]}).replace_schema_metadata(metadata)
    with pa.ipc.new_stream(tmp_path / "saved/train/data-00000-of-00001.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):  # datasets writes batches of 100 images
            writer.write_batch(batch)
    validation = pa.table({"image": images[:1], "label": [1]}).replace_schema_metadata(metadata)
    with pa.ipc.new_file(tmp_path / "saved/beans-validation.arrow", validation.schema) as writer:
        writer.write_table(validation)
    result = unpack_dataset(tmp_path / "saved", tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert result.images == {"train": 3, "val": 1} and result.counts["val"] == {"bean_rust": 1}
    assert (out / "train/bean_rust/leaf.png").read_bytes() == (tmp_path / "saved/train/leaf.png").read_bytes()
    assert result.skipped == [f"{tmp_path / 'saved/train/data-00000-of-00001.arrow'} row 2: no image bytes in it, and "
                              f"its path /nowhere/gone.png cannot be read (No such file or directory)"]


def write_shard(path: Path, files: list[tuple[str, bytes]]) -> None:
    """A WebDataset shard: a tar of the files in order, grouped into samples by name; gzipped if named .tar.gz."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as archive:
        for name, data in files:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def test_webdataset_shards_as_timms_imagenet_ones_with_the_imagenet_names_for_their_indices(tmp_path, capsys,
                                                                                           monkeypatch):
    jpeg, png = encoded((9, 9, 9), "JPEG"), encoded((7, 7, 7))
    shards = tmp_path / "imagenet-1k-wds"
    shards.mkdir()
    write_shard(shards / "imagenet1k-train-0000.tar", [
        ("n01440764_1.JPEG", jpeg), ("n01440764_1.cls", b"0\n"),
        ("n01443537_2.jpg", jpeg), ("n01443537_2.cls", b"1"),
        ("part/x3.png", png), ("part/x3.json", json.dumps({"label": 2, "filename": "x3.png"}).encode()),
        ("odd.jpg", jpeg), ("odd.cls", b"not a number"),
        ("alone.jpg", jpeg),  # a sample without a label
        ("meta.cls", b"1")])  # a label without an image
    write_shard(shards / "imagenet1k-validation-0000.tar.gz", [("v1.jpg", jpeg), ("v1.cls", b"0"), ("v2.png", png),
                                                              ("v2.cls", b"2")])
    assert main(["unpack", str(shards), str(tmp_path / "named"), "--classes", "imagenet"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'named'}: 3 classes from .cls files" in out
    named = tmp_path / "named"
    assert sorted(p.name for p in (named / "train").iterdir()) == ["goldfish", "great white shark", "tench"]
    assert (named / "train/tench/n01440764_1.jpg").read_bytes() == jpeg
    assert (named / "train/great white shark/x3.png").is_file()
    assert sorted(p.name for p in (named / "val").iterdir()) == ["great white shark", "tench"]
    assert (named / "unlabelled/train/alone.jpg").is_file()
    assert "sample 3: label 'not a number' is not one of the 1000 classes' indices" in out
    assert "sample 5: no image in it" in out  # meta.cls
    result = unpack_dataset(shards, tmp_path / "indices", progress=False)  # no names: the indices are the classes
    assert result.counts["train"] == {"0": 1, "1": 1, "2": 1, "not a number": 1} and result.images["val"] == 2
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # shards are read without pyarrow
    assert unpack_dataset(shards, tmp_path / "without-pyarrow", progress=False).images["val"] == 2
    monkeypatch.undo()
    monkeypatch.setattr(unpack, "MAX_MEMBER_BYTES", 64)  # as a shard holding a file of many GiB
    with pytest.raises(UnpackError, match="n01440764_1.JPEG is 0.0 GiB, larger than any image; this is not a"):
        unpack_dataset(shards, tmp_path / "huge", progress=False)
    monkeypatch.undo()
    gzipped = (shards / "imagenet1k-validation-0000.tar.gz").read_bytes()
    (shards / "imagenet1k-validation-0000.tar.gz").write_bytes(gzipped[:len(gzipped) // 2])
    with pytest.raises(UnpackError, match=r"imagenet1k-validation-0000.tar.gz: not readable as a tar file, or cut "
                                          r"short \(Compressed file ended before the end-of-stream marker was "
                                          r"reached\); download it again$"):
        unpack_dataset(shards, tmp_path / "cut", progress=False)
    (shards / "imagenet1k-validation-0000.tar.gz").unlink()
    (shards / "imagenet1k-validation-0000.tar").write_bytes(gzipped)  # gzipped, though named .tar: read
    assert unpack_dataset(shards, tmp_path / "misnamed", progress=False).images["val"] == 2
    (shards / "imagenet1k-train-0000.tar").write_bytes((shards / "imagenet1k-train-0000.tar").read_bytes()[:1500])
    with pytest.raises(UnpackError, match="imagenet1k-train-0000.tar: .*download it again"):
        unpack_dataset(shards, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut").exists()


def test_what_cannot_be_unpacked_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    hub_dataset(tmp_path / "beans")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "labels.csv").write_text("image,label\n")
    with pytest.raises(UnpackError, match=r"labels.csv: not a .parquet, .arrow or .tar\(.gz\) file; residual train"):
        unpack_dataset(tmp_path / "labels.csv", tmp_path / "out", progress=False)
    with pytest.raises(UnpackError, match="already exists; give a new folder"):
        unpack_dataset(tmp_path / "beans", tmp_path / "full", progress=False)
    with pytest.raises(UnpackError, match="--label-column nope: no file of .*beans has such a column"):
        unpack_dataset(tmp_path / "beans", tmp_path / "out", label_column="nope", progress=False)
    write_hub_file(tmp_path / "unlabelled/test.parquet", [(encoded((0, 0, 0)), None, -1)])
    with pytest.raises(UnpackError, match="unlabelled: no labelled images in it"):
        unpack_dataset(tmp_path / "unlabelled", tmp_path / "out", progress=False)
    clash = {"image": {"_type": "Image"}, "label": {"names": ["a/b", "a_b"], "_type": "ClassLabel"}}
    write_hub_file(tmp_path / "clash/train.parquet", [(encoded((0, 0, 0)), None, 0)], clash, label_column="label")
    with pytest.raises(UnpackError, match=r"classes of label would share a folder name \(a_b\)"):
        unpack_dataset(tmp_path / "clash", tmp_path / "out", progress=False)
    write_hub_file(tmp_path / "mixed/train.parquet", [(encoded((0, 0, 0)), None, 0)])
    other = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    write_hub_file(tmp_path / "mixed/test.parquet", [(encoded((0, 0, 0)), None, 0)], other, label_column="label")
    with pytest.raises(UnpackError, match="train.parquet: its labels .labels. differ from .*test.parquet's .label.; "
                                          "unpack the files of one dataset together"):
        unpack_dataset(tmp_path / "mixed", tmp_path / "out", progress=False)
    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs/train-00000-of-00001.parquet").write_text(  # what git clone gives without git-lfs
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1234\n")
    with pytest.raises(UnpackError, match="a Git LFS pointer, not the file itself; fetch the files"):
        unpack_dataset(tmp_path / "lfs", tmp_path / "out", progress=False)
    whole = (tmp_path / "beans/data/validation-00000-of-00001.parquet").read_bytes()
    (tmp_path / "cut/data").mkdir(parents=True)
    (tmp_path / "cut/data/train-00000-of-00001.parquet").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnpackError, match="not readable as Parquet, or cut short .*; download it again"):
        unpack_dataset(tmp_path / "cut", tmp_path / "out", progress=False)
    damaged = bytearray(whole)
    pages = slice(50, len(whole) // 3)  # inside the first row group, well before the footer
    damaged[pages] = bytes((value * 7 + 13) % 256 for value in damaged[pages])
    (tmp_path / "cut/data/train-00000-of-00001.parquet").write_bytes(bytes(damaged))
    with pytest.raises(UnpackError, match="row group 0 cannot be read .*; download the file again"):
        unpack_dataset(tmp_path / "cut", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    calls = []

    def killed_midway(self, data):  # as Ctrl-C (or a full disk) while the images are written
        calls.append(self)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return Path.write_text(self, "")

    monkeypatch.setattr(Path, "write_bytes", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        unpack_dataset(tmp_path / "beans", tmp_path / "out", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # no half a dataset, no leftovers
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    assert main(["unpack", str(tmp_path / "beans"), str(tmp_path / "out")]) == 2
    assert "files are read by pyarrow, which is not installed: pip install pyarrow" in capsys.readouterr().err


def test_what_a_killed_unpack_left_behind_is_removed_by_the_next_one_into_the_same_folder(tmp_path, capsys):
    hub_dataset(tmp_path / "beans")
    gone = subprocess.Popen(["true"])
    gone.wait()  # its process id is free now: as an unpack that was killed
    host = socket.gethostname()
    stale, running = tmp_path / f".images.{host}-{gone.pid}-0badc0de.partial", \
        tmp_path / f".images.{host}-{os.getpid()}-0000cafe.partial"
    elsewhere = tmp_path / f".images.other-host-{gone.pid}-12345678.partial"  # a process of another machine
    for folder in (stale, running, elsewhere):
        (folder / "train/healthy").mkdir(parents=True)
        (folder / "train/healthy/0000001.png").write_bytes(b"half")
    assert main(["unpack", str(tmp_path / "beans"), str(tmp_path / "images")]) == 0
    assert f"removed {stale}: what an unpack into {tmp_path / 'images'} that was stopped left behind" in \
        capsys.readouterr().out
    assert not stale.exists() and running.exists() and elsewhere.exists()


def test_the_unpack_command_says_what_it_wrote_and_what_it_left_out(tmp_path, capsys):
    hub_dataset(tmp_path / "beans")
    assert main(["unpack", str(tmp_path / "beans"), str(tmp_path / "images")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'images'}: 3 classes from column labels" in out
    assert "train/: 11 images, 3 classes (3 to 4 images per class)" in out and "val/: 6 images, 3 classes" in out
    assert "unlabelled/test/: 3 images without a label (for residual predict)" in out
    assert "extra-00000-of-00001.parquet: its split, extra, is not train, validation or test (--split extra=train " \
        "takes it in)" in out
    assert "skipped 2 rows" in out and "row 3: not an image Pillow can read" in out
    assert f"Next: residual train {tmp_path / 'images'}" in out
    assert main(["unpack", str(tmp_path / "beans"), "/sys/images"]) == 2  # a folder no one may write in
    assert capsys.readouterr().err.startswith("error: /sys/images: Operation not permitted")
    planet_dataset(tmp_path / "planet")
    assert main(["unpack", str(tmp_path / "planet"), str(tmp_path / "planet-images")]) == 0
    out = capsys.readouterr().out
    assert f"train rows of {tmp_path / 'planet-images/labels.csv'}: 4 images, 3 classes (1 to 2 images per class)" \
        in out
    assert f"Next: residual train {tmp_path / 'planet-images/dataset.yaml'}" in out
