"""Temperature scaling: the fitted T, the calibrated model file, and what it refuses."""

import json

import numpy as np
import pytest
import torch

import residual
from residual.calibrate import CalibrationError, calibrate, carried_over_warnings, fit_temperature
from residual.cli import main
from residual.data.datasets import sample_items
from residual.data.shapes import write_shapes
from residual.deploy.onnx import read_onnx_metadata
from residual.deploy.quantize import float_onnx
from residual.evaluate import evaluate


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    # Labels drawn from softmax(z / 2): logits z are twice as sure as they should be, and T = 2 undoes it.
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 5, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / 2, 1), 1, generator=generator).squeeze(1)
    log_probs = torch.log_softmax(logits, 1).numpy()  # what evaluate gives: logits up to a constant per image
    assert fit_temperature(log_probs, labels.numpy()) == pytest.approx(2.0, rel=0.05)
    honest = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
    assert fit_temperature(log_probs, honest.numpy()) == pytest.approx(1.0, rel=0.05)


def test_calibrating_the_demo_model_fixes_its_confidence_and_keeps_its_predictions(demo_run, tmp_path, capsys):
    out = tmp_path / "calibrated.safetensors"
    assert main(["calibrate", str(demo_run["model"]), str(demo_run["data"]), "-o", str(out),
                 "--out", str(tmp_path / "report"), "--quiet"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "temperature scaling, T = " in printed and f"wrote {out}" in printed
    report = json.loads((tmp_path / "report" / "calibration.json").read_text())
    test = report["splits"]["test"]  # checked on images the fit never saw
    # The demo recipe's label smoothing leaves it under-confident (T 0.378, test ECE 0.097 -> 0.007, 2026-12-04).
    assert report["temperature"] < 1 and test["after"]["ece"] < test["before"]["ece"] / 3
    assert test["after"]["nll"] < test["before"]["nll"] and report["warnings"] == []  # it carried over
    assert (tmp_path / "report" / "reliability-test-after.png").stat().st_size > 0
    # T is folded into the classifier: the file alone gives the calibrated probabilities, same top-1.
    calibrated = residual.load_model(out)
    assert residual.read_metadata(out)["extra"]["temperature"] == pytest.approx(report["temperature"])
    checked = evaluate(calibrated, demo_run["data"], "test", gallery_size=0, workers=0)
    assert checked.metrics["ece"] == pytest.approx(test["after"]["ece"], abs=1e-4)
    assert checked.metrics["loss"] == pytest.approx(test["after"]["nll"], rel=1e-3)
    original = evaluate(residual.load_model(demo_run["model"]), demo_run["data"], "test", gallery_size=0, workers=0)
    assert np.array_equal(checked.probs.argmax(1), original.probs.argmax(1))
    # Its ONNX export, and the float export quantize starts from, say they are calibrated as the file does.
    assert main(["export", str(out), "--data", str(demo_run["data"]), "--samples", "8"]) == 0
    items = sample_items(demo_run["data"], "val", 8)
    for onnx_file in (out.with_suffix(".onnx"), float_onnx(out, tmp_path, items, str(demo_run["data"]))):
        metadata = read_onnx_metadata(onnx_file)
        assert float(metadata["temperature"]) == pytest.approx(report["temperature"])
        assert json.loads(metadata["calibrated_on"]) == f"{demo_run['data']} (val)"


def test_what_calibration_cannot_use_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default runs/calibrate/ folder would be made
    path = residual.save_model(residual.create_model("resnet20", num_classes=10), tmp_path / "model.safetensors")
    features = residual.save_model(residual.create_model("resnet20", num_classes=0), tmp_path / "features.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    data = tmp_path / "nowhere"
    for args, message in [([tmp_path / "model.onnx", data], "model.onnx"),
                          ([path, data, "-o", path], "would replace the original"),
                          ([path, data, "-o", tmp_path / "x.pt"], "model files end in .safetensors"),
                          ([features, data], "no linear classifier (fc) to scale"),
                          ([path, data], "nowhere")]:
        assert main(["calibrate", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    with pytest.raises(CalibrationError, match="fitted on images training did not learn from"):
        calibrate(path, data, split="train")  # the CLI offers only val and test
    assert not list((tmp_path / "runs").glob("*/*"))  # no runs/calibrate/model-nowhere left behind


def test_an_unreadable_image_is_named_and_an_uninformative_fit_is_flagged(tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", size=16, per_class=3, seed=0, progress=False)
    (data / "val" / "star" / "broken.png").write_bytes(b"not a png")
    model = residual.create_model("resnet20", num_classes=10)
    model.class_names = sorted(folder.name for folder in (data / "train").iterdir())
    path = residual.save_model(model, tmp_path / "model.safetensors")
    assert main(["calibrate", str(path), str(data), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 unreadable image(s) skipped" in " ".join(captured.out.split())
    report = json.loads((tmp_path / "report" / "calibration.json").read_text())
    readable = len(list((data / "val").glob("*/*.png"))) - 1
    assert len(report["splits"]["val"]["unreadable"]) == 1 and report["splits"]["val"]["images"] == readable
    # An untrained model is right by chance whatever it says: the best T makes it say almost nothing.
    assert report["temperature"] > 10 and "say little about whether it is right" in report["warnings"][0]
    assert "warning: T = " in " ".join(captured.out.split())


def test_a_temperature_that_makes_the_test_split_worse_is_warned_about():
    rose = {"before": {"nll": 1.5002, "ece": 0.02}, "after": {"nll": 1.5283, "ece": 0.01}}  # the multi-label shapes'
    [warning] = carried_over_warnings(rose, multi_label=True)
    assert "negative log-likelihood rose (1.5002 -> 1.5283): the temperatures did not carry over" in warning
    fell = {"before": {"nll": 0.125, "ece": 0.097}, "after": {"nll": 0.024, "ece": 0.007}}  # the demo model's
    assert carried_over_warnings(fell, multi_label=False) == []
