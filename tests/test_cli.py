"""The command line: each verb end to end, errors as one line."""

import subprocess
import sys

import pytest
import torch

import residual
from residual.cli import main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables to the terminal width


def test_models_table_lists_counts(capsys):
    assert main(["models", "resnet1*"]) == 0
    out = capsys.readouterr().out
    for row in ["resnet18", "11.690", "1.814", "resnet101", "44.549", "7.801", "resnet110", "1.728"]:
        assert row in out
    assert "resnet50" not in out


def test_unknown_pattern_is_a_one_line_error(capsys):
    assert main(["models", "vgg*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model matches 'vgg*'") and err.count("\n") == 1


def test_pretrained_lists_torchvision_weights(capsys):
    assert main(["pretrained", "resnet50*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50.tv_in1k" in out and "resnet50.tv2_in1k" in out and "80.858" in out and "232/224" in out


def test_download_without_network_says_where_to_put_the_file(capsys, monkeypatch):
    monkeypatch.setenv("RESIDUAL_WEIGHTS_MIRROR", "http://127.0.0.1:9")  # discard port: nothing listens
    assert main(["download", "resnet18.tv_in1k", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot download" in err and "resnet18-f37072fd.pth" in err and err.count("\n") == 1


def test_convert_then_info(tmp_path, capsys):
    source = residual.create_model("resnet20", num_classes=3).eval()
    checkpoint = tmp_path / "trained.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, checkpoint)
    names = tmp_path / "classes.txt"
    names.write_text("apple\nbanana\ncherry\n")
    out = tmp_path / "fruit.safetensors"
    assert main(["convert", str(checkpoint), "--arch", "resnet20", "--classes", str(names), "-o", str(out)]) == 0
    model = residual.load_model(out).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), source(x)) and model.class_names == ["apple", "banana", "cherry"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "resnet20" in info and "apple, banana, cherry" in info and "269," in info
    assert main(["convert", str(checkpoint), "--arch", "resnet18"]) == 2
    assert "does not fit resnet18" in capsys.readouterr().err


def test_demo_classifies_generated_images_with_an_untrained_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "has not been trained" in out and "identical predictions" in out
    assert "wide_resnet101_2" in out and "resnet1202" in out
    images = sorted((tmp_path / "demo" / "images").glob("*.png"))
    assert len(images) == 10 and images[0].name == "00_circle.png"
    model = residual.load_model(tmp_path / "demo" / "resnet20-untrained.safetensors")
    assert model.class_names[:3] == ["circle", "triangle", "square"]
    assert residual.read_metadata(tmp_path / "demo" / "resnet20-untrained.safetensors")["extra"] == {"trained": False}


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "residual", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("residual ")
