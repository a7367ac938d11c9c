"""`residual predict`: batched, streamed predictions; bad files named, the rest predicted."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from residual import load_model
from residual.cli import main
from residual.data.decode import image_files, read_image
from residual.data.loaders import InferenceBatch
from residual.data.transforms import normalize, resize_center_crop
from residual.errors import ConfigError
from residual.models import Preprocessing, build_model
from residual.predict import (Prediction, class_probabilities, decode_predictions, inference_compile, iter_predict,
                              predict, preprocess_input, probabilities_in_flight, tta_views, write_csv, write_json,
                              write_labels)
from residual.tables import predictions_table


@pytest.fixture(scope="module")
def model(demo_run):
    return load_model(demo_run["model"]).eval()


@pytest.fixture
def folder(demo_run, tmp_path):
    """Twelve test images in class folders, plus a corrupt PNG and a text file named like an image."""
    for name in ("star", "ring", "cross"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for source in sorted((demo_run["data"] / "test" / name).iterdir())[:4]:
            shutil.copy(source, tmp_path / "imgs" / name / source.name)
    whole = (tmp_path / "imgs" / "ring" / "00000.png").read_bytes()
    (tmp_path / "imgs" / "ring" / "truncated.png").write_bytes(whole[:60])
    (tmp_path / "imgs" / "notes.jpg").write_text("not an image")
    return tmp_path / "imgs"


def test_predict_names_bad_files_and_predicts_the_rest(model, folder):
    result = predict(model, folder, topk=3, batch_size=5)
    assert len(result.predictions) == 12
    assert len(result.failed) == 2
    assert any("truncated.png" in m for m in result.failed) and any("notes.jpg" in m for m in result.failed)
    for prediction in result.predictions:
        assert len(prediction.top) == 3
        probabilities = [p for _, _, p in prediction.top]
        assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > 0.5
        assert prediction.top[0][1] == prediction.source.split("/")[-2]  # the right shape, by its folder


def test_a_csv_of_images_is_predicted_in_its_order_and_its_bad_rows_reported(model, demo_run, folder, tmp_path,
                                                                             capsys):
    """A CSV with an image column (labels and other columns ignored), relative to its folder or absolute: its
    files are predicted in the CSV's order, each named as the CSV names it, under the CSV's column name; a
    listed file that is missing or unreadable is reported by its path."""
    listed = ["star/00001.png", str(folder / "ring" / "00000.png"), "missing.png", "ring/truncated.png",
              "cross/00002.png"]
    rows = "".join(f"{index};{name};x\n" for index, name in enumerate(listed))
    (folder / "list.csv").write_text("id;filepath;label\n" + rows)
    expected = [listed[0], listed[1], listed[4]]
    result = predict(model, folder / "list.csv", topk=1)
    assert [p.source for p in result.predictions] == expected
    assert [p.top[0][1] for p in result.predictions] == ["star", "ring", "cross"]
    assert len(result.failed) == 2 and f"{folder / 'missing.png'}: " in result.failed[0]
    assert f"{folder / 'ring' / 'truncated.png'}: " in result.failed[1]
    out = tmp_path / "p.csv"
    assert main(["predict", str(demo_run["model"]), str(folder / "list.csv"), "--out", str(out), "--topk", "1",
                 "--quiet"]) == 1
    assert [row["filepath"] for row in csv.DictReader(io.StringIO(out.read_text()))] == expected
    assert capsys.readouterr().err.count("error: ") == 2
    # A folder beside the CSV: no one listing names every image, so the column is "image", with paths.
    assert main(["predict", str(demo_run["model"]), str(folder / "list.csv"), str(folder / "cross"), "--format",
                 "labels", "--out", str(out), "--quiet"]) == 1
    header, *rows = csv.reader(io.StringIO(out.read_text()))
    assert header == ["image", "label"] and [row[0] for row in rows[:3]] == expected
    assert rows[3:] == [[str(path), "cross"] for path in sorted((folder / "cross").glob("*.png"))]
    capsys.readouterr()
    (tmp_path / "empty.csv").write_text("filepath,label\nstar/00001.png,star\n,star\n")
    assert main(["predict", str(demo_run["model"]), str(tmp_path / "empty.csv")]) == 2
    error = f"error: {tmp_path / 'empty.csv'}: line 3 has no filepath; every row needs an image\n"
    assert capsys.readouterr().err == error


def test_answers_reach_the_host_one_batch_behind_the_device():
    """The host waits for a batch's answers only once the next batch is queued, so a GPU is never left idle
    between batches; a batch with no readable image passes through with no answers."""
    model = build_model("resnet20", num_classes=3).eval()
    asked = []
    model.register_forward_pre_hook(lambda _module, args: asked.append(len(args[0])))
    images = [torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8) for count in (4, 2, 3)]
    batches = [InferenceBatch([0, 1, 2, 3], images[0], []), InferenceBatch([], None, [(4, "bad")]),
               InferenceBatch([5, 6], images[1], []), InferenceBatch([7, 8, 9], images[2], [])]
    seen = []
    for batch, probabilities, features in probabilities_in_flight(model, iter(batches)):
        seen.append((batch, list(asked)))
        assert features is None  # not asked for
        if batch.images is None:
            assert probabilities is None
        else:
            assert probabilities.device.type == "cpu"
            torch.testing.assert_close(probabilities, class_probabilities(model, batch.images))
            asked.pop()  # that check's own forward
    assert [batch for batch, _ in seen] == batches
    # When each batch reached the host, the forwards asked for so far (the batch after it already queued):
    assert [forwards for _, forwards in seen] == [[4], [4, 2], [4, 2, 3], [4, 2, 3]]


def test_the_pooled_features_come_with_the_probabilities_averaged_over_the_views_as_they_are():
    model = build_model("resnet20", num_classes=3).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = normalize(images.float() / 255, model.preprocessing)
    pooled = lambda view: model.forward_head(model.forward_features(view), pre_logits=True)  # noqa: E731
    for tta in ("none", "flip"):
        [(_, probabilities, features)] = probabilities_in_flight(model, iter([InferenceBatch([0, 1, 2], images, [])]),
                                                                 tta, features=True)
        torch.testing.assert_close(probabilities, class_probabilities(model, images, tta))
        with torch.inference_mode():
            expected = torch.stack([pooled(view) for view in tta_views(x, tta)]).mean(0)
        torch.testing.assert_close(features, expected)
    assert not model.fc._forward_pre_hooks  # the hook that read them is gone


def test_worker_streaming_keeps_order_and_numbers(model, folder):
    files = [f for f in image_files([folder]) if f.name != "truncated.png" and f.suffix == ".png"]
    alone = predict(model, files, batch_size=4)
    streamed = list(iter_predict(model, files, batch_size=4, workers=2))
    assert [p.source for p in streamed] == [str(f) for f in files] == [p.source for p in alone.predictions]
    for a, b in zip(alone.predictions, streamed):
        assert a.top[0][:2] == b.top[0][:2] and a.top[0][2] == pytest.approx(b.top[0][2], abs=1e-6)


def test_cli_formats_and_exit_code(model, demo_run, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    model_file = str(demo_run["model"])
    assert main(["predict", model_file, str(folder), "--format", "csv", "--topk", "2", "--quiet"]) == 1
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert len(rows) == 24 and rows[0].keys() == {"image", "rank", "class_id", "class_name", "probability"}
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert main(["predict", model_file, str(folder / "star"), "--format", "json", "--out", str(tmp_path / "p.json"),
                 "--quiet"]) == 0
    document = json.loads((tmp_path / "p.json").read_text())
    assert len(document) == 4 and document[0]["top"][0]["class_name"] == "star"
    assert len(document[0]["top"]) == 5
    # JSON Lines: the same rows, an object per line (chosen by --format, or by an --out ending in .jsonl).
    assert main(["predict", model_file, str(folder / "star"), "--out", str(tmp_path / "p.jsonl"), "--quiet"]) == 0
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == document
    capsys.readouterr()
    assert main(["predict", model_file, str(folder / "star"), "--format", "jsonl", "--quiet"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == document
    capsys.readouterr()
    assert main(["predict", model_file, str(folder / "star"), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    written = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert capsys.readouterr().out == "" and len(written) == 4 * 5
    for table in (["--out", str(tmp_path / "p.txt")], ["--format", "table", "--out", str(tmp_path / "p.csv")]):
        assert main(["predict", model_file, str(folder / "star"), *table]) == 2  # the file would not be written
        assert "a table is printed, not written; give --format csv, json or jsonl" in capsys.readouterr().err
    assert main(["predict", model_file, str(folder / "cross" / "00000.png"), "--topk", "20"]) == 0
    out = capsys.readouterr().out
    assert "cross" in out and "top-10 of 1 image(s)" in out  # the model has 10 classes (it said top-20)
    assert main(["predict", model_file, str(tmp_path / "empty-dir-that-is-missing")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().endswith("empty-dir-that-is-missing: no such file")


def test_every_class_probability_in_a_column_of_its_own(model, demo_run, folder, tmp_path, capsys):
    """--format probabilities: a row per image, a column per class in the model's order (a Kaggle
    submission's shape; several models' files average into an ensemble), equal to the model's answers."""
    assert main(["predict", str(demo_run["model"]), str(folder / "star"), str(folder / "ring"), "--format",
                 "probabilities", "--out", str(tmp_path / "p.csv"), "--topk", "2", "--quiet"]) == 1  # truncated.png
    assert "truncated.png" in capsys.readouterr().err
    with open(tmp_path / "p.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["image", *model.class_names]
    expected = {p.source: dict((name, probability) for _, name, probability in p.top)
                for p in predict(model, [folder / "star", folder / "ring"], topk=10).predictions}
    assert [row[0] for row in rows] == list(expected) and len(rows) == 8
    for image, *values in rows:
        assert [float(value) for value in values] == pytest.approx([expected[image][name]
                                                                    for name in model.class_names], abs=1e-6)
        assert sum(float(value) for value in values) == pytest.approx(1.0, abs=1e-4)


def test_compiled_prediction_matches_eager_and_compiles_once(model, folder, capsys):
    """torch.compile for long jobs: the same predictions, and one graph for the whole stream, the shorter last
    batch included (it is padded to the batch size rather than compiled again)."""
    files = [f for f in image_files([folder]) if f.suffix == ".png" and f.name != "truncated.png"][:10]
    eager = predict(model, files, topk=2, batch_size=4, compile=False).predictions
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = predict(model, files, topk=2, batch_size=4, compile=True).predictions  # batches of 4, 4 and 2
    assert counters["stats"]["unique_graphs"] == 1
    assert [p.source for p in compiled] == [p.source for p in eager]
    for ours, theirs in zip(compiled, eager):
        assert [c for c, _, _ in ours.top] == [c for c, _, _ in theirs.top]
        assert [s for _, _, s in ours.top] == pytest.approx([s for _, _, s in theirs.top], abs=1e-4)
    assert inference_compile(model, None, 10**9) == (False, "off (chosen automatically only on CUDA; this run is "
                                                            "on cpu)")
    assert inference_compile(model, True, 3) == (True, "on (as asked)")


def test_bad_arguments_fail_before_any_output(model, demo_run, folder, capsys):
    files = image_files([folder])
    for arguments, flag in [({"topk": 0}, "--topk"), ({"tta": "sideways"}, "--tta"),
                            ({"decoder": "opencv"}, "--decoder")]:
        with pytest.raises(ConfigError, match=flag):
            iter_predict(model, files, **arguments)  # at the call, not at the first prediction
    assert main(["predict", str(demo_run["model"]), str(folder), "--format", "csv", "--topk", "0", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: --topk must be at least 1, got 0\n"


def test_predict_takes_pil_images_and_arrays(model, folder):
    path = sorted((folder / "star").iterdir())[0]
    image = read_image(path)
    result = predict(model, [image, np.asarray(image), path])
    assert [p.source for p in result.predictions] == ["#0", "#1", str(path)]
    tops = [p.top[0] for p in result.predictions]
    assert tops[0] == tops[1] == tops[2]


def test_preprocess_input_matches_the_model_pipeline(model, folder):
    path = sorted((folder / "ring").iterdir())[1]
    pre = model.preprocessing
    expected = normalize(resize_center_crop(read_image(path), pre.resize_size, pre.input_size)[None].float() / 255, pre)
    torch.testing.assert_close(preprocess_input([path], model), expected)
    array = np.asarray(read_image(path), dtype=np.float32)  # Keras style: N x H x W x 3, 0-255
    torch.testing.assert_close(preprocess_input(array[None], model), expected, atol=1e-6, rtol=0)
    imagenet = preprocess_input(np.full((2, 8, 8, 3), 255.0))
    torch.testing.assert_close(imagenet[:, :, 0, 0], torch.tensor([[(1 - m) / s for m, s in
                               zip(Preprocessing().mean, Preprocessing().std)]] * 2))


def test_decode_predictions_rows_and_imagenet_names():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    rows = decode_predictions(logits, top=2, class_names=["cat", "dog", "fox"])
    assert [(i, n) for i, n, _ in rows[0]] == [(1, "dog"), (2, "fox")]
    assert rows[0][0][2] == pytest.approx(torch.softmax(logits[0], 0)[1].item())
    probabilities = np.zeros((1, 1000))
    probabilities[0, 207] = 1.0
    [[(class_id, name, score)]] = decode_predictions(probabilities, top=1)
    assert (class_id, name, score) == (207, "golden retriever", 1.0)
    with pytest.raises(ConfigError, match="2 class names for 3 scores"):
        decode_predictions(logits, class_names=["a", "b"])


def test_the_documented_keras_style_example_runs_as_written(demo_run, folder):
    """docs/evaluation.md: load_model, preprocess_input, then decode_predictions(model(x)). model(x) carries a
    graph (it raised a RuntimeError in numpy()), and a loaded model predicts in eval mode."""
    model = load_model(demo_run["model"])
    assert not model.training
    paths = [sorted((folder / name).iterdir())[0] for name in ("star", "ring")]
    x = preprocess_input(paths, model)
    rows = decode_predictions(model(x), top=2, class_names=model)
    assert [row[0][1] for row in rows] == ["star", "ring"]
    with torch.no_grad():
        assert rows == decode_predictions(model(x).numpy(), top=2, class_names=model.class_names)


def test_tta_views_are_flips_and_shifts():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    assert len(tta_views(x, "none")) == 1
    flip = tta_views(x, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(3))
    views = tta_views(x, "flip-shift")
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[2][..., 2:, 2:], x[..., :-2, :-2])  # shifted by 32 / 16 = 2 pixels
    with pytest.raises(ConfigError):
        tta_views(x, "rotate")


def test_ten_crop_views_are_the_corners_and_centre_and_their_mirrors():
    x = torch.arange(2 * 3 * 40 * 40, dtype=torch.float32).view(2, 3, 40, 40)
    views = tta_views(x, "ten-crop", 32)
    assert len(views) == 10 and all(view.shape == (2, 3, 32, 32) for view in views)
    corners = [x[..., :32, :32], x[..., :32, 8:], x[..., 8:, :32], x[..., 8:, 8:], x[..., 4:36, 4:36]]
    for view, crop in zip(views, corners + [crop.flip(3) for crop in corners]):
        assert torch.equal(view, crop)
    # torchvision's TenCrop takes the five crops of the mirrored image: the same ten views, in another order.
    mirrored = tta_views(x.flip(3), "ten-crop", 32)[:5]
    assert sorted(v.sum().item() for v in mirrored) == sorted(v.sum().item() for v in views[5:])
    assert all(any(torch.equal(m, v) for v in views[5:]) for m in mirrored)


def test_pil_image_modes_are_accepted(model):
    grey = Image.fromarray(np.full((40, 30), 128, dtype=np.uint8), "L")
    assert len(predict(model, grey).predictions) == 1
    result = predict(model, np.zeros((4, 4, 5), dtype=np.uint8))
    assert not result.predictions and "is not an image" in result.failed[0]


def test_annotate_writes_each_image_upright_and_enlarged_with_its_answer_across_its_top(model, demo_run, folder,
                                                                                      tmp_path, capsys):
    """Twelve 32 px test images (three folders with the same file names) and two bad files: twelve PNGs, each the
    image enlarged to 224 px with a dark band across its top, named by folder where names repeat."""
    out = tmp_path / "annotated"
    assert main(["predict", str(demo_run["model"]), str(folder), "--annotate", str(out), "--format", "csv",
                 "--quiet"]) == 1  # the two bad files, named as errors
    printed = capsys.readouterr()
    assert f"annotated: 12 image(s) in {out}" in printed.err
    assert len(list(csv.DictReader(io.StringIO(printed.out)))) == 12 * 5  # the CSV as without --annotate
    written = sorted(path.name for path in out.iterdir())
    assert written == sorted(f"{name}-{source.stem}.annotated.png" for name in ("cross", "ring", "star")
                             for source in sorted((folder / name).glob("0*.png")))
    for name in ("star", "ring"):
        source = folder / name / "00000.png"
        drawn = np.asarray(Image.open(out / f"{name}-00000.annotated.png").convert("RGB"), dtype=float)
        enlarged = np.asarray(read_image(source).resize((224, 224), Image.Resampling.BICUBIC), dtype=float)
        assert drawn.shape == (224, 224, 3)
        assert drawn[:10, :60].mean() < enlarged[:10, :60].mean() - 40  # the band behind the answer
        assert np.array_equal(drawn[40:], enlarged[40:])  # the rest is the image itself


def test_an_answer_in_a_line_names_the_top_classes_the_present_ones_or_unsure():
    from residual.annotate import answer_text

    top = [(2, "star", 0.9), (0, "ring", 0.06), (1, "cross", 0.03), (3, "moon", 0.01)]
    assert answer_text(Prediction("a.png", top)) == "star 0.90, ring 0.06, cross 0.03"
    assert answer_text(Prediction("a.png", top, unsure=True)) == "unsure (top: star 0.90)"
    assert answer_text(Prediction("a.png", top, present=[(2, "star", 0.9), (0, "ring", 0.6)])) == \
        "star 0.90, ring 0.60"
    assert answer_text(Prediction("a.png", top, present=[])) == "(none)"


def test_unsure_predictions_are_written_without_a_class():
    rows = [Prediction("a.png", [(2, "star", 0.9), (0, "ring", 0.1)], unsure=False),
            Prediction("b.png", [(1, "cross", 0.4), (0, "ring", 0.35)], unsure=True)]
    labels, as_json, as_csv = io.StringIO(), io.StringIO(), io.StringIO()
    write_labels(iter(rows), labels)
    assert labels.getvalue().splitlines() == ["image,label", "a.png,star", "b.png,"]
    write_json(iter(rows), as_json)
    assert [(row["unsure"], row["top"][0]["class_name"]) for row in json.loads(as_json.getvalue())] == [
        (False, "star"), (True, "cross")]  # the top classes stay, for a person to look at
    write_csv(iter(rows), as_csv, floor=True)
    assert [line.split(",")[-1] for line in as_csv.getvalue().splitlines()] == ["unsure", "0", "0", "1", "1"]
    rows[0].similarity, rows[1].similarity = 0.99, 0.5
    with_bank = io.StringIO()
    write_csv(iter(rows), with_bank, floor=True, similarity=True)
    assert [line.split(",")[-2:] for line in with_bank.getvalue().splitlines()] == [
        ["unsure", "similarity"], ["0", "0.990000"], ["0", "0.990000"], ["1", "0.500000"], ["1", "0.500000"]]
    table = predictions_table(rows, "t")
    assert [cell for cell in table.columns[1].cells] == ["star", "[dim]unsure (cross?)"]
    without = io.StringIO()
    write_json(iter([Prediction("c.png", [(0, "ring", 0.2)])]), without)
    assert "unsure" not in json.loads(without.getvalue())[0]


def test_threads_sharing_one_model_get_the_answers_and_features_of_their_own_images(tmp_path, monkeypatch):
    """A web app's thread pool may call predict on one model from several threads at once: each call gets its
    own images' probabilities and feature-bank similarities, as when called alone, whatever runs the model."""
    from concurrent.futures import ThreadPoolExecutor

    from residual.data import loaders
    from residual.deploy.onnx import OnnxModel, write_onnx
    from residual.feature_bank import FeatureBank

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4).eval()
    model.class_names = ["a", "b", "c", "d"]
    model.preprocessing = Preprocessing(input_size=32, resize_size=32)
    write_onnx(model, tmp_path / "model.onnx")
    generator = np.random.default_rng(0)
    # Each thread's images are drawn on its own scale, so features from another thread's batches would not fit.
    jobs = [[(generator.random((32, 32, 3)) * (60 + 60 * job)).astype(np.uint8) for _ in range(24)]
            for job in range(4)]
    bank = FeatureBank.of(torch.randn(50, 64), k=1, floor=0.5, model=model)
    runners = {"pytorch": model, "onnxruntime": OnnxModel(tmp_path / "model.onnx"),
               "openvino": OnnxModel(tmp_path / "model.onnx", runtime="openvino")}
    for name, runner in runners.items():
        def answers(images):
            result = predict(runner, images, topk=4, batch_size=2, feature_bank=bank)
            return [(p.top, p.similarity) for p in result.predictions]

        alone = [answers(images) for images in jobs]
        for _ in range(3):
            with ThreadPoolExecutor(len(jobs)) as pool:
                together = list(pool.map(answers, jobs))
            for job_alone, job_together in zip(alone, together):
                assert len(job_together) == len(job_alone) == 24, name
                for (top, similarity), (top_together, similarity_together) in zip(job_alone, job_together):
                    assert [c for c, _, _ in top] == [c for c, _, _ in top_together], name
                    assert [p for _, _, p in top] == pytest.approx([p for _, _, p in top_together], abs=1e-5)
                    assert similarity == pytest.approx(similarity_together, abs=1e-5), name

    # A thread other than the main one decodes its images itself: DataLoaders forking decoding workers from
    # several threads at once lost some (a worker forked while another thread held a lock died).
    started = []
    loader = loaders.DataLoader
    monkeypatch.setattr(loaders, "DataLoader", lambda *args, **kwargs: started.append(kwargs["num_workers"])
                        or loader(*args, **kwargs))
    with ThreadPoolExecutor(1) as pool:
        pool.submit(predict, model, jobs[0], batch_size=2).result()
    predict(model, jobs[0], batch_size=2)
    assert started == [0, loaders.decoding_workers()]
