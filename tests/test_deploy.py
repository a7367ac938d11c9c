"""export, quantize, prune: each result checked against the original, and refused when it does not match."""

import dataclasses
import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from residual import load_model, save_model
from residual.cli import main
from residual.data.datasets import sample_items
from residual.data.decode import read_image
from residual.data.shapes import write_shapes
from residual.data.transforms import normalize, resize_center_crop
from residual.deploy.exported import RELATIVE_TOLERANCE
from residual.deploy.onnx import INPUT_UINT8, OnnxModel, export_onnx, openvino_computes_bf16, read_onnx_metadata
from residual.deploy.prune import prune_channels
from residual.evaluate import evaluate
from residual.feature_bank import FeatureBank, FeatureBankError, classifier_fingerprint
from residual.models import build_model, count_macs, count_params
from residual.predict import predict, probabilities_and_features
from residual.weights import ModelFileError, read_metadata


@pytest.fixture(scope="module")
def model(demo_run):
    return load_model(demo_run["model"]).eval()


@pytest.fixture(scope="module")
def exported(model, demo_run, tmp_path_factory):
    """The demo model exported to fp32 ONNX through the API, parity-checked on 64 validation images."""
    items = sample_items(demo_run["data"], "val", 64)
    result = export_onnx(model, tmp_path_factory.mktemp("export") / "demo.onnx", items, "demo val")
    assert result.path is not None, result.parity
    return result


def real_images(demo_run, count: int, pre) -> torch.Tensor:
    files = sorted((demo_run["data"] / "test").rglob("*.png"))[:count]
    return torch.stack([resize_center_crop(read_image(f), pre.resize_size, pre.input_size) for f in files])


@pytest.mark.parametrize("batch", [1, 7])
def test_exported_logits_match_pytorch_at_any_batch_size(model, exported, demo_run, batch):
    images = real_images(demo_run, batch, model.preprocessing)
    x = normalize(images.float() / 255, model.preprocessing)
    with torch.inference_mode():
        expected = model(x)
    got = OnnxModel(exported.path)(x)
    assert got.shape == (batch, model.num_classes)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert exported.parity.passed and exported.parity.agreement == 1.0 and exported.parity.images == 64
    graph = onnx.load(exported.path)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    saved = json.loads(exported.report_path.read_text())
    assert saved["passed"] and saved["max_abs_diff"] == pytest.approx(exported.parity.max_abs_diff)


def test_metadata_round_trip(model, exported, tmp_path):
    onnx_model = OnnxModel(exported.path)
    assert onnx_model.class_names == model.class_names
    assert onnx_model.preprocessing == model.preprocessing
    assert onnx_model.arch == model.arch and onnx_model.num_classes == model.num_classes
    assert read_onnx_metadata(exported.path)["precision"] == "fp32"
    # An ONNX file without residual's metadata is named as such, not half-used.
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(ModelFileError, match="not one exported by residual"):
        OnnxModel(tmp_path / "foreign.onnx")


def test_info_describes_an_exported_model(model, exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["info", str(exported.path)]) == 0
    lines = [line.strip("│ ").split(" │ ") for line in capsys.readouterr().out.splitlines() if line.count("│") == 3]
    rows = {field.strip(): value.strip() for field, value in lines}
    size = model.preprocessing.input_size
    assert rows["architecture"] == model.arch and rows["precision"] == "fp32" and rows["opset"] == "ai.onnx 18"
    assert rows["classes"].startswith(f"{model.num_classes}: {model.class_names[0]}, ")
    assert rows["input"] == f"'input', float32 batch x 3 x {size} x {size} (float32 NCHW normalised)"
    stored = sum(onnx.numpy_helper.to_array(t).size for t in onnx.load(exported.path).graph.initializer)
    assert rows["weights"] == f"{stored:,} stored values, file {exported.path.stat().st_size / 1e6:.2f} MB"
    assert rows["features"] == "'features', the pooled features (for --feature-bank)"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), tmp_path / "foreign.onnx")
    assert main(["info", str(tmp_path / "foreign.onnx")]) == 2
    assert "an ONNX file, but not one exported by residual" in capsys.readouterr().err


def test_fp16_graph_with_preprocessing_takes_pixels(model, demo_run, tmp_path):
    out = tmp_path / "pixels.onnx"
    assert main(["export", str(demo_run["model"]), "--fp16", "--with-preprocessing", "--data", str(demo_run["data"]),
                 "--samples", "32", "-o", str(out)]) == 0
    onnx_model = OnnxModel(out)
    assert onnx_model.input_format == INPUT_UINT8 and onnx_model.precision == "fp16"
    images = real_images(demo_run, 5, model.preprocessing)
    logits = onnx_model.run(images.permute(0, 2, 3, 1).contiguous().numpy())  # uint8 N x H x W x 3
    assert logits.dtype == np.float32
    with torch.inference_mode():
        expected = model(normalize(images.float() / 255, model.preprocessing)).numpy()
    assert np.abs(logits - expected).max() < 0.05 * max(1.0, np.abs(expected).max())
    assert (logits.argmax(1) == expected.argmax(1)).all()
    _, pooled = onnx_model.run(images.permute(0, 2, 3, 1).contiguous().numpy(), features=True)
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(normalize(images.float() / 255, model.preprocessing)),
                                      pre_logits=True).numpy()
    assert pooled.dtype == np.float32 and np.abs(pooled - expected).max() < 0.05 * np.abs(expected).max()


def test_an_export_gives_the_pooled_features_so_predict_applies_the_models_feature_bank(model, exported, demo_run,
                                                                                        tmp_path):
    images = real_images(demo_run, 7, model.preprocessing)
    x = normalize(images.float() / 255, model.preprocessing)
    onnx_model = OnnxModel(exported.path)
    assert onnx_model.has_features and onnx_model.classifier_fingerprint == classifier_fingerprint(model.fc.weight)
    logits, pooled = onnx_model.run(x.numpy(), features=True)
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        expected_logits = model.fc(expected)
    torch.testing.assert_close(torch.from_numpy(pooled), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(logits), expected_logits, atol=1e-4, rtol=1e-4)
    # A bank made with the PyTorch model: the export finds the same similarities, so the same images unsure.
    train = sorted((demo_run["data"] / "train").rglob("*.png"))[::20]
    _, features = probabilities_and_features(model, torch.stack(
        [resize_center_crop(read_image(f), model.preprocessing.resize_size, model.preprocessing.input_size)
         for f in train]))
    test = sorted((demo_run["data"] / "test").rglob("*.png"))[::6]
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(20):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    floor = float(np.quantile([p.similarity for p in predict(model, test, feature_bank=FeatureBank.of(
        features, 1, 0.0, model)).predictions], 0.05))
    bank = FeatureBank.of(features, 1, floor, model)
    by_pytorch = predict(model, test + sorted(noise.iterdir()), feature_bank=bank).predictions
    for runtime in ("onnxruntime", "openvino"):
        by_export = predict(OnnxModel(exported.path, runtime=runtime), test + sorted(noise.iterdir()),
                            feature_bank=bank).predictions
        assert [p.similarity for p in by_export] == pytest.approx([p.similarity for p in by_pytorch], abs=1e-5)
        assert [p.unsure for p in by_export] == [p.unsure for p in by_pytorch]
    assert 0 < sum(p.unsure for p in by_pytorch) < len(by_pytorch)
    # Another model's bank, and an export without the features output, are refused.
    other = FeatureBank.of(features, 1, floor, model)
    other.classifier = other.classifier * 1.5
    other.source = "other.safetensors"
    with pytest.raises(FeatureBankError, match=f"--feature-bank other.safetensors: made with another model than "
                                               f"{exported.path} was exported from"):
        predict(onnx_model, test[:2], feature_bank=other)
    graph = onnx.load(exported.path)
    graph.graph.output.pop()  # as exports made before the features output
    onnx.save(graph, tmp_path / "logits-only.onnx")
    with pytest.raises(FeatureBankError, match="logits-only.onnx gives no pooled features"):
        predict(OnnxModel(tmp_path / "logits-only.onnx"), test[:2], feature_bank=bank)


def test_export_that_fails_parity_writes_nothing_unless_forced(demo_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(RELATIVE_TOLERANCE, "fp32", 0.0)  # no float difference is tolerated
    out = tmp_path / "strict.onnx"
    args = ["export", str(demo_run["model"]), "--data", str(demo_run["data"]), "--samples", "16", "-o", str(out)]
    assert main(args) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no model, no report, no temporary file
    assert main(args + ["--force"]) == 0 and out.is_file()


def test_export_names_a_file_that_is_no_model_before_asking_for_data(tmp_path, capsys):
    untracked = tmp_path / "fresh.safetensors"
    save_model(build_model("resnet20", num_classes=3), untracked)  # records no training run
    assert main(["export", str(untracked)]) == 2
    assert "fresh.safetensors: give --data DATA" in capsys.readouterr().err
    (tmp_path / "notes.json").write_text("{}")
    assert main(["export", str(tmp_path / "notes.json")]) == 2  # it asked for --data first
    assert "notes.json: not a residual model file" in capsys.readouterr().err


def test_commands_that_need_the_pytorch_model_refuse_an_onnx_file(exported, demo_run, capsys):
    for argv in (["prune", str(exported.path), str(demo_run["data"])], ["export", str(exported.path)]):
        assert main(argv) == 2  # they told the user to run `residual convert` on it
        err = capsys.readouterr().err
        assert "demo.onnx: an exported ONNX model, which runs in ONNX Runtime (or OpenVINO) only" in err


def test_eval_and_predict_run_onnx_like_the_original(model, exported, demo_run, tmp_path, capsys):
    original = evaluate(model, demo_run["data"], "val", gallery_size=0)
    through_onnx = evaluate(OnnxModel(exported.path), demo_run["data"], "val", gallery_size=0)
    np.testing.assert_allclose(through_onnx.probs, original.probs, atol=1e-5)
    assert main(["eval", str(exported.path), str(demo_run["data"]), "--out", str(tmp_path / "report"),
                 "--quiet"]) == 0
    document = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert document["top1"] >= 0.95 and document["compile"] == "off (an exported model runs in its own runtime)"
    assert document["runtime"] == "ONNX Runtime fp32"
    image = sorted((demo_run["data"] / "test" / "circle").glob("*.png"))[0]
    capsys.readouterr()
    assert main(["predict", str(exported.path), str(image), "--format", "json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class_name"] == "circle"
    assert main(["explain", str(exported.path), str(image)]) == 2
    assert "Grad-CAM needs the model's gradients" in capsys.readouterr().err
    for command in (["embed", str(exported.path), str(image), "--out", str(tmp_path / "features")],
                    ["similar", str(exported.path), str(image), str(image.parent)]):
        assert main(command) == 2
        assert capsys.readouterr().err == (f"error: {exported.path}: the features are the pooled output before the "
                                           f"classifier, which an exported model does not give; give the "
                                           f".safetensors model file it was exported from\n")
    for command, out in (("predict", "predict.csv"), ("eval", "eval")):
        target = str(image) if command == "predict" else str(demo_run["data"])
        assert main([command, str(exported.path), target, "--compile", "--out", str(tmp_path / out)]) == 2
        assert capsys.readouterr().err.startswith("error: --compile: an exported model runs in its own runtime")
    assert not (tmp_path / "eval").exists()


def test_openvino_runs_an_export_as_onnx_runtime_does_and_in_bf16_nearly(exported, demo_run, tmp_path, capsys):
    by_ort = evaluate(OnnxModel(exported.path), demo_run["data"], "val", gallery_size=0)
    by_openvino = evaluate(OnnxModel(exported.path, runtime="openvino"), demo_run["data"], "val", gallery_size=0)
    np.testing.assert_allclose(by_openvino.probs, by_ort.probs, atol=1e-5)
    image = sorted((demo_run["data"] / "test" / "circle").glob("*.png"))[0]
    capsys.readouterr()
    assert main(["predict", str(exported.path), str(image), "--runtime", "openvino", "--format", "json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class_name"] == "circle"
    if not openvino_computes_bf16():
        pytest.skip("this CPU has no bfloat16 arithmetic for OpenVINO's bf16")
    in_bf16 = evaluate(OnnxModel(exported.path, runtime="openvino", bf16=True), demo_run["data"], "val",
                       gallery_size=0)
    assert not np.array_equal(in_bf16.probs, by_ort.probs), "bf16 computes differently"
    assert np.abs(in_bf16.probs - by_ort.probs).max() < 0.1
    assert (in_bf16.probs.argmax(1) == by_ort.probs.argmax(1)).mean() >= 0.99
    assert main(["eval", str(exported.path), str(demo_run["data"]), "--runtime", "openvino", "--precision", "bf16",
                 "--out", str(tmp_path / "report"), "--gallery", "0", "--quiet"]) == 0
    document = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert document["runtime"] == "OpenVINO bf16"
    assert abs(document["top1"] - (by_ort.probs.argmax(1) == by_ort.labels).mean()) <= 0.01


def test_openvino_is_refused_in_one_line_where_it_cannot_run(exported, demo_run, tmp_path, capsys, monkeypatch):
    data = str(demo_run["data"])
    for argv, message in [
            ([demo_run["model"], "--runtime", "openvino"], "--runtime openvino runs exported models: residual "
                                                           "export"),
            ([exported.path, "--precision", "bf16"], "--runtime openvino computes in bf16"),
            ([exported.path, "--runtime", "openvino", "--device", "cuda"], "--runtime openvino runs on the CPU; "
                                                                           "drop --device cuda")]:
        assert main(["eval", str(argv[0]), data, *argv[1:], "--out", str(tmp_path / "eval"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    assert main(["eval", str(exported.path), data, "--runtime", "openvino", "--quiet"]) == 2
    assert "OpenVINO is not installed: pip install openvino" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_quantize_keeps_top1_and_writes_an_int8_model(exported, demo_run, tmp_path, capsys):
    out = tmp_path / "demo.int8.onnx"
    assert main(["quantize", str(exported.path), "--calib", str(demo_run["data"]), "--calib-size", "64",
                 "--method", "minmax", "-o", str(out), "--quiet"]) == 0
    report = json.loads(out.with_suffix(".quantize.json").read_text())
    assert report["drop_points"] <= 1.0 and report["top1_agreement"] >= 0.97
    # The drop is the images only float got right less those only INT8 did; McNemar's test says if it is chance.
    versus = report["versus_float"]
    assert versus["only_first"] - versus["only_second"] == round(report["drop_points"] * report["images"] / 100)
    assert versus["images"] == report["images"] and 0 < versus["p_value"] <= 1
    assert f"only INT8: McNemar p = {versus['p_value']:.3g}" in " ".join(capsys.readouterr().out.split())
    assert report["int8"]["size_mb"] < report["float"]["size_mb"] / 2.5  # int8 weights
    assert report["calibration"] == {"images": 64, "source": str(demo_run["data"]), "method": "minmax",
                                     "unreadable": 0}
    int8 = OnnxModel(out)
    assert int8.precision == "int8" and int8.class_names == OnnxModel(exported.path).class_names
    assert int8.has_features and int8.classifier_fingerprint == OnnxModel(exported.path).classifier_fingerprint
    assert any(node.op_type == "QLinearConv" for node in onnx.load(out).graph.node)
    with pytest.raises(ModelFileError, match="OpenVINO cannot read it \\(its INT8 operators are ONNX Runtime's own"
                                             "\\); run it with --runtime onnxruntime, or quantize with --runtime "
                                             "openvino"):
        OnnxModel(out, runtime="openvino")


def test_quantize_for_openvino_writes_qdq_that_openvino_runs_in_int8(exported, demo_run, tmp_path, capsys):
    source = tmp_path / "demo.onnx"
    shutil.copyfile(exported.path, source)
    for_onnxruntime = tmp_path / "demo.int8.onnx"
    for_onnxruntime.write_bytes(b"quantized for ONNX Runtime earlier")
    assert main(["quantize", str(source), "--calib", str(demo_run["data"]), "--calib-size", "64",
                 "--runtime", "openvino", "--quiet"]) == 0
    out = tmp_path / "demo.int8.openvino.onnx"  # its own default name: the ONNX Runtime file is kept
    assert for_onnxruntime.read_bytes() == b"quantized for ONNX Runtime earlier"
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads(out.with_suffix(".quantize.json").read_text())
    assert report["runtime"] == "openvino" and report["format"] == "QDQ"
    assert (report["float"]["runtime"], report["int8"]["runtime"]) == ("OpenVINO fp32", "OpenVINO INT8")
    assert report["drop_points"] <= 1.0 and report["top1_agreement"] >= 0.97
    # Every convolution folded into OpenVINO's integer kernels: INT8 arithmetic, not float around QDQ pairs.
    convolutions = sum(node.op_type == "Conv" for node in onnx.load(exported.path).graph.node)
    assert convolutions == 19  # ResNet-20: the stem and 18 in its blocks (identity shortcuts)
    assert report["int8_convolutions"] == {"int8": convolutions, "of": convolutions}
    assert "OpenVINO runs 19 of 19 convolutions on 8-bit integers" in printed
    assert OnnxModel(exported.path, runtime="openvino").int8_convolutions() == (0, convolutions)  # the float file
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and not any(op.startswith("QLinear") for op in ops)
    assert report["int8"]["size_mb"] < report["float"]["size_mb"] / 2.5  # int8 weights
    by_openvino = OnnxModel(out, runtime="openvino")
    assert by_openvino.metadata["quantized_for"] == "openvino" and by_openvino.runtime_text == "OpenVINO INT8"
    assert by_openvino.has_features
    # The same file runs in ONNX Runtime too, to the same answers.
    by_ort = evaluate(OnnxModel(out), demo_run["data"], "val", gallery_size=0)
    assert (evaluate(by_openvino, demo_run["data"], "val", gallery_size=0).answers() == by_ort.answers()).mean() >= 0.99
    assert main(["info", str(out)]) == 0
    assert "int8, quantized for openvino" in " ".join(capsys.readouterr().out.split())
    assert main(["eval", str(out), str(demo_run["data"]), "--runtime", "openvino", "--precision", "bf16",
                 "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: --precision bf16: {out} is an int8 model; OpenVINO computes bf16 "
                                       f"from an fp32 export\n")


def test_quantize_for_openvino_scales_a_preactivation_nets_batch_norms_per_channel(tmp_path, capsys, caplog):
    # A pre-activation block's first batch norm has no convolution before it to fold into, so it stays in the
    # graph, and QDQ quantizes its scale: one scale per channel, as for the convolutions' weights.
    data = write_shapes(tmp_path / "few", size=16, per_class=4, seed=2, progress=False)
    model = build_model("preact_resnet50", layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), num_classes=10).eval()
    model.class_names = sorted(path.name for path in (data / "train").iterdir())
    model.preprocessing = dataclasses.replace(model.preprocessing, input_size=16, resize_size=16)
    save_model(model, tmp_path / "preact.safetensors")
    out = tmp_path / "preact.int8.onnx"
    assert main(["quantize", str(tmp_path / "preact.safetensors"), "--calib", str(data), "--calib-size", "8",
                 "--runtime", "openvino", "--force", "-o", str(out), "--quiet"]) == 0
    assert "out-of-range" not in capsys.readouterr().err + caplog.text
    graph = onnx.load(out).graph
    scales = {init.name: list(init.dims) for init in graph.initializer}
    norms = [node for node in graph.node if node.op_type == "BatchNormalization"]
    assert norms, "a pre-activation net keeps batch norms the convolutions cannot absorb"
    for norm in norms:
        [dequantize] = [node for node in graph.node if node.output[0] == norm.input[1]]
        assert dequantize.op_type == "DequantizeLinear" and scales[dequantize.input[1]] == [scales[
            dequantize.input[0]][0]]  # as many scales as channels


def test_quantize_refuses_a_bad_calibration_and_keeps_nothing(exported, demo_run, tmp_path, capsys):
    # Calibrating on black images gives activation ranges far narrower than real images need.
    black = tmp_path / "black"
    black.mkdir()
    for index in range(8):
        Image.new("RGB", (32, 32)).save(black / f"{index}.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["quantize", str(exported.path), "--calib", str(black), "--val", str(demo_run["data"]),
                 "-o", str(out_dir / "bad.int8.onnx"), "--quiet"])
    assert code == 1
    assert "more than --max-drop 1.0; nothing was written" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []
    assert main(["quantize", str(exported.path), "--calib", str(black), "-o", str(out_dir / "x.onnx")]) == 2
    assert "images without class folders; give --val DATASET" in capsys.readouterr().err  # was "0 class folder(s)"


@pytest.mark.parametrize("name, options", [
    ("resnet20", {}),
    ("preact_resnet110", {"layers": (2, 2, 2)}),
    ("resnet50", {"layers": (1, 2, 1, 1), "widths": (8, 16, 16, 32), "num_classes": 5}),
    ("preact_resnet50", {"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16), "num_classes": 5}),
])
def test_pruning_removes_exactly_the_weakest_channels(name, options):
    """Channels whose filters and norm are zero contribute nothing: removing them must not change the output."""
    model = build_model(name, **options).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, as after training
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for block in model.blocks():
            for producer, norm, _ in block.inner_layers:
                conv, bn = getattr(block, producer), getattr(block, norm)
                dead = torch.arange(conv.out_channels) % 2 == 1  # half of them, by L1 norm the weakest
                conv.weight[dead] = 0
                bn.weight[dead], bn.bias[dead], bn.running_mean[dead] = 0, 0, 0
    pruned = prune_channels(model, 0.5)
    x = torch.randn(2, 3, 32, 32) if model.config.stem == "cifar" else torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-4)
    assert all(w == tuple(getattr(b, p).out_channels // 2 for p, _, _ in b.inner_layers)
               for w, b in zip(pruned.config.block_widths, model.blocks()))
    assert count_params(pruned) < count_params(model)


def test_pruned_model_loads_from_its_file_with_the_macs_it_claims(demo_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_shapes(tmp_path / "few", size=32, per_class=10, seed=5, progress=False)  # the demo's classes
    out = tmp_path / "pruned.safetensors"
    with monkeypatch.context() as patch:  # a bad --amount stops before the first evaluation
        patch.setattr("residual.deploy.prune.model_stats", lambda *args: pytest.fail("evaluated"))
        assert main(["prune", str(demo_run["model"]), str(data), "--amount", "1.5", "-o", str(out)]) == 2
    assert main(["prune", str(demo_run["model"]), str(data), "--amount", "0.5", "--epochs", "1", "--workers", "0",
                 "-o", str(out), "--quiet"]) == 0
    report = json.loads(out.with_suffix(".prune.json").read_text())
    claims = read_metadata(out)["extra"]["pruning"]
    alone = load_model(out)  # the file alone rebuilds the smaller network
    assert count_macs(alone, 32) == claims["macs"] == report["after"]["macs"]
    assert count_params(alone) == claims["params"] == report["after"]["params"]
    assert report["after"]["macs"] < 0.6 * report["before"]["macs"]
    assert alone.config.block_widths == ((8,),) * 3 + ((16,),) * 3 + ((32,),) * 3
    assert set(report) >= {"before", "pruned", "after"}
    versus = report["versus_before"]  # the change in top-1, image by image, and whether it is chance
    assert versus["only_first"] - versus["only_second"] == round((report["before"]["top1"] - report["after"]["top1"])
                                                                 * versus["images"])
    assert versus["images"] == 100 and 0 < versus["p_value"] <= 1  # the val split: 10 of each class
    run = read_metadata(out)["extra"]["run"]
    assert (tmp_path / run / "metrics.csv").is_file()  # the fine-tuning run, in runs/prune of the working folder
    # The pruned model exports like any other.
    items = sample_items(data, "val", 8)
    assert export_onnx(alone, tmp_path / "pruned.onnx", items, "few").path is not None
