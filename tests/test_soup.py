"""Model soups: the average is the mean of the weights, the greedy recipe keeps only what does not hurt,
incompatible models are refused, and the soup is an ordinary model file."""

import numpy as np
import pytest
import torch

import residual
from residual.cli import main
from residual.data.shapes import write_shapes
from residual.soup import Score, average_weights, check_compatible, greedy_choice, soup
from residual.train import TrainConfig, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), size=16, per_class=6, seed=0, progress=False)


def _variant(data, noise_seed: int | None, arch: str = "resnet20"):
    """A model for `data`: the same starting weights, moved a little by `noise_seed` (a stand-in for
    fine-tuning), or None to leave them."""
    torch.manual_seed(0)
    model = residual.create_model(arch, num_classes=10)
    model.class_names = sorted(path.name for path in (data / "train").iterdir())
    model.preprocessing = residual.Preprocessing(input_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def test_the_average_is_the_mean_of_every_float_tensor_and_leaves_the_models_alone(shapes):
    models = [_variant(shapes, seed) for seed in (1, 2, 3)]
    before = [{name: tensor.clone() for name, tensor in model.state_dict().items()} for model in models]
    averaged = average_weights(models).state_dict()
    for name, tensor in averaged.items():
        if tensor.is_floating_point():  # weights, and batch norm's running statistics
            torch.testing.assert_close(tensor, sum(state[name] for state in before) / 3)
        else:  # batch norm's count of batches: the first model's
            assert torch.equal(tensor, before[0][name])
    assert all(torch.equal(model.state_dict()[name], state[name]) for model, state in zip(models, before)
               for name in state)


def test_models_that_cannot_be_averaged_are_refused_naming_the_file(shapes):
    base = _variant(shapes, 1)
    other_classes = _variant(shapes, 2)
    other_classes.class_names = list(reversed(other_classes.class_names))
    other_size = _variant(shapes, 2)
    other_size.preprocessing = residual.Preprocessing(input_size=32, resize_size=32)
    for other, what in [(_variant(shapes, 2, "resnet32"), "architecture"), (other_classes, "classes"),
                        (other_size, "preprocessing")]:
        with pytest.raises(residual.ConfigError, match=f"^b.safetensors: its {what} differs from a.safetensors's"):
            check_compatible({"a.safetensors": base, "b.safetensors": other})


def test_greedy_keeps_a_model_only_if_the_soup_with_it_does_not_score_lower():
    # Held-out top-1 of each soup tried, by its models: b helps, c hurts, d ties (kept, as in the paper).
    soups = {("a", "b"): 0.82, ("a", "b", "c"): 0.79, ("a", "b", "d"): 0.82}
    tried = []

    def score_of(names):
        tried.append(tuple(names))
        return Score(soups[tuple(names)], np.ones(1, bool))

    kept, best = greedy_choice(["a", "b", "c", "d"], Score(0.80, np.ones(1, bool)), score_of)
    assert kept == ["a", "b", "d"] and best.value == 0.82
    assert tried == [("a", "b"), ("a", "b", "c"), ("a", "b", "d")]


@pytest.mark.parametrize("recipe", ["greedy", "uniform"])
def test_a_soup_is_written_as_a_model_file_with_its_scores(shapes, tmp_path, recipe):
    paths = []
    for seed in (1, 2, 3):
        paths.append(tmp_path / f"m{seed}.safetensors")
        residual.save_model(_variant(shapes, seed), paths[-1], extra={"note": f"model {seed}"})
    result = soup(paths, shapes, tmp_path / "soup.safetensors", recipe=recipe, workers=0)
    assert result.ingredients == sorted(result.ingredients, key=lambda path: -result.held_out[path])
    assert set(result.ingredients) == {str(path) for path in paths}
    assert result.kept[0] == result.ingredients[0]
    assert result.kept == result.ingredients if recipe == "uniform" else set(result.kept) <= set(result.ingredients)
    assert set(result.held_out) == {*result.ingredients, "uniform soup", *(["greedy soup"] * (recipe == "greedy"))}
    assert set(result.test) == {result.ingredients[0], "uniform soup", *(["greedy soup"] * (recipe == "greedy"))}
    model = residual.load_model(tmp_path / "soup.safetensors")
    expected = average_weights([_variant(shapes, int(path[-13])) for path in result.kept])
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    extra = residual.read_metadata(tmp_path / "soup.safetensors")["extra"]
    assert extra["soup"]["models"] == result.kept and extra["soup"]["recipe"] == recipe
    assert extra["note"] == f"model {result.ingredients[0][-13]}"  # the best model's provenance


def test_models_trained_on_a_flat_folder_split_otherwise_are_refused(tmp_path):
    flat = write_shapes(tmp_path / "s", size=16, per_class=5, seed=0, progress=False) / "train"  # classes only
    common = dict(data=str(flat), model="resnet20", epochs=1, batch_size=16, quiet=True, report=False,
                  out=str(tmp_path / "runs"))
    first = train(TrainConfig(seed=0, name="first", **common)).model_path
    same_split = train(TrainConfig(seed=0, name="same", **common)).model_path
    other_split = train(TrainConfig(seed=1, name="other", **common)).model_path
    result = soup([first, same_split], flat, tmp_path / "soup.safetensors", workers=0)
    assert result.split == "val" and not result.test  # the images both runs held out; a flat folder has no test
    with pytest.raises(residual.ConfigError, match="not all trained on it with the same --val-split and seed"):
        soup([first, other_split], flat, tmp_path / "soup.safetensors", workers=0)


def test_soup_cli_prints_the_table_and_refuses_what_it_cannot_do(shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    paths = []
    for seed in (1, 2):
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        residual.save_model(_variant(shapes, seed), paths[-1])
    out = str(tmp_path / "soup.safetensors")
    assert main(["soup", *paths, "--data", str(shapes), "--out", out, "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "greedy soup of 2 models" in printed and "uniform soup" in printed and "test top-1" in printed
    assert f"wrote {out}" in printed
    for arguments, message in [([paths[0]], "a soup needs two or more model files"),
                               ([*paths, "--out", str(tmp_path / "soup.pt")], "model files end in .safetensors"),
                               ([*paths, "--out", paths[0]], "the soup would replace one of its models")]:
        assert main(["soup", *arguments, "--data", str(shapes)]) == 2
        assert message in capsys.readouterr().err
