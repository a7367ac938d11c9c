"""Optimizers and every schedule's values."""

import math

import numpy as np
import pytest
import torch

import residual
import residual.cli
from residual.data.datasets import open_dataset
from residual.data.shapes import write_shapes
from residual.train import TrainConfig
from residual.train.config import resolve
from residual.train.optim import Lamb, OptimConfig, PlateauDecay, build_optimizer, build_scheduler, lr_factor

SPE = 10  # steps per epoch


def factors(config, epochs=10):
    total = SPE * epochs
    return [lr_factor(step, config, SPE, total) for step in range(total)]


def test_cosine_with_warmup():
    f = factors(OptimConfig(lr=1.0, schedule="cosine", warmup_epochs=1, min_lr_ratio=0.1))
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_step_and_multistep():
    f = factors(OptimConfig(lr=1.0, schedule="step", step_size=3, gamma=0.5))
    assert (f[29], f[30], f[59], f[60], f[99]) == pytest.approx((1, 0.5, 0.5, 0.25, 0.125))
    f = factors(OptimConfig(lr=1.0, schedule="multistep", milestones=(2, 7), gamma=0.1))
    assert (f[19], f[20], f[69], f[70]) == pytest.approx((1, 0.1, 0.1, 0.01))


def test_exponential_decay_as_keras():
    # Keras ExponentialDecay: lr * rate ** (step / decay_steps), floored when staircase.
    smooth = factors(OptimConfig(lr=1.0, schedule="exponential", decay_rate=0.5, decay_epochs=2))
    stairs = factors(OptimConfig(lr=1.0, schedule="exponential", decay_rate=0.5, decay_epochs=2, staircase=True))
    assert smooth[15] == pytest.approx(0.5 ** (15 / 20))
    assert stairs[15] == 1.0 and stairs[20] == 0.5 and stairs[45] == 0.25


def test_one_cycle_matches_torch():
    config = OptimConfig(lr=0.4, schedule="onecycle", onecycle_pct_start=0.3)
    total = 100
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=0.4)
    torch_sched = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.4, total_steps=total, pct_start=0.3,
                                                      anneal_strategy="cos", cycle_momentum=False,
                                                      three_phase=False)
    expected = []
    for _ in range(total):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        torch_sched.step()
    ours = [0.4 * lr_factor(step, config, SPE, total) for step in range(total)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_scheduler_steps_the_optimizer_lr():
    model = torch.nn.Linear(2, 2)
    config = OptimConfig(lr=0.2, schedule="step", step_size=1, gamma=0.5, weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, SPE, SPE * 3)
    lrs = []
    for _ in range(SPE * 2):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[SPE] == pytest.approx(0.1)


@pytest.mark.parametrize("mode, scores", [
    ("max", [0.5, 0.6, 0.6, 0.60005, 0.59, 0.7, 0.7, 0.7, float("nan"), 0.7, 0.71, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]),
    ("min", [float("nan"), 2.0, 1.5, 1.6, 1.49995, 1.5, 1.0, 1.2, 1.1, 1.1, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])])
def test_plateau_cuts_the_rate_when_torchs_reduce_lr_on_plateau_does(mode, scores):
    """The same scores to ours and to torch's scheduler (patience 2, factor 0.5, floor 0.2 of the rate): the same
    rate after every epoch. Gains under 1e-4 of the best are no improvement, and a NaN is none either."""
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode, factor=0.5, patience=2, min_lr=0.02)
    ours = PlateauDecay(0.5, 2, 0.2, higher_is_better=mode == "max")
    rates, cuts = [], []
    for score in scores:
        reference.step(score)
        cuts.append(ours.update(score))
        rates.append(0.1 * ours.scale)
        assert rates[-1] == pytest.approx(optimizer.param_groups[0]["lr"])
    assert sum(cuts) == 3 and rates[-1] == pytest.approx(0.02)  # two halvings, then the floor


def test_early_stopping_that_would_end_the_run_before_the_plateau_cut_is_warned_of(tmp_path, capsys):
    data = write_shapes(tmp_path / "s", size=16, per_class=2, seed=0, progress=False)
    for patience, warned in (("3", True), ("5", False)):
        assert residual.cli.main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--workers", "0",
                                  "--schedule", "plateau", "--plateau-patience", "3", "--early-stopping", patience,
                                  "--no-report", "--quiet", "--out", str(tmp_path / "runs")]) == 0
        printed = " ".join(capsys.readouterr().out.split())
        assert ("--early-stopping 3 ends the run before --schedule plateau could train at the rate it cuts after 4 "
                "epochs without improvement" in printed) == warned


def test_the_plateau_schedule_in_training_waits_out_the_warmup_and_survives_a_resume(tmp_path):
    from rich.console import Console

    from residual.train.checkpoint import load_checkpoint
    from residual.train.trainer import Trainer

    data = write_shapes(tmp_path / "s", size=16, per_class=4, seed=0, progress=False)
    dataset = open_dataset(data)
    config = resolve(TrainConfig(data=str(data), model="resnet20", batch_size=8, quiet=True, workers=0, epochs=9,
                                 optim=OptimConfig(lr=0.1, schedule="plateau", plateau_patience=1, gamma=0.5,
                                                   warmup_epochs=2)), dataset)
    trainer = Trainer(config, dataset, tmp_path / "run", Console(quiet=True))
    train_stats = {"train_loss": 1.0, "train_acc": 0.5, "images_per_s": 1.0, "epoch_seconds": 1.0}
    rates = []
    for top1 in (0.1, 0.1, 0.5, 0.5, 0.5, 0.5):  # two warmup epochs, which do not count, then a plateau
        for _ in range(trainer.steps_per_epoch):
            trainer.optimizer.step()
            trainer.scheduler.step()
        trainer._end_epoch(train_stats, {"val_loss": 1.0, "val_top1": top1, "val_top5": 1.0})
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    assert rates[0] < 0.1 and rates[1:] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05])  # cut after 2 more at the best
    resumed = Trainer(config, dataset, tmp_path / "run", Console(quiet=True))
    resumed.restore(load_checkpoint(tmp_path / "run" / "last.pt"))
    assert resumed.plateau.state_dict() == trainer.plateau.state_dict() == {"scale": 0.5, "best": 0.5,
                                                                           "bad_epochs": 1}
    resumed.optimizer.step()
    resumed.scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                        ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop),
                                        ("lamb", Lamb)])
def test_no_weight_decay_on_norms_and_biases(name, kind):
    model = residual.create_model("resnet20")
    optimizer = build_optimizer(model, OptimConfig(optimizer=name, lr=0.1, weight_decay=1e-4))
    assert isinstance(optimizer, kind)
    decay = [p for g in optimizer.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]]
    no_decay = [p for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert {id(p) for p in no_decay} == {id(model.fc.bias)} | {id(p) for n, p in model.named_parameters() if "bn" in n}
    assert all(p.ndim >= 2 for p in decay)
    if name == "sgd":
        assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def test_bad_optimizer_options():
    with pytest.raises(residual.ConfigError, match="--optimizer"):
        OptimConfig(optimizer="lars")
    with pytest.raises(residual.ConfigError, match="--schedule"):
        OptimConfig(schedule="poly")
    with pytest.raises(residual.ConfigError, match="--schedule plateau cuts the lr by --gamma below 1"):
        OptimConfig(schedule="plateau", gamma=2.0)


def test_layer_lr_decay_gives_discriminative_learning_rates():
    model = residual.create_model("resnet20")
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=1e-4), layer_lr_decay=0.5)
    lr_of = {g["layer_group"]: g["lr"] for g in optimizer.param_groups}
    assert lr_of == pytest.approx({"head": 0.1, "layer3": 0.05, "layer2": 0.025, "layer1": 0.0125, "stem": 0.00625})
    scheduler = build_scheduler(optimizer, OptimConfig(lr=0.1, schedule="step", step_size=1, gamma=0.5), SPE, SPE * 2)
    for _ in range(SPE):
        optimizer.step()
        scheduler.step()
    assert {g["layer_group"]: g["lr"] for g in optimizer.param_groups}["stem"] == pytest.approx(0.003125)


@pytest.mark.parametrize("optimizer, lr, weight_decay", [("sgd", 0.2, 5e-4), ("adam", 2e-3, 5e-4),
                                                         ("adamw", 2e-3, 0.01), ("rmsprop", 2e-3, 5e-4),
                                                         ("lamb", 8e-3, 0.01)])  # LAMB's is not scaled
def test_the_automatic_learning_rate_suits_the_optimizer(tmp_path, optimizer, lr, weight_decay):
    # At SGD's 0.1, Adam, AdamW and RMSprop left a resnet20 on shapes at chance (10.9% after 4 epochs for AdamW,
    # 32.3% at 0.001; 2026-12-04). Small images: per 128 images, so twice that for 256.
    data = open_dataset(write_shapes(tmp_path / "shapes", size=16, per_class=2, seed=0, progress=False))
    config = TrainConfig(data=str(tmp_path / "shapes"), batch_size=256, optim=OptimConfig(optimizer=optimizer))
    resolved = resolve(config, data).optim
    assert resolved.lr == pytest.approx(lr) and resolved.weight_decay == weight_decay
    given = TrainConfig(data=str(tmp_path / "shapes"), optim=OptimConfig(optimizer=optimizer, lr=0.5, weight_decay=0))
    assert (resolve(given, data).optim.lr, resolve(given, data).optim.weight_decay) == (0.5, 0)


def _lamb_by_hand(weights, grads, lr, weight_decay, steps, betas=(0.9, 0.999), eps=1e-6):
    """LAMB as You et al. 2019 write it (Algorithm 2), in NumPy, for one tensor and the same gradient each step."""
    w, m, v = weights.astype(np.float64), np.zeros_like(weights, np.float64), np.zeros_like(weights, np.float64)
    for t in range(1, steps + 1):
        m = betas[0] * m + (1 - betas[0]) * grads
        v = betas[1] * v + (1 - betas[1]) * grads ** 2
        r = (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
        if weight_decay:
            r = r + weight_decay * w
            r = r * np.linalg.norm(w) / np.linalg.norm(r)
        w = w - lr * r
    return w


def test_lamb_scales_each_tensors_adam_step_by_its_trust_ratio():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator) * 5  # far larger than a unit step: the ratio matters
    bias = torch.randn(3, generator=generator)
    grads = (torch.randn(4, 3, generator=generator), torch.randn(3, generator=generator))
    params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    optimizer = Lamb([{"params": [params[0]], "weight_decay": 0.01}, {"params": [params[1]], "weight_decay": 0.0}],
                     lr=0.1)
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    expected_weight = _lamb_by_hand(weight.numpy(), grads[0].numpy(), 0.1, 0.01, 3)
    expected_bias = _lamb_by_hand(bias.numpy(), grads[1].numpy(), 0.1, 0.0, 3)  # no decay: Adam's step as it is
    assert params[0].detach().numpy() == pytest.approx(expected_weight, rel=1e-5)
    assert params[1].detach().numpy() == pytest.approx(expected_bias, rel=1e-5)
    # Each step moves the weight by lr times its norm: the trust ratio makes the step relative to the layer.
    before = params[0].detach().clone()
    params[0].grad = grads[0].clone()
    optimizer.step()
    assert (params[0].detach() - before).norm().item() == pytest.approx(0.1 * before.norm().item(), rel=1e-5)
    # It resumes from its state dict, step count included.
    restored = Lamb([{"params": [params[0]], "weight_decay": 0.01}, {"params": [params[1]], "weight_decay": 0.0}])
    restored.load_state_dict(optimizer.state_dict())
    assert restored.state[params[0]]["step"] == 4
