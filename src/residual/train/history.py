"""What a run records per epoch: metrics.csv, and curves.png drawn from it (and, for `residual compare`,
several runs' curves together and their scores on the same images)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..atomic import atomic_path
from ..figures import new_figure, save_png
from ..metrics import SIGNIFICANCE, p_value_text

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr", "images_per_s",
           "epoch_seconds")
DISTILL_COLUMNS = ("train_label_loss", "train_distill_loss")  # with a teacher: train_loss's two terms
SIZE_COLUMN = "train_size"  # with progressive resizing: the epoch's training image size
# A multi-label run's: its validation scores in place of top-1 and top-5.
MULTI_LABEL_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_map", "val_f1", "val_exact_match", "lr",
                       "images_per_s", "epoch_seconds")


def write_metrics(history: list[dict], path: Path) -> None:
    """Rewrite metrics.csv from the whole history (atomic, so a kill never leaves half a row)."""
    buffer = io.StringIO()
    distilled = any(column in row for row in history for column in DISTILL_COLUMNS)
    resized = any(SIZE_COLUMN in row for row in history)
    columns = MULTI_LABEL_COLUMNS if history and "val_map" in history[0] else COLUMNS
    writer = csv.DictWriter(buffer, fieldnames=columns + (DISTILL_COLUMNS if distilled else ())
                            + ((SIZE_COLUMN,) if resized else ()), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv's rows, with numbers as numbers (the epoch an int); an empty cell (a column that later
    epochs added, such as a resumed run's teacher terms) is left out of its row."""
    with open(path, newline="") as f:
        return [{key: int(value) if key in ("epoch", SIZE_COLUMN) else float(value) for key, value in row.items()
                 if value != ""}
                for row in csv.DictReader(f)]


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss, accuracy and learning rate per epoch: train thin, validation bold."""
    epochs = [row["epoch"] for row in history]
    figure = new_figure(figsize=(13, 3.8))
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], lw=1, label="train")
    if all(column in history[0] for column in DISTILL_COLUMNS):  # a teacher's: the train loss is their weighted sum
        loss_ax.plot(epochs, [r["train_label_loss"] for r in history], "C2--", lw=1, label="train, labels' term")
        loss_ax.plot(epochs, [r["train_distill_loss"] for r in history], "C3:", lw=1, label="train, teacher's term")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], "C1", lw=2.2, label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    multi_label = "val_map" in history[0]
    acc_ax.plot(epochs, [100 * r["train_acc"] for r in history], lw=1,
                label="train, labels right" if multi_label else "train")
    if multi_label:
        acc_ax.plot(epochs, [100 * r["val_map"] for r in history], lw=2.2, label="validation mAP")
        acc_ax.plot(epochs, [100 * r["val_f1"] for r in history], "C2", lw=1.5, label="validation F1 (micro)")
    else:
        acc_ax.plot(epochs, [100 * r["val_top1"] for r in history], lw=2.2, label="validation top-1")
    acc_ax.set(title="scores (%)" if multi_label else "accuracy (%)", xlabel="epoch")
    lr_ax.plot(epochs, [r["lr"] for r in history], color="gray")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    if any(SIZE_COLUMN in r for r in history):  # progressive resizing: each epoch's training size beside it
        size_ax = lr_ax.twinx()
        size_ax.step(epochs, [r.get(SIZE_COLUMN, math.nan) for r in history], "C4", where="mid", lw=1.2)
        size_ax.set_ylabel("training size (px)", color="C4")
        lr_ax.set_title("learning rate (end of epoch), training size")
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    save_png(figure, path)


def plot_runs(runs: list[tuple[str, list[dict]]], path: Path) -> None:
    """Validation top-1 (multi-label runs: mAP) and loss per epoch of several runs ((name, metrics.csv rows)
    each), one line per run."""
    figure = new_figure(figsize=(12, 4))
    top1_ax, loss_ax = figure.subplots(1, 2)
    score = "val_map" if any("val_map" in row for _, history in runs for row in history) else "val_top1"
    for name, history in runs:
        epochs = [row["epoch"] for row in history]
        line, = top1_ax.plot(epochs, [100 * row[score] for row in history], lw=1.8, label=name)
        loss_ax.plot(epochs, [row["val_loss"] for row in history], lw=1.8, color=line.get_color())
    top1_ax.set(title=f"validation {'mAP' if score == 'val_map' else 'top-1'} (%)", xlabel="epoch")
    loss_ax.set(title="validation loss", xlabel="epoch")
    for ax in (top1_ax, loss_ax):
        ax.grid(alpha=0.3)
    top1_ax.legend(fontsize="small")
    figure.tight_layout()
    save_png(figure, path)


def plot_scores(runs: list[tuple[str, float, tuple[float, float], dict | None]], path: Path, title: str,
                score_name: str = "top-1") -> None:
    """Each run's top-1 or mAP (name, score, its 95% interval, the test of its gap to the best, with its
    p_value, or None for the best) as a dot with its interval, best at the top; runs whose gap to the best
    could be chance are drawn grey."""
    figure = new_figure(figsize=(8, 1.2 + 0.45 * len(runs)))
    ax = figure.subplots()
    labels = []
    for row, (name, score, (low, high), versus) in enumerate(runs):
        colour = "C0" if versus is None else "C3" if versus["p_value"] < SIGNIFICANCE else "0.55"
        ax.errorbar(100 * score, row, xerr=[[100 * (score - low)], [100 * (high - score)]], fmt="o", color=colour,
                    capsize=4)
        p_value = "" if versus is None else p_value_text(versus, 2)
        labels.append(f"{name} (best)" if versus is None else
                      f"{name} (p {'' if p_value.startswith('<=') else '= '}{p_value})")
    ax.set_yticks(range(len(runs)), labels)
    ax.invert_yaxis()
    ax.margins(y=0.3)
    ax.set(xlabel=f"{score_name} (%) with its 95% interval; red: worse than the best by more than chance",
           title=title)
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    save_png(figure, path)
