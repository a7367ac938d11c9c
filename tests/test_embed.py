"""Feature extraction and retrieval."""

import numpy as np
import pytest
import torch

import residual
from residual.cli import main
from residual.data.decode import BadImageError
from residual.data.shapes import write_shapes
from residual.embed import cosine_similarity, embed, similar


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    data = write_shapes(root / "shapes", size=32, per_class=3, seed=2, progress=False)
    torch.manual_seed(0)
    model = residual.create_model("resnet20", num_classes=10).eval()
    model.train()
    with torch.no_grad():  # give BN real statistics so features differ between images
        model(torch.randn(16, 3, 32, 32))
    model.eval()
    path = residual.save_model(model, root / "model.safetensors")
    return data, residual.load_model(path).eval(), path


def test_embed_gives_the_pooled_pre_logits_of_each_image(setup):
    data, model, _ = setup
    files = sorted((data / "val" / "star").glob("*.png"))
    result = embed(model, files)
    assert result.features.shape == (len(files), 64) and result.paths == files and not result.failed
    single = embed(model, files[:1]).features[0]
    assert np.allclose(single, result.features[0], atol=1e-5), "batching does not change a row"
    assert not np.allclose(result.features[0], result.features[1])


def test_bad_files_are_skipped_and_reported(setup, tmp_path):
    data, model, _ = setup
    good = sorted((data / "val" / "ring").glob("*.png"))[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    result = embed(model, [good, bad])
    assert result.paths == [good] and len(result.failed) == 1 and "broken.png" in result.failed[0]
    with pytest.raises(BadImageError, match="broken.png"):
        similar(model, bad, data / "val")


def test_nothing_to_embed_or_search_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
    """Each gave an empty table or an empty .npy: a gallery that is not a folder, a folder without images,
    one whose images are all unreadable."""
    data, _, model_path = setup
    query = sorted((data / "val" / "cross").glob("*.png"))[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    for gallery, message in [(tmp_path / "missing", "missing: no such folder; the gallery is a folder of images"),
                             (query, f"{query}: no such folder"),
                             (tmp_path / "empty", f"no image files in {tmp_path / 'empty'}"),
                             (tmp_path / "broken", "broken: none of its 1 image(s) could be read (first: ")]:
        assert main(["similar", str(model_path), str(query), str(gallery)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1
    out = tmp_path / "features.npy"
    assert main(["embed", str(model_path), str(tmp_path / "broken"), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("error: not one of the 1 image(s) could be read; nothing "
                                                         "was written")
    assert main(["embed", str(model_path), str(tmp_path / "empty"), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_similar_finds_the_query_itself_first(setup):
    data, model, _ = setup
    query = sorted((data / "val" / "cross").glob("*.png"))[1]
    matches, failed = similar(model, query, data / "val", topk=3)
    assert matches[0][0] == query and matches[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(matches) == 3 and matches[1][1] <= matches[0][1] and not failed


def test_embed_and_similar_commands(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    data, _, model_path = setup
    out = tmp_path / "features.npy"
    assert main(["embed", str(model_path), str(data / "test"), "--out", str(out), "--quiet"]) == 0
    assert np.load(out).shape == (100, 64)
    assert len((tmp_path / "features.paths.txt").read_text().splitlines()) == 100
    (tmp_path / "bad.jpg").write_bytes(b"")
    assert main(["embed", str(model_path), str(tmp_path / "bad.jpg"), str(data / "test" / "star"),
                 "--out", str(out), "--quiet"]) == 1
    assert "bad.jpg: empty file" in capsys.readouterr().err
    # np.save adds .npy to a name without it: the line says so, and the paths file sits next to it.
    assert main(["embed", str(model_path), str(data / "test" / "star"), "--out", str(tmp_path / "star")]) == 0
    assert f"wrote {tmp_path / 'star.npy'} (10 x 64 features) and {tmp_path / 'star.paths.txt'}" in \
        capsys.readouterr().out
    assert np.load(tmp_path / "star.npy").shape == (10, 64)
    query = sorted((data / "test" / "arrow").glob("*.png"))[0]
    assert main(["similar", str(model_path), str(query), str(data / "test"), "--topk", "2"]) == 0
    assert str(query) in capsys.readouterr().out


def test_a_trained_models_nearest_neighbours_are_mostly_of_the_querys_class(demo_run):
    """What retrieval is for. The demo model's features put 98% of test images nearest to one of their own
    class (2026-12-04); those of a model at 11% top-1 after 3 epochs put 18% (chance: 10%)."""
    model = residual.load_model(demo_run["model"])
    found = embed(model, [demo_run["data"] / "test"])
    classes = np.array([path.parent.name for path in found.paths])
    nearest = [np.argsort(-cosine_similarity(row, found.features), kind="stable")[1] for row in found.features]
    assert len(found.paths) == 1200 and np.mean(classes[nearest] == classes) > 0.9
