"""Model files, foreign checkpoints and refusing unsafe pickles."""

import json
import pickle

import pytest
import safetensors.torch
import torch

import residual
from payloads import RunsAShellCommand, WritesAMarker
from residual.weights import (CheckpointMismatchError, ModelFileError, UnsafeCheckpointError, pretrained_source,
                              read_metadata)


def _trained_looking(name, **options):
    """A model whose BN statistics and weights are not at their initial values."""
    model = residual.create_model(name, **options)
    model.train()
    size = 32 if model.config.stem == "cifar" else 64
    with torch.no_grad():
        model(torch.randn(4, model.config.in_chans, size, size))
    return model.eval()


def _outputs(model, size=32):
    torch.manual_seed(123)
    with torch.no_grad():
        return model(torch.randn(3, model.config.in_chans, size, size))


def test_model_file_round_trip_is_bit_exact_and_keeps_metadata(tmp_path):
    model = _trained_looking("resnet20", num_classes=3, drop_rate=0.1)
    model.class_names = ["cat", "dog", "eel"]
    path = residual.save_model(model, tmp_path / "model.safetensors", extra={"epochs": 7})
    loaded = residual.load_model(path)
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    assert torch.equal(_outputs(model), _outputs(loaded.eval()))
    assert loaded.config == model.config and loaded.arch == "resnet20"
    assert loaded.class_names == ["cat", "dog", "eel"]
    assert loaded.preprocessing == model.preprocessing
    meta = residual.read_metadata(path)
    assert meta["extra"] == {"epochs": 7} and meta["config"]["drop_rate"] == 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"], "no temporary files left behind"


def test_variant_configs_survive_the_file(tmp_path):
    model = _trained_looking("resnet18", stem="cifar", norm="group", num_classes=4, in_chans=1)
    loaded = residual.load_model(residual.save_model(model, tmp_path / "m.safetensors"))
    assert loaded.config.stem == "cifar" and loaded.config.norm == "group"
    assert torch.equal(_outputs(model), _outputs(loaded.eval()))


def test_loading_with_other_class_count_keeps_backbone_and_says_so(tmp_path, caplog):
    model = _trained_looking("resnet20")
    path = residual.save_model(model, tmp_path / "m.safetensors")
    loaded = residual.load_model(path, num_classes=4)
    assert loaded.fc.out_features == 4 and loaded.class_names is None
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, loaded.state_dict()[key])
    assert "classifier not loaded (file has 10 classes, model has 4)" in caplog.text


def test_saving_overwrites_atomically_and_failed_writes_keep_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    first = _trained_looking("resnet20")
    residual.save_model(first, path)
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        residual.save_model(_trained_looking("resnet20"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {f"_orig_mod.module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": sd, "epoch": 90, "arch": "resnet50"},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"lr": 0.1}},
])
def test_torchvision_layout_checkpoints_import(tmp_path, wrap):
    # A torchvision-layout state dict: the keys and shapes torchvision's resnet18 writes.
    source = _trained_looking("resnet18")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight", "fc.weight", "fc.bias"} <= state.keys()
    path = tmp_path / "resnet18.pth"
    torch.save(wrap(state), path)
    model = residual.load_model(path, arch="resnet18", class_names="imagenet").eval()
    assert model.num_classes == 1000 and model.class_names[0] == "tench"
    assert torch.equal(_outputs(source, 64), _outputs(model, 64))


def test_foreign_safetensors_and_convert_to_model_file(tmp_path):
    source = _trained_looking("resnet20")
    foreign = tmp_path / "timm_model.safetensors"
    safetensors.torch.save_file(source.state_dict(), foreign)  # no residual metadata, like timm's files
    with pytest.raises(ModelFileError,
                       match=r"timm_model.safetensors: not a residual model file.*residual convert .* --arch resnet50"):
        residual.load_model(foreign)
    model = residual.load_model(foreign, arch="resnet20")
    out = residual.save_model(model, tmp_path / "converted.safetensors")
    assert torch.equal(_outputs(source), _outputs(residual.load_model(out).eval()))


def test_mismatch_lists_missing_unexpected_and_wrongly_shaped_keys(tmp_path):
    state = residual.create_model("resnet18").state_dict()
    del state["layer3.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as error:
        residual.load_model(path, arch="resnet18")
    message = str(error.value)
    assert "missing (1): layer3.1.conv2.weight" in message
    assert "unexpected (1): layer5.0.conv1.weight" in message
    assert "wrong shape (1): conv1.weight file [64, 1, 7, 7] vs model [64, 3, 7, 7]" in message
    assert "\n" not in message
    with pytest.raises(CheckpointMismatchError, match="does not fit resnet34"):
        residual.load_model(path, arch="resnet34")


def test_other_class_count_in_checkpoint_loads_backbone(tmp_path, caplog):
    source = _trained_looking("resnet18")
    path = tmp_path / "in1k.pth"
    torch.save(source.state_dict(), path)
    model = residual.load_model(path, arch="resnet18", num_classes=5)
    assert model.fc.out_features == 5
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert "classifier not loaded (file has 1000 classes, model has 5)" in caplog.text


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    payload = {"conv1.weight": torch.zeros(1), "evil": WritesAMarker(tmp_path / "marker")}
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    # The payload is real: a plain unpickler runs it (into a different marker file).
    pickle.loads(pickle.dumps(WritesAMarker(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()

    with pytest.raises(UnsafeCheckpointError, match="refused: it asks to import exec"):
        residual.load_model(path, arch="resnet18")
    with pytest.raises(UnsafeCheckpointError):
        residual.read_state_dict(path)
    assert not (tmp_path / "marker").exists()
    torch.save({"conv1.weight": torch.zeros(1), "evil": RunsAShellCommand(tmp_path / "marker")}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refused: it asks to import \w+\.system"):  # "unpickling failed"
        residual.read_state_dict(path)
    assert not (tmp_path / "marker").exists()


def test_unreadable_and_missing_files_get_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(ModelFileError, match="garbage.pth: not a readable PyTorch checkpoint"):
        residual.load_model(garbage, arch="resnet18")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"definitely not safetensors")
    with pytest.raises(ModelFileError, match="fake.safetensors: not a readable safetensors file"):
        residual.load_model(fake)
    with pytest.raises(ModelFileError, match="nope.safetensors: no such file"):
        residual.load_model(tmp_path / "nope.safetensors")
    # Arguments in the wrong order, or a run folder for its model: both were "no such file" of a folder that exists
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ModelFileError) as error:
        residual.load_model(run)
    assert str(error.value) == f"{run}: a folder, not a model file (a command takes the model first, then the " \
                               f"images or data)"
    residual.save_model(residual.create_model("resnet20", num_classes=2), run / "model.safetensors")
    for read in (residual.load_model, residual.read_metadata, pretrained_source):  # predict, info, --from
        with pytest.raises(ModelFileError) as error:
            read(run)
        assert str(error.value) == f"{run}: a run folder; its model is {run / 'model.safetensors'}"
    with pytest.raises(ModelFileError, match="no state dict found"):
        path = tmp_path / "opt.pth"
        torch.save({"optimizer": {"lr": 0.1}}, path)
        residual.load_model(path, arch="resnet18")
    with pytest.raises(ModelFileError, match="end in .safetensors"):
        residual.save_model(residual.create_model("resnet20"), tmp_path / "model.pth")
    run = tmp_path / "run"  # a training run's folder: its last.pt is for --resume, its model file for everything else
    residual.save_model(residual.create_model("resnet20"), run / "model.safetensors")
    (run / "config.yaml").write_text("data: shapes\n")
    torch.save({"model": residual.create_model("resnet20").state_dict(), "epoch": 1}, run / "last.pt")
    for read in (residual.load_model, read_metadata):  # predict and eval; info (it tried to read safetensors)
        with pytest.raises(ModelFileError, match=f"last.pt: a training checkpoint, which --resume continues from; "
                                                 f"the run's model file is {run / 'model.safetensors'}"):
            read(run / "last.pt")


def test_newer_format_versions_are_refused_clearly(tmp_path):
    path = residual.save_model(residual.create_model("resnet20"), tmp_path / "m.safetensors")
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    metadata["format_version"] = "99"
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(ModelFileError, match="format '99' is not supported"):
        residual.load_model(path)
    assert json.loads(metadata["config"])["layers"] == [3, 3, 3]


def test_imagenet_class_names_ship_with_the_package():
    names = residual.imagenet_class_names()
    assert len(names) == 1000 == len(set(names))
    assert (names[0], names[1], names[207], names[999]) == ("tench", "goldfish", "golden retriever", "toilet tissue")


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = residual.save_model(residual.create_model("resnet20"), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "not the private 0600 of the temporary file"
