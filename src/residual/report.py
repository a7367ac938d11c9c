"""The evaluation report: metrics.json, predictions.csv (one row per image), four pictures and one
self-contained report.html.

Pictures: confusion_matrix.png (counts and row-normalised side by side),
reliability.png (accuracy against confidence, with the count per bin), roc_curves.png (the classes
with the lowest ROC AUC) and highest_loss.png (the images the model got most wrong, each with Grad-CAM for
the class it predicted and for the true class). report.html embeds all of them
as data URIs, so it is one file that opens offline in any browser.
"""

from __future__ import annotations

import base64
import csv
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .atomic import atomic_path, write_json
from .explain import overlay
from .metrics import image_losses

ANNOTATE_UP_TO = 20  # classes; beyond this the matrix cells are too small for numbers
LABEL_UP_TO = 60  # classes; beyond this tick labels overlap
GALLERY_SIZE = 112  # pixels per gallery panel: enough to see, small enough to embed


@dataclass
class GalleryItem:
    """One of the highest-loss images, with what the model saw in it."""

    source: str
    true: str
    predicted: str
    p_true: float
    p_predicted: float
    loss: float
    image: np.ndarray  # H x W x 3 uint8 model input
    cam_predicted: np.ndarray | None  # Grad-CAM for the predicted class (None for models without gradients)
    cam_true: np.ndarray | None

    def summary(self) -> dict:
        return {"source": self.source, "true": self.true, "predicted": self.predicted, "p_true": self.p_true,
                "p_predicted": self.p_predicted, "loss": self.loss}


def _save(figure: Figure, path: Path, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    count = len(class_names)
    side = min(7.0, 2.5 + 0.35 * count)
    figure = Figure(figsize=(2 * side + 1.5, side))
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    for axis, values, title, fmt in zip(figure.subplots(1, 2), (matrix, normalised),
                                        ("counts", "normalised by true class (recall on the diagonal)"), ("d", ".2f")):
        shown = axis.imshow(values, cmap="Blues", vmin=0, vmax=values.max() if values.max() > 0 else 1)
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        if count <= LABEL_UP_TO:
            axis.set_xticks(range(count), class_names, rotation=90, fontsize=7)
            axis.set_yticks(range(count), class_names, fontsize=7)
        if count <= ANNOTATE_UP_TO:
            threshold = values.max() / 2
            for (i, j), value in np.ndenumerate(values):
                if value:
                    axis.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                              color="white" if value > threshold else "black")
    figure.tight_layout()
    _save(figure, path)


def plot_reliability(rows: list[dict], ece: float, path: Path, title: str = "reliability diagram") -> None:
    figure = Figure(figsize=(5.5, 6.0))
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
    width = rows[0]["upper"] - rows[0]["lower"]
    filled = [r for r in rows if r["count"]]
    filled_centres = [(r["lower"] + r["upper"]) / 2 for r in filled]
    top.bar(filled_centres, [r["accuracy"] for r in filled], width=width, edgecolor="black", color="#4c72b0",
            label="accuracy")
    # The gap spans accuracy to mean confidence: above the bar when over-confident, inside it when under.
    top.bar(filled_centres, [abs(r["confidence"] - r["accuracy"]) for r in filled],
            bottom=[min(r["confidence"], r["accuracy"]) for r in filled], width=width, facecolor="none",
            edgecolor="red", hatch="//", linewidth=0.8, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"{title} (ECE {ece:.3f})", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [r["count"] for r in rows], width=width, edgecolor="black", color="grey")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    figure.tight_layout()
    _save(figure, path)


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], ranked: int, path: Path) -> None:
    """One ROC curve per class (that class against the rest), as metrics.hardest_roc_curves gives them;
    `ranked`: how many classes have one."""
    figure = Figure(figsize=(5.5, 5.0))
    axis = figure.subplots()
    for name, (false_positive, true_positive, auc) in curves.items():
        # Straight lines between thresholds: tied scores give a diagonal, as the AUC counts them (half).
        axis.plot(false_positive, true_positive, linewidth=1.2, label=f"{name} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="chance")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    shown = "every class" if len(curves) == ranked else f"the {len(curves)} of {ranked} classes with the lowest AUC"
    axis.set_title(f"ROC, each class against the rest ({shown})", fontsize=10)
    axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    _save(figure, path)


def plot_gallery(items: list[GalleryItem], path: Path, per_row: int = 4) -> None:
    """Each item: the image, and Grad-CAM for the predicted and the true class."""
    panels = 3 if items and items[0].cam_predicted is not None else 1
    rows = max(1, -(-len(items) // per_row))
    figure = Figure(figsize=(per_row * panels * 1.5, rows * 1.8))
    axes = np.asarray(figure.subplots(rows, per_row * panels, squeeze=False))
    for axis in axes.flat:
        axis.axis("off")
    for number, item in enumerate(items):
        row, column = divmod(number, per_row)
        cells = axes[row, column * panels:(column + 1) * panels]
        cells[0].imshow(item.image)
        cells[0].set_title(f"{Path(item.source).name}\ntrue {item.true} ({item.p_true:.2f})", fontsize=7)
        if panels == 3:
            cells[1].imshow(overlay(item.image, item.cam_predicted, size=GALLERY_SIZE))
            cells[1].set_title(f"why {item.predicted}\n(p {item.p_predicted:.2f})", fontsize=7, color="firebrick")
            cells[2].imshow(overlay(item.image, item.cam_true, size=GALLERY_SIZE))
            cells[2].set_title(f"evidence for {item.true}", fontsize=7, color="darkgreen")
    figure.suptitle("highest-loss images" + (" with Grad-CAM" if panels == 3 else ""), fontsize=10)
    figure.tight_layout()
    _save(figure, path, dpi=90)  # noisy photos compress badly; this keeps report.html near 1 MB


def plot_copies(rows: list[tuple[str, list[tuple[str, object]]]], path: Path, per_row: int = 4) -> None:
    """check-data's copies: a row per group (its title, then up to `per_row` (caption, PIL image) pairs), so
    a reader can see whether they are the same picture."""
    figure = Figure(figsize=(per_row * 1.8, len(rows) * 2.0))
    axes = np.asarray(figure.subplots(len(rows), per_row, squeeze=False))
    for axis in axes.flat:
        axis.axis("off")
    for cells, (title, images) in zip(axes, rows):
        for axis, (caption, image) in zip(cells, images[:per_row]):
            axis.imshow(image)
            axis.set_title(caption, fontsize=6)
        cells[0].text(-0.08, 0.5, title, transform=cells[0].transAxes, rotation=90, va="center", ha="right",
                      fontsize=7)
    figure.tight_layout()
    _save(figure, path, dpi=90)


COPY_ROWS_SHOWN = 12  # groups of copies in copies.png


def write_check_files(report, out: Path) -> list[Path]:
    """check-data.json, and copies.png when there are copies to look at: each group, leak and conflict a row."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "check-data.json", report.to_dict())
    written = [out / "check-data.json"]
    named = lambda items: [(item, Path(item).name) for item in items]  # noqa: E731
    groups = ([("same bytes", named(group)) for group in report.duplicates if len(set(group)) > 1]
              + [("near-identical", named(group)) for group in report.near_duplicates]
              + [(f"{split} = train", named([item, train])) for split, item, train in report.leaks]
              + [(f"{split} ~ train", named([item, train])) for split, item, train in report.near_leaks]
              + [("two classes", [(entry.rsplit(" (", 1)[0], Path(entry).name) for entry in group])
                 for group in report.conflicts])  # each entry "item (class)": the caption keeps the class
    if groups:
        rows = [(title, [(caption, report.image(item)) for item, caption in group])
                for title, group in groups[:COPY_ROWS_SHOWN]]
        plot_copies(rows, out / "copies.png")
        written.append(out / "copies.png")
    return written


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else "" if v is None else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 9px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1.2em}
.card b{display:block;font-size:1.6em}.note{color:#666;font-size:.9em}"""


def write_html(path: Path, title: str, metrics: dict, info: dict, pictures: dict[str, Path],
               gallery: list[GalleryItem], failed: list[str]) -> None:
    low, high = metrics["top1_ci95"]
    cards = [("top-1", f"{metrics['top1']:.2%}"), ("top-1, 95% interval", f"{low:.2%} - {high:.2%}"),
             ("top-5", f"{metrics['top5']:.2%}"),
             ("loss", f"{metrics['loss']:.4f}"), ("ECE", f"{metrics['ece']:.4f}"),
             ("images", f"{metrics['images']:,}"), ("unreadable", str(len(failed)))]
    if metrics["macro"]["roc_auc"] is not None:
        cards.insert(4, ("ROC AUC (macro)", f"{metrics['macro']['roc_auc']:.4f}"))
    scores = ("precision", "recall", "f1", "roc_auc", "average_precision")
    per_class = [[r["class"], *(r[k] for k in scores), r["support"]] for r in metrics["per_class"]]
    per_class += [[f"{name} average", *(metrics[name][k] for k in scores), metrics["images"]]
                  for name in ("macro", "weighted")]
    confused = [[p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.1%}"] for p in metrics["most_confused"]]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<p class='note'>" + " &middot; ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in info.items())
        + "</p>",
        "<div class='cards'>" + "".join(f"<div class='card'>{k}<b>{v}</b></div>" for k, v in cards) + "</div>",
        "<h2>Per class</h2>", _table(["class", "precision", "recall", "F1", "ROC AUC", "average precision",
                                      "support"], per_class),
        "<p class='note'>ROC AUC and average precision rank the images by the class's probability, the class "
        "against the rest; blank where the class is absent from the images or is all of them.</p>",
        "<h2>Most confused pairs</h2>",
        _table(["true", "predicted as", "images", "share of the true class"], confused) if confused
        else "<p>No confusions.</p>",
        f"<h2>Confusion matrix</h2><img src='{_png(pictures['confusion_matrix'])}' alt='confusion matrix'>",
        "<h2>Calibration</h2><p class='note'>Expected calibration error: the gap between confidence and accuracy, "
        f"averaged over {len(metrics['calibration'])} confidence bins weighted by their image count.</p>"
        f"<img src='{_png(pictures['reliability'])}' alt='reliability diagram'>",
        "<h3>Accepting only sure predictions</h3><p class='note'>The share of images whose predicted class "
        "has at least this probability, and the top-1 among them: what a threshold in an application would "
        "keep, and how often it would then be right.</p>",
        _table(["probability at least", "images kept", "their top-1"],
               [[f"{row['threshold']:g}", f"{row['coverage']:.1%}",
                 None if row["accuracy"] is None else f"{row['accuracy']:.2%}"] for row in metrics["selective"]]),
    ]
    if "roc" in pictures:
        parts += [f"<h2>ROC curves</h2><img src='{_png(pictures['roc'])}' alt='ROC curves'>"]
    if gallery:
        parts += [f"<h2>Highest-loss images</h2><img src='{_png(pictures['highest_loss'])}' alt='highest-loss images'>",
                  _table(["image", "true", "predicted", "p(true)", "p(predicted)", "loss"],
                         [[g.source, g.true, g.predicted, g.p_true, g.p_predicted, g.loss] for g in gallery])]
    if failed:
        parts += [f"<h2>Unreadable images ({len(failed)}, skipped)</h2><ul>"
                  + "".join(f"<li>{html.escape(message)}</li>" for message in failed) + "</ul>"]
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")


def write_predictions(path: Path, sources: list[str], labels: np.ndarray, probs: np.ndarray,
                      class_names: list[str]) -> Path:
    """predictions.csv: one row per image evaluated, in the split's order, with its true and predicted class,
    the probability of each and its loss, to sort and filter beyond the gallery's few (the images most
    likely mislabelled are the confident mistakes)."""
    predicted = probs.argmax(1)
    rows = np.arange(len(labels))
    losses = image_losses(probs, labels)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "true", "predicted", "probability", "true_probability", "loss", "correct"])
        writer.writerows([source, class_names[true], class_names[guess], f"{probs[row, guess]:.6f}",
                          f"{probs[row, true]:.6f}", f"{loss:.6f}", int(true == guess)]
                         for source, row, true, guess, loss in zip(sources, rows, labels, predicted, losses))
    return path


def write_report(out_dir: str | Path, title: str, metrics: dict, info: dict, gallery: list[GalleryItem],
                 failed: list[str], roc: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> dict[str, Path]:
    """Write metrics.json, the pictures and report.html into `out_dir`; returns their paths.
    `roc`: the ROC curves to draw (metrics.hardest_roc_curves)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "confusion_matrix": out / "confusion_matrix.png",
             "reliability": out / "reliability.png", "report": out / "report.html"}
    names = [row["class"] for row in metrics["per_class"]]
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), names, paths["confusion_matrix"])
    plot_reliability(metrics["calibration"], metrics["ece"], paths["reliability"])
    if roc:
        paths["roc"] = out / "roc_curves.png"
        plot_roc_curves(roc, sum(row["roc_auc"] is not None for row in metrics["per_class"]), paths["roc"])
    if gallery:
        paths["highest_loss"] = out / "highest_loss.png"
        plot_gallery(gallery, paths["highest_loss"])
    document = {**info, **metrics, "highest_loss": [item.summary() for item in gallery], "unreadable": failed}
    write_json(paths["metrics"], document)
    write_html(paths["report"], title, metrics, info, paths, gallery, failed)
    return paths
