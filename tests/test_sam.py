"""Sharpness-aware minimisation (--sam, --sam-adaptive): the engine's step is the one SAM's and ASAM's formulas
give, worked out here from scratch; batch norm's running statistics take one update per step, not two; what
cannot go with it is refused in one line."""

import pytest
import torch
from torch.nn import functional as F

from residual.cli import main
from residual.data.transforms import AugmentConfig
from residual.models import build_model
from residual.train import TrainConfig, train
from residual.train.checkpoint import load_checkpoint
from residual.train.optim import OptimConfig
from residual.train.trainer import Trainer
from steps import distance, imbalanced_shapes

LR = 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return imbalanced_shapes(tmp_path_factory.mktemp("sam"))  # 15 training images: one step of a batch of 16


def one_step(data, folder, name: str, monkeypatch, **options) -> tuple[dict, list]:
    """One plain SGD step (no momentum or weight decay) over all 15 images -> (the weights after it, the
    (batch, labels) of each forward-backward pass)."""
    passes = []
    backward = Trainer._backward

    def recorded(self, forward, x, targets, labels, *rest):
        passes.append((x.detach().clone(), labels.clone()))
        return backward(self, forward, x, targets, labels, *rest)

    monkeypatch.setattr(Trainer, "_backward", recorded)
    result = train(TrainConfig(data=str(data), epochs=1, batch_size=16, model="resnet20", quiet=True, report=False,
                               channels_last=False, deterministic=True, augment=AugmentConfig(preset="none"),
                               optim=OptimConfig(lr=LR, momentum=0.0, weight_decay=0.0, schedule="constant"),
                               out=str(folder), name=name, **options))
    return load_checkpoint(result.run_dir / "last.pt")["model"], passes


def sgd_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, rho: float = 0.0,
             adaptive: bool = False) -> dict:
    """SAM's update written out: e = rho T² g / ‖T g‖ with T = 1 (SAM) or |w| (ASAM), then w - lr ∇L(w + e)."""
    parameters = dict(model.named_parameters())

    def gradient():
        loss = F.cross_entropy(model(x), labels, reduction="sum") / len(labels)
        return torch.autograd.grad(loss, list(parameters.values()))

    first = gradient()
    sizes = [p.detach().abs() if adaptive else torch.ones_like(p) for p in parameters.values()]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(sizes, first)))
    ascent = [rho * t * t * g / norm for t, g in zip(sizes, first)]
    with torch.no_grad():
        for p, e in zip(parameters.values(), ascent):
            p.add_(e)
    second = gradient()
    with torch.no_grad():
        for p, e in zip(parameters.values(), ascent):
            p.sub_(e)
    return {name: (p - LR * g).detach() for (name, p), g in zip(parameters.items(), second)}


@pytest.mark.parametrize("rho, adaptive", [(0.5, False), (0.5, True)])
def test_the_step_is_the_gradient_at_the_worst_nearby_weights(data, tmp_path, monkeypatch, rho, adaptive):
    # Without batch norm the two passes see the same function, so the engine's step must be the formula's to
    # rounding (the formula in float64); a plain step (rho 0) is far from it. At ASAM's rho 0.5, not more: at
    # rho 2 float32 rounding alone moved the step by 1.5e-3 of its length, by how many threads summed it.
    end, passes = one_step(data, tmp_path, "sam", monkeypatch, sam=rho, sam_adaptive=adaptive,
                           model_options={"norm": None})
    assert len(passes) == 2 and torch.equal(passes[0][0], passes[1][0])  # both passes see the same batch
    x, labels = passes[0]
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, norm=None).double()  # the run's first weights (seed 0)
    start = {name: p.detach().float() for name, p in model.named_parameters()}
    x = x.double()
    expected = {name: w.float() for name, w in sgd_step(model, x, labels, rho, adaptive).items()}
    plain = {name: w.float() for name, w in sgd_step(model, x, labels).items()}
    end = {name: end[name] for name in expected}
    moved = distance(end, start)
    assert distance(end, expected) < 1e-4 * moved, f"{distance(end, expected) / moved:.2e} of the step apart"
    assert distance(end, plain) > 0.02 * moved  # SAM's step is not the plain one


def test_batch_norm_statistics_take_the_first_pass_alone(data, tmp_path, monkeypatch):
    # Both runs start from the same weights and batch, so the first forward pass gives both the same running
    # statistics; the second pass, at the perturbed weights, must not add its own.
    with monkeypatch.context() as patch:
        with_sam, passes = one_step(data, tmp_path, "sam", patch, sam=0.5)
    assert len(passes) == 2
    plain, _ = one_step(data, tmp_path, "plain", monkeypatch)
    statistics = [name for name in plain if "running_" in name or "num_batches_tracked" in name]
    assert statistics and all(torch.allclose(with_sam[name], plain[name], atol=1e-6) for name in statistics)
    assert with_sam["bn1.num_batches_tracked"] == 1
    weights = [name for name in plain if name.endswith(".weight")]
    assert not all(torch.equal(with_sam[name], plain[name]) for name in weights)


def test_what_cannot_go_with_sam_is_refused_in_one_line(data, tmp_path, capsys):
    common = [str(data), "--epochs", "1", "--quiet", "--no-report", "--out", str(tmp_path)]
    for flags, message in [(["--sam", "0.05", "--accumulate", "2"], "--sam takes its step from the whole batch's "
                                                                     "gradient, which --accumulate 2 only has"),
                           (["--sam-adaptive"], "--sam-adaptive scales SAM's step: give --sam RHO too"),
                           (["--sam", "-1"], "--sam is the radius of SAM's step: positive")]:
        assert main(["train", *common, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())
