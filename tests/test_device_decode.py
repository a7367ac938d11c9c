"""`--decoder torchvision`: the workers read and check the files, the JPEGs are decoded on the device.

Which files go to the device, the EXIF orientations and the batch assembly are tested
everywhere. Decoding through torchvision runs where it imports: not in CI (torchvision has
no build beside the CPU torch there), but in a venv with torch 2.14.1 + torchvision 0.29.1
on the CPU (docs/performance.md says how) and on the GPU machine, where it is nvjpeg.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

import residual
from residual.bench import write_jpegs
from residual.cli import main
from residual.data.datasets import open_dataset
from residual.data.decode import BadImageError, read_image
from residual.data.device_decode import (EncodedBatch, EncodedJpeg, check_decoder, collate_encoded, oriented,
                                         read_encoded)
from residual.data.loaders import BadFileLog, FileLoader, inference_batches
from residual.data.transforms import resize_center_crop
from residual.errors import ConfigError
from residual.models import prepare_for_inference
from residual.predict import probabilities_in_flight
from residual.runs import pick_device

try:
    check_decoder("torchvision", torch.device("cpu"))
    TORCHVISION = None
except ConfigError as error:
    TORCHVISION = str(error)
needs_torchvision = pytest.mark.skipif(TORCHVISION is not None, reason=f"{TORCHVISION}")
CPU = torch.device("cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour with noise, and no symmetry, so a wrong flip or turn shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([40 + 180 * x / width, 40 + 180 * y / height, 128 + 60 * np.sin(x / 7 + y / 11)], axis=2)
    return Image.fromarray(np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8))


def save_jpeg(image: Image.Image, path, orientation: int | None = None):
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def corrupt_huffman_table(path):
    """A JPEG whose header still parses but whose Huffman table is garbage: no decoder can read it."""
    data = bytearray(path.read_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 25] = b"\xff" * 20
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_the_image_as_pillow_does(orientation):
    image = photo(7, 4)
    image.getexif()[0x0112] = orientation
    expected = torch.from_numpy(np.asarray(ImageOps.exif_transpose(image)).copy()).permute(2, 0, 1)
    pixels = torch.from_numpy(np.asarray(photo(7, 4)).copy()).permute(2, 0, 1)
    assert torch.equal(oriented(pixels, orientation), expected)


def test_plain_jpegs_go_to_the_device_and_everything_else_to_pillow(tmp_path):
    upright = save_jpeg(photo(40, 30), tmp_path / "upright.jpg")
    turned = save_jpeg(photo(40, 30), tmp_path / "turned.jpg", orientation=6)
    grey = tmp_path / "grey.jpg"
    photo(40, 30).convert("L").save(grey, quality=95)
    cmyk = tmp_path / "cmyk.jpg"
    photo(40, 30).convert("CMYK").save(cmyk, quality=95)
    png = tmp_path / "image.png"
    photo(40, 30).save(png)
    for path, orientation in [(upright, 1), (turned, 6), (grey, 1)]:
        encoded = read_encoded(path, 32, 28, "bilinear")
        assert isinstance(encoded, EncodedJpeg) and encoded.orientation == orientation
        assert encoded.data.tobytes() == path.read_bytes() and encoded.name == str(path)
    for path in [cmyk, png]:  # decoded by Pillow in the worker, as --decoder pillow would
        assert torch.equal(read_encoded(path, 32, 28, "bilinear"),
                           resize_center_crop(read_image(path, 32), 32, 28, "bilinear"))
    bomb = tmp_path / "bomb.jpg"  # over Pillow's warning limit, which read_image refuses too
    Image.new("L", (9600, 9600)).save(bomb, quality=10)
    with pytest.raises(BadImageError, match="decompression bomb"):
        read_encoded(bomb, 32, 28, "bilinear")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(upright.read_bytes()[:-200])
    (tmp_path / "empty.jpg").write_bytes(b"")
    for path, reason in [(truncated, "truncated"), (tmp_path / "empty.jpg", "empty"),
                         (tmp_path / "missing.jpg", "no such file")]:
        with pytest.raises(BadImageError, match=reason):
            read_encoded(path, 32, 28, "bilinear")


def test_a_batch_keeps_its_order_around_the_failures():
    """Items Pillow decoded and items no decoder could read: the batch lists the readable ones in order."""
    decoded = [torch.full((3, 4, 4), value, dtype=torch.uint8) for value in (10, 20, 30)]
    items = [(5, decoded[0], None), (6, None, "a.jpg: corrupt"), (7, decoded[1], None), (8, decoded[2], None)]
    batch = collate_encoded(items)
    assert isinstance(batch, EncodedBatch) and batch.jpeg_sizes == [] and batch.jpegs.numel() == 0
    indices, images, failed = batch.decode(CPU, 4, 4, "bilinear")
    assert indices == [5, 7, 8] and failed == [(6, "a.jpg: corrupt")]
    assert images[:, 0, 0, 0].tolist() == [10, 20, 30]


def test_an_encoded_batch_is_page_locked_for_the_gpu(tmp_path, stand_in_pinning):
    """DataLoader(pin_memory=True) leaves objects it does not know as they are, so the batch pins its tensors
    itself (stood in for here; see conftest)."""
    jpeg = save_jpeg(photo(40, 30), tmp_path / "a.jpg")
    photo(40, 30).save(tmp_path / "b.png")
    batch = collate_encoded([(0, read_encoded(jpeg, 32, 28, "bilinear"), None),
                             (1, read_encoded(tmp_path / "b.png", 32, 28, "bilinear"), None),
                             (2, None, "c.jpg: corrupt")])
    pinned = torch.utils.data._utils.pin_memory.pin_memory(batch)
    assert pinned.jpegs.page_locked and pinned.decoded.page_locked
    assert torch.equal(pinned.jpegs, batch.jpegs) and torch.equal(pinned.decoded, batch.decoded)
    assert dataclasses.replace(pinned, jpegs=batch.jpegs, decoded=batch.decoded) == batch


def test_an_unknown_decoder_is_a_one_line_error():
    with pytest.raises(ConfigError, match="--decoder must be one of"):
        check_decoder("nvdec", CPU)


@pytest.mark.skipif(TORCHVISION is None, reason="torchvision's decoder works here")
def test_torchvision_decoder_without_torchvision_says_what_to_do():
    assert "--decoder torchvision" in TORCHVISION and "--decoder pillow" in TORCHVISION
    assert "\n" not in TORCHVISION


@needs_torchvision
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_device_decoding_gives_pillows_pixels(tmp_path, orientation, device):
    path = save_jpeg(photo(120, 90), tmp_path / "photo.jpg", orientation)
    batch = collate_encoded([(0, read_encoded(path, 64, 56, "bilinear"), None)])
    indices, images, failed = batch.decode(torch.device(device), 64, 56, "bilinear")
    expected = resize_center_crop(read_image(path), 64, 56, "bilinear")
    difference = (images[0].cpu().int() - expected.int()).abs()
    assert indices == [0] and not failed and images.shape == (1, 3, 56, 56) and images.device.type == device
    # The same libjpeg-turbo on the CPU; nvjpeg upsamples colour its own way (a bound not yet seen on a GPU).
    # A wrong turn or crop costs tens of levels.
    assert difference.float().mean() < (0.5 if device == "cpu" else 1.5)


@needs_torchvision
@pytest.mark.parametrize("workers", [0, 1])
def test_file_loader_decoding_on_the_device_matches_pillow(tmp_path, workers):
    root = write_jpegs(tmp_path / "data", (80, 60), 12, classes=2)
    train = root / "train" / "class0"
    save_jpeg(photo(60, 80), train / "turned.jpg", orientation=8)
    photo(70, 50).save(train / "drawing.png")
    photo(64, 48, seed=3).convert("L").save(train / "grey.jpg", quality=95)
    corrupt_huffman_table(save_jpeg(photo(60, 40, seed=1), train / "corrupt.jpg"))
    (train / "cut.jpg").write_bytes((train / "00000.jpg").read_bytes()[:300])
    split = open_dataset(root).train
    batches = {}
    for decoder in ("pillow", "torchvision"):
        bad = BadFileLog()
        loader = FileLoader(split, 5, False, 0, CPU, 48, 40, "bilinear", workers, bad, decoder=decoder)
        batches[decoder] = list(loader.epoch(0))
        assert sorted(bad.files) == sorted(str(train / name) for name in ("corrupt.jpg", "cut.jpg"))
    for (ours, labels), (pillow, pillow_labels) in zip(batches["torchvision"], batches["pillow"], strict=True):
        assert torch.equal(labels, pillow_labels) and ours.shape == pillow.shape and ours.dtype == torch.uint8
        assert (ours.int() - pillow.int()).abs().float().mean() < 0.5


@pytest.mark.skipif(TORCHVISION is None, reason="torchvision's decoder works here")
def test_train_with_the_torchvision_decoder_missing_is_a_one_line_error_before_any_file(tmp_path, capsys):
    data = write_jpegs(tmp_path / "data", (40, 30), 4)
    assert main(["train", str(data), "--decoder", "torchvision", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --decoder torchvision: torchvision cannot decode JPEGs") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@needs_torchvision
def test_train_decoding_on_the_device_reports_the_files_it_skipped(tmp_path, capsys):
    data = write_jpegs(tmp_path / "data", (80, 60), 16, classes=2)
    corrupt = corrupt_huffman_table(save_jpeg(photo(60, 40, seed=2), data / "train" / "class1" / "corrupt.jpg"))
    assert main(["train", str(data), "--decoder", "torchvision", "--no-in-memory", "--workers", "1", "--model",
                 "resnet20", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--quiet", "--no-report",
                 "--out", str(tmp_path / "runs"), "--name", "run"]) == 0
    run = tmp_path / "runs" / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["decoder"] == "torchvision"
    bad_files = json.loads((run / "summary.json").read_text())["bad_files"]
    assert list(bad_files) == [str(corrupt)] and "corrupt JPEG data" in bad_files[str(corrupt)]
    assert (run / "model.safetensors").is_file()


@needs_torchvision
@pytest.mark.parametrize(("workers", "device"), [(0, "cpu"), (1, "cpu"), pytest.param(1, "cuda", marks=CUDA)])
def test_inference_stream_decoding_on_the_device_matches_pillow(tmp_path, workers, device):
    """evaluate's and predict's stream: files of every kind, and images given in memory, in their order,
    on the device either way (page-locked on the way to a GPU)."""
    folder = write_jpegs(tmp_path / "data", (80, 60), 6, classes=1) / "train" / "class0"
    items = sorted(folder.iterdir())
    items.insert(1, save_jpeg(photo(60, 80), tmp_path / "turned.jpg", orientation=6))
    items.insert(3, corrupt_huffman_table(save_jpeg(photo(60, 40, seed=1), tmp_path / "corrupt.jpg")))
    items.insert(4, photo(50, 70, seed=4))  # a PIL image
    items.append(tmp_path / "missing.jpg")
    items.append(np.asarray(photo(64, 48, seed=5)))  # an array
    streams = {decoder: list(inference_batches(items, 48, 40, "bilinear", 4, workers, decoder, device))
               for decoder in ("pillow", "torchvision")}
    for ours, pillow in zip(streams["torchvision"], streams["pillow"], strict=True):
        assert ours.indices == pillow.indices and ours.images.shape == pillow.images.shape
        assert ours.images.device.type == pillow.images.device.type == device
        assert sorted(ours.failed)[0][0] == sorted(pillow.failed)[0][0] if pillow.failed else not ours.failed
        # As test_device_decoding_gives_pillows_pixels: nvjpeg's colour upsampling differs a little.
        difference = (ours.images.int() - pillow.images.int()).abs().float().mean()
        assert difference < (0.5 if device == "cpu" else 1.5)
    failed = [message for batch in streams["torchvision"] for _, message in sorted(batch.failed)]
    assert [message.split(": ")[0] for message in failed] == [str(tmp_path / "corrupt.jpg"),
                                                             str(tmp_path / "missing.jpg")]
    assert "corrupt JPEG data" in failed[0]


def jpeg_copies(demo_run, root, per_class: int = 6):
    """Some of the demo's test images as JPEGs in class folders, one of them stored on its side with an
    EXIF tag to stand it up (and its pixels as PNGs: upright, and as they would be with the tag ignored),
    and a corrupt one."""
    for name in ("star", "ring", "cross", "circle"):
        (root / name).mkdir(parents=True)
        for source in sorted((demo_run["data"] / "test" / name).glob("*.png"))[:per_class]:
            Image.open(source).convert("RGB").save(root / name / f"{source.stem}.jpg", quality=95)
    upright = Image.open(root / "star" / "00000.jpg")
    save_jpeg(upright.transpose(Image.Transpose.ROTATE_90), root / "star" / "turned.jpg", orientation=6)
    turned = Image.open(root / "star" / "turned.jpg")
    ImageOps.exif_transpose(turned).save(root / "star" / "upright.png")
    Image.fromarray(np.asarray(turned.convert("RGB"))).save(root / "star" / "sideways.png")
    shutil.copy(root / "ring" / "00000.jpg", root / "ring" / "corrupt.jpg")
    corrupt_huffman_table(root / "ring" / "corrupt.jpg")
    return root


@needs_torchvision
def test_predict_and_eval_decoding_on_the_device_agree_with_pillow(demo_run, tmp_path, capsys):
    images = jpeg_copies(demo_run, tmp_path / "images")
    model = str(demo_run["model"])
    predictions, metrics = {}, {}
    for decoder in ("pillow", "torchvision"):
        out = tmp_path / f"{decoder}.json"
        assert main(["predict", model, str(images), "--decoder", decoder, "--format", "json", "--out", str(out),
                     "--batch-size", "8", "--workers", "1", "--quiet"]) == 1  # the corrupt file
        assert "corrupt.jpg" in capsys.readouterr().err
        predictions[decoder] = {row["image"]: row["top"][0] for row in json.loads(out.read_text())}
        report = tmp_path / f"eval-{decoder}"
        assert main(["eval", model, str(images), "--decoder", decoder, "--out", str(report), "--gallery", "2",
                     "--workers", "0", "--quiet"]) == 0
        metrics[decoder] = json.loads((report / "metrics.json").read_text())
    assert predictions["torchvision"].keys() == predictions["pillow"].keys() and len(predictions["pillow"]) == 27
    assert metrics["torchvision"]["images"] == metrics["pillow"]["images"] == 27
    device = pick_device("auto")
    # Each file's answer is the model's on that file's pixels as the device decoded them (predict's precision).
    network = prepare_for_inference(residual.load_model(model).to(device), device, "auto")
    files = [Path(name) for name in predictions["torchvision"]]
    pre = network.preprocessing
    batches = inference_batches(files, pre.resize_size, pre.input_size, pre.interpolation, 8, 0, "torchvision", device)
    for batch, probabilities in probabilities_in_flight(network, batches):
        for index, row in zip(batch.indices, probabilities):
            top = predictions["torchvision"][str(files[index])]
            assert top["class_id"] == int(row.argmax()) and top["probability"] == pytest.approx(float(row.max()),
                                                                                                abs=0.01)
    # Against Pillow's decoding. On the CPU torchvision decodes with libjpeg-turbo as Pillow does: the same
    # answers. nvjpeg upsamples colour differently, which moves these 32 px JPEGs by 4.4 grey levels on average
    # (benchmarks/decoder_agreement.py; 0.5 on photo-sized ones) and a hesitant answer with them: on CUDA the
    # confident answers must agree.
    on_cpu = device.type == "cpu"
    tolerance, confident = (1e-4, 0.0) if on_cpu else (1.0, 0.9)

    def agree(ours: dict, theirs: dict, name: str):
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=tolerance), name
        assert ours["class_name"] == theirs["class_name"] or theirs["probability"] < confident, name

    for image, top in predictions["torchvision"].items():
        agree(top, predictions["pillow"][image], image)
    assert metrics["torchvision"]["top1"] == pytest.approx(metrics["pillow"]["top1"], abs=0 if on_cpu else 2 / 27)
    # The JPEG stored on its side is read upright on the device: the answer its upright pixels get. (The pixels
    # themselves are checked in every orientation by test_device_decoding_gives_pillows_pixels.)
    turned, upright, sideways = (predictions["torchvision"][str(images / "star" / name)]
                                 for name in ("turned.jpg", "upright.png", "sideways.png"))
    agree(turned, upright, "turned.jpg")
    if on_cpu:  # where the answers are exact, the sideways pixels' answer differs: the check above can tell
        assert (sideways["class_name"], sideways["probability"]) != (upright["class_name"], upright["probability"])


@pytest.mark.skipif(TORCHVISION is None, reason="torchvision's decoder works here")
def test_predict_and_eval_with_the_torchvision_decoder_missing_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where eval would make its default runs/eval folder
    data = write_jpegs(tmp_path / "data", (40, 30), 4)
    model = residual.save_model(residual.create_model("resnet20", num_classes=2), tmp_path / "model.safetensors")
    assert main(["predict", str(model), str(data), "--decoder", "torchvision", "--format", "csv"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --decoder torchvision: torchvision cannot decode JPEGs")
    assert err.count("\n") == 1
    assert main(["eval", str(model), str(data), "--decoder", "torchvision"]) == 2
    assert capsys.readouterr().err == err and not (tmp_path / "runs").exists()
