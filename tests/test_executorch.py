"""export --format executorch: a .pte program for XNNPACK, run by ExecuTorch's runtime against the PyTorch model
before it is written, and run the same way by eval, predict and info."""

import importlib.util
import json
import sys

import pytest
import torch

from residual import load_model
from residual.cli import main
from residual.data.datasets import open_dataset
from residual.data.decode import read_image
from residual.data.transforms import normalize, resize_center_crop
from residual.deploy.executorch import ExecuTorchModel
from residual.deploy.exported import RELATIVE_TOLERANCE
from residual.errors import ConfigError
from residual.evaluate import evaluate
from residual.weights import ModelFileError

# Not imported here: ExecuTorch takes 3-4 s to import, which every test process would pay to collect this file.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="needs ExecuTorch")


def test_an_executorch_program_answers_as_the_model_does_in_batches_up_to_its_bound(demo_run, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich cuts its lines to the terminal's width
    out = tmp_path / "demo.pte"
    assert main(["export", str(demo_run["model"]), "--format", "executorch", "--max-batch", "4",
                 "--data", str(demo_run["data"]), "--samples", "12", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "ExecuTorch (XNNPACK) vs PyTorch" in printed.out and f"wrote {out}" in printed.out
    assert "cpuinfo" not in printed.err and "Failed to load" not in printed.err  # the runtime's own chatter
    report = json.loads(out.with_suffix(".parity.json").read_text())
    assert report["passed"] and report["images"] == 12 and report["max_batch"] == 4 and report["agreement"] == 1.0

    model = load_model(demo_run["model"]).eval()
    program = ExecuTorchModel(out)
    assert program.class_names == model.class_names and program.preprocessing == model.preprocessing
    assert program.max_batch == 4 and program.num_classes == 10
    pre = model.preprocessing
    files = sorted((demo_run["data"] / "test").rglob("*.png"))[::120]  # 10 images: three calls of up to 4
    x = normalize(torch.stack([resize_center_crop(read_image(f), pre.resize_size, pre.input_size)
                               for f in files]).float() / 255, pre)
    with torch.inference_mode():
        expected = model(x)
        expected_features = model.forward_head(model.forward_features(x), pre_logits=True)
    with program.collecting_features() as features:
        got = program(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # each call's answers kept, not overwritten
    torch.testing.assert_close(torch.cat(features), expected_features, atol=1e-4, rtol=1e-4)

    dataset = open_dataset(demo_run["data"])
    on_pytorch = evaluate(model, dataset, "test", gallery_size=0, workers=0, progress=False)
    on_executorch = evaluate(program, dataset, "test", gallery_size=0, workers=0, progress=False)
    assert (on_executorch.answers() == on_pytorch.answers()).all()
    assert main(["eval", str(out), str(demo_run["data"]), "--split", "test", "--gallery", "0", "--quiet",
                 "--out", str(tmp_path / "eval")]) == 0
    assert ", ExecuTorch fp32 (XNNPACK)" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["top1"] == on_pytorch.metrics["top1"]

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "float32 N x 3 x 32 x 32, N up to 4" in info and "operators delegated to XNNPACK" in info
    assert main(["predict", str(out), str(files[0])]) == 0
    assert model.class_names[int(expected[0].argmax())] in capsys.readouterr().out


def test_a_program_taking_pixels_is_refused_when_it_does_not_match_and_written_when_forced(demo_run, tmp_path,
                                                                                          monkeypatch, capsys):
    monkeypatch.setitem(RELATIVE_TOLERANCE, "fp32", 0.0)  # no float difference is tolerated
    out = tmp_path / "pixels.pte"
    args = ["export", str(demo_run["model"]), "--format", "executorch", "--with-preprocessing",
            "--data", str(demo_run["data"]), "--samples", "8", "-o", str(out)]
    assert main(args) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no program, no report, no temporary file
    assert main(args + ["--force"]) == 0
    report = json.loads(out.with_suffix(".parity.json").read_text())
    assert not report["passed"] and report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-3
    program = ExecuTorchModel(out)
    assert program.input_format == "uint8 NHWC 0-255" and program.max_batch == 1
    image = read_image(sorted((demo_run["data"] / "test").rglob("*.png"))[0])
    pre = program.preprocessing
    x = normalize(resize_center_crop(image, pre.resize_size, pre.input_size)[None].float() / 255, pre)
    with torch.inference_mode():
        torch.testing.assert_close(program(x), load_model(demo_run["model"]).eval()(x), atol=1e-3, rtol=1e-3)


def test_what_executorch_cannot_take_or_does_not_run_is_one_line(demo_run, tmp_path, monkeypatch, capsys):
    model = str(demo_run["model"])
    assert main(["export", model, "--format", "executorch", "--fp16"]) == 2
    assert "--fp16: the ExecuTorch export is float32 (XNNPACK)" in capsys.readouterr().err
    assert main(["export", model, "--max-batch", "8"]) == 2
    assert "--max-batch is for --format executorch" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"not a program at all" * 10)
    with pytest.raises(ModelFileError, match="garbage.pte: not a readable ExecuTorch program"):
        ExecuTorchModel(garbage)
    # A program someone else exported: no metadata method, so no classes or preprocessing.
    from executorch.exir import to_edge_transform_and_lower
    plain = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),))
    (tmp_path / "plain.pte").write_bytes(to_edge_transform_and_lower(plain).to_executorch().buffer)
    with pytest.raises(ModelFileError, match="plain.pte: an ExecuTorch program, but not one exported by residual"):
        ExecuTorchModel(tmp_path / "plain.pte")
    with pytest.raises(ModelFileError, match="plain.pte: an exported ExecuTorch program, which runs in ExecuTorch"):
        load_model(tmp_path / "plain.pte")
    assert main(["explain", str(tmp_path / "plain.pte"), str(garbage)]) == 2
    assert "Grad-CAM needs the model's gradients" in capsys.readouterr().err
    assert main(["predict", str(garbage), str(garbage), "--precision", "bf16"]) == 2
    assert "ExecuTorch runs it on the CPU as it was exported" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # as where it is not installed
    with pytest.raises(ConfigError, match=r"ExecuTorch cannot be imported .*pip install executorch"):
        ExecuTorchModel(garbage)


def test_quantize_for_executorch_writes_an_int8_program_that_keeps_top1(demo_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich cuts its lines to the terminal's width
    out = tmp_path / "demo.int8.pte"
    args = ["quantize", str(demo_run["model"]), "--calib", str(demo_run["data"]), "--runtime", "executorch",
            "--calib-size", "32", "--quiet", "-o", str(out)]
    assert main(args + ["--method", "entropy"]) == 2
    assert "--method: ExecuTorch's XNNPACK quantizer sets each activation's range" in capsys.readouterr().err
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "int8 (ExecuTorch INT8 (XNNPACK))" in printed and "float (ExecuTorch fp32 (XNNPACK))" in printed
    report = json.loads(out.with_suffix(".quantize.json").read_text())
    assert report["format"] == "XNNPACK PT2E" and report["calibration"]["images"] == 32
    assert report["drop_points"] <= 1.0 and report["top1_agreement"] >= 0.98 and report["images"] == 1200
    assert report["int8"]["size_mb"] < report["float"]["size_mb"] / 3  # int8 weights: a quarter, and the graph
    program = ExecuTorchModel(out)
    assert program.precision == "int8" and json.loads(program.metadata["calibration"])["images"] == 32
    assert main(["info", str(out)]) == 0 and "int8" in capsys.readouterr().out
