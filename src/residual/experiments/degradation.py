"""The degradation experiment (He et al. 2015, Fig. 6): deeper plain nets train worse; residual ones do not.

For each depth it trains the plain net and its residual twin with one recipe
(through residual.train, so every run is an ordinary run directory), then draws
the paper's figure (training and test error per epoch, plain left, residual
right, thin = train, bold = test), writes a table of final errors and a verdict
computed from those numbers.

Recipes:
- 'quick' (default): the built-in shapes data at 16 px, 24 epochs, about 10 minutes
  for the four nets on two CPU cores: batch 32, SGD lr 0.02 with a 2-epoch linear
  warmup and cosine decay, weight decay 1e-4, pad-crop + flip.
- 'paper': section 4.2 on CIFAR-10: batch 128, SGD momentum 0.9, weight decay
  1e-4, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k; 4-pixel
  pad + crop + flip. Two deviations, both stated in docs/residual-learning.md:
  per-channel mean subtraction instead of a per-pixel mean image, and for nets of
  110 layers and more a one-epoch linear warmup instead of lr 0.01 until the
  training error drops below 80%.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


from ..atomic import atomic_path
from ..data.datasets import open_dataset
from ..data.transforms import AugmentConfig
from ..errors import ConfigError
from ..figures import COLOURS, new_figure, save_png
from ..models import list_models
from ..train import TrainConfig, train
from ..train.optim import OptimConfig
from .common import resolve_data

RECIPES = ("quick", "paper")
PAPER_ITERATIONS = (32_000, 48_000, 64_000)  # lr / 10, lr / 10, stop


@dataclass
class NetResult:
    model: str
    train_error: list[float]  # per epoch, on the augmented training batches
    test_error: list[float]  # per epoch, on the validation/test split

    @property
    def final_train_error(self) -> float:
        return self.train_error[-1]

    @property
    def final_test_error(self) -> float:
        return self.test_error[-1]


def recipe_config(recipe: str, data: str, model: str, train_images: int, epochs: int | None, norm, init,
                  out: Path, quiet: bool, seed: int = 0) -> TrainConfig:
    common = dict(data=data, model=model, model_options={"norm": norm, "init": init}, out=str(out), name=model,
                  quiet=quiet, report=False, augment=AugmentConfig(preset="cifar"), monitor="val_top1", seed=seed)
    if recipe == "quick":
        # 4,000 images make 125 steps an epoch at batch 32, against 31 at the paper's 128: at 128 and lr 0.1,
        # resnet56 spent its first epochs near chance and ended behind resnet20 (49% training error
        # against 21%); at 32 and lr 0.02 it ended ahead (18% against 24%). Without the warmup, resnet56 blew
        # up in its first steps at lr 0.1 and never left chance: the instability the paper met at 110 layers.
        optim = OptimConfig(lr=0.02, weight_decay=1e-4, schedule="cosine", warmup_epochs=2.0)
        return TrainConfig(epochs=epochs or 24, optim=optim, batch_size=32, **common)
    steps_per_epoch = math.ceil(train_images / 128)
    first, second, stop = (it / steps_per_epoch for it in PAPER_ITERATIONS)
    deep = int(model.removeprefix("plain").removeprefix("resnet")) >= 110
    optim = OptimConfig(lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, schedule="multistep",
                        milestones=(first, second), gamma=0.1, warmup_epochs=1.0 if deep else 0.0)
    return TrainConfig(epochs=epochs or math.ceil(stop), optim=optim, batch_size=128, **common)


def run_degradation(data: str = "shapes", depths: tuple[int, ...] = (20, 56), recipe: str = "quick",
                    epochs: int | None = None, norm: str | None = "batch", init: str = "he",
                    out: str | Path = "runs/experiments/degradation", console=None, quiet: bool = True,
                    seed: int = 0) -> dict:
    """Train plain-N and resnet-N for every depth (training seed `seed`; the data stays the same); write
    degradation.png, results.csv, verdict.txt."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {RECIPES}, got {recipe!r}")
    depths = tuple(sorted(depths))
    missing = [f"{f}{d}" for d in depths for f in ("plain", "resnet") if f"{f}{d}" not in list_models()]
    if len(depths) < 2 or missing:
        raise ConfigError(f"--depths needs two or more CIFAR depths with both twins registered "
                          f"(20, 32, 44, 56, 110); missing: {missing or 'a second depth'}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_data(data, out)
    dataset = open_dataset(folder)
    train_images = len(dataset.train)
    results: dict[str, NetResult] = {}
    for family in ("plain", "resnet"):
        for depth in depths:
            model = f"{family}{depth}"
            if console:
                console.print(f"training {model} ({recipe} recipe)")
            config = recipe_config(recipe, str(folder), model, train_images, epochs, norm, init, out / "runs", quiet,
                                   seed)
            history = train(config, console=console).history
            results[model] = NetResult(model, [1 - r["train_acc"] for r in history],
                                       [1 - r["val_top1"] for r in history])
    verdict = write_report(results, depths, len(dataset.classes), out,
                           f"{data}, {recipe} recipe, norm={norm or 'none'}, init={init}, seed {seed}")
    if console:
        console.print(verdict)
    return {"results": results, "verdict": verdict, "out": out}


NEAR_CHANCE_POINTS = 0.10  # a net whose training error is this close to chance has not learned yet


def verdict_lines(results: dict[str, NetResult], depths: tuple[int, ...], classes: int) -> list[str]:
    """What the numbers say, in words: the two claims of the paper, checked. A comparison of two nets
    that both ended near chance (a run of a few epochs) is said to tell nothing."""
    shallow, deep = depths[0], depths[-1]
    chance = 1 - 1 / classes

    too_short = (f"too short to tell: both are within {NEAR_CHANCE_POINTS:.0%} of chance ({chance:.0%} for "
                 f"{classes} classes); train longer (--epochs, or the recipe's own length).")

    def near_chance(a: NetResult, b: NetResult) -> bool:
        return min(a.final_train_error, b.final_train_error) > chance - NEAR_CHANCE_POINTS

    def conclusion(a: NetResult, b: NetResult, finding: str) -> str:
        return too_short if near_chance(a, b) else finding

    p_shallow, p_deep = results[f"plain{shallow}"], results[f"plain{deep}"]
    r_shallow, r_deep = results[f"resnet{shallow}"], results[f"resnet{deep}"]
    degraded = p_deep.final_train_error > p_shallow.final_train_error
    better = r_deep.final_train_error < r_shallow.final_train_error
    gap = p_deep.final_train_error - r_deep.final_train_error
    return [
        f"Plain nets: plain-{deep} ended with {'HIGHER' if degraded else 'lower or equal'} training error than "
        f"plain-{shallow} ({p_deep.final_train_error:.2%} vs {p_shallow.final_train_error:.2%}): "
        + conclusion(p_deep, p_shallow, "the degradation problem is visible." if degraded
                     else "no degradation in this run."),
        f"Residual nets: resnet-{deep} ended with {'LOWER' if better else 'higher or equal'} training error than "
        f"resnet-{shallow} ({r_deep.final_train_error:.2%} vs {r_shallow.final_train_error:.2%}): "
        + conclusion(r_deep, r_shallow, "depth helped once shortcuts were added." if better
                     else "the deeper residual net did not train better here."),
        f"At depth {deep}, the shortcuts changed the final training error by {-gap:+.2%} "
        f"(plain {p_deep.final_train_error:.2%}, residual {r_deep.final_train_error:.2%}); "
        f"test error {p_deep.final_test_error:.2%} -> {r_deep.final_test_error:.2%}"
        + (f": {too_short}" if near_chance(p_deep, r_deep) else "."),
    ]


def write_report(results: dict[str, NetResult], depths: tuple[int, ...], classes: int, out: Path,
                 subtitle: str) -> str:
    figure = new_figure(figsize=(12, 4.4))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, family, title in zip(axes, ("plain", "resnet"), ("plain", "ResNet")):
        for colour, depth in zip(COLOURS, depths):
            net = results[f"{family}{depth}"]
            epochs = range(1, len(net.train_error) + 1)
            ax.plot(epochs, [100 * e for e in net.train_error], color=colour, lw=0.9, ls="--")
            ax.plot(epochs, [100 * e for e in net.test_error], color=colour, lw=2.4, label=f"{title}-{depth}")
        ax.set(title=f"{title} (dashed = train, bold = test)", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    figure.suptitle(f"Degradation: {subtitle}")
    figure.tight_layout()
    save_png(figure, out / "degradation.png")

    rows = ["model,final_train_error,final_test_error,best_test_error"]
    rows += [f"{n.model},{n.final_train_error:.4f},{n.final_test_error:.4f},{min(n.test_error):.4f}"
             for n in results.values()]
    with atomic_path(out / "results.csv") as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    verdict = "\n".join(verdict_lines(results, depths, classes))
    with atomic_path(out / "verdict.txt") as tmp:
        tmp.write_text(verdict + "\n")
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({"subtitle": subtitle, "depths": list(depths), "verdict": verdict,
                                   "results": {k: vars(v) for k, v in results.items()}}, indent=2))
    return verdict
