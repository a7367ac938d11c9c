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

from .atomic import atomic_path, write_json
from .explain import overlay
from .figures import new_figure, save_png
from .metrics import image_losses, label_losses, shows_top5

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
    # Multi-label: every class the image has and every class predicted; `true` is then the one of its classes
    # the model is least sure of, and `predicted` the absent class it is surest of (the worst mistakes).
    true_labels: str | None = None
    predicted_labels: str | None = None

    def summary(self) -> dict:
        labels = ({} if self.true_labels is None else
                  {"true_labels": self.true_labels, "predicted_labels": self.predicted_labels})
        return {"source": self.source, "true": self.true, "predicted": self.predicted, "p_true": self.p_true,
                "p_predicted": self.p_predicted, "loss": self.loss, **labels}


def threshold_text(threshold: float | list[float]) -> str:
    """A multi-label model's threshold in words: '0.5', or the range of its per-class thresholds."""
    values = sorted(set(threshold)) if isinstance(threshold, list) else [threshold]
    return f"{values[0]:.3g}" if len(values) == 1 else f"per class {values[0]:.3g}-{values[-1]:.3g}"


def temperature_text(temperature: float | list[float]) -> str:
    """T, or the range of a multi-label model's per-class temperatures: "1.34", or "0.81-2.6 per class"."""
    if isinstance(temperature, list):
        return f"{min(temperature):.3g}-{max(temperature):.3g} per class"
    return f"{temperature:.4g}"


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    count = len(class_names)
    side = min(7.0, 2.5 + 0.35 * count)
    figure = new_figure(figsize=(2 * side + 1.5, side))
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
    save_png(figure, path)


def plot_reliability(rows: list[dict], ece: float, path: Path, title: str = "reliability diagram",
                     measured: str = "accuracy",
                     confidence: str = "confidence (probability of the predicted class)") -> None:
    """Per confidence bin, how often the prediction was right (`measured`) against the probability given."""
    figure = new_figure(figsize=(5.5, 6.0))
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
    width = rows[0]["upper"] - rows[0]["lower"]
    filled = [r for r in rows if r["count"]]
    filled_centres = [(r["lower"] + r["upper"]) / 2 for r in filled]
    top.bar(filled_centres, [r["accuracy"] for r in filled], width=width, edgecolor="black", color="#4c72b0",
            label=measured)
    # The gap spans accuracy to mean confidence: above the bar when over-confident, inside it when under.
    top.bar(filled_centres, [abs(r["confidence"] - r["accuracy"]) for r in filled],
            bottom=[min(r["confidence"], r["accuracy"]) for r in filled], width=width, facecolor="none",
            edgecolor="red", hatch="//", linewidth=0.8, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel(measured)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"{title} (ECE {ece:.3f})", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [r["count"] for r in rows], width=width, edgecolor="black", color="grey")
    bottom.set_xlabel(confidence)
    bottom.set_ylabel("images" if measured == "accuracy" else "decisions")
    figure.tight_layout()
    save_png(figure, path)


def plot_score_groups(scores: dict[str, tuple[dict[str, np.ndarray], float]], keep_known: float,
                      path: Path) -> None:
    """A panel per score: histograms of its values for each group of images (known images answered right and
    wrong, unknown images), each as a share of its group, with the floor that keeps `keep_known` of the known."""
    figure = new_figure(figsize=(6.5 * len(scores), 4.0))
    colours = {"known, answered right": "#4c72b0", "known, answered wrong": "#dd8452", "unknown": "#c44e52"}
    for axes, (score, (groups, floor)) in zip(np.atleast_1d(figure.subplots(1, len(scores))), scores.items()):
        values = np.concatenate(list(groups.values()))
        # The values' own range: a ReLU network's features are never negative, so the similarities of all the
        # images crowd just under 1.
        low, high = float(values.min()), float(values.max())
        edges = np.linspace(low, high if high > low else low + 1e-3, 41)
        for name, group in groups.items():
            if len(group):
                axes.hist(group, bins=edges, weights=np.full(len(group), 1 / len(group)), histtype="step",
                          linewidth=1.6, color=colours.get(name), label=f"{name} ({len(group):,})")
        axes.axvline(floor, color="black", linestyle="--", linewidth=1,
                     label=f"floor {floor:.4f}: keeps {keep_known:.0%} of the known images")
        axes.set_xlabel(score)
        axes.set_ylabel("share of the group's images")
        axes.set_xlim(edges[0], edges[-1])
        axes.set_title(f"known and unknown images by the {score}", fontsize=10)
        axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    save_png(figure, path)


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], ranked: int, path: Path) -> None:
    """One ROC curve per class (that class against the rest), as metrics.hardest_roc_curves gives them;
    `ranked`: how many classes have one."""
    # Straight lines between thresholds: tied scores give a diagonal, as the AUC counts them (half).
    _plot_class_curves(curves, ranked, path, "AUC", ("false positive rate", "true positive rate"),
                       "ROC, each class against the rest", "lowest AUC", chance=([0, 1], [0, 1]))


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], ranked: int, path: Path) -> None:
    """One precision-recall curve per class of a multi-label model, as metrics.hardest_pr_curves gives them;
    `ranked`: how many classes have one."""
    _plot_class_curves(curves, ranked, path, "AP", ("recall", "precision"), "precision against recall",
                       "lowest average precision")


def _plot_class_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], ranked: int, path: Path,
                       score: str, axes: tuple[str, str], title: str, chosen_by: str,
                       chance: tuple[list, list] | None = None) -> None:
    figure = new_figure(figsize=(5.5, 5.0))
    axis = figure.subplots()
    for name, (x, y, value) in curves.items():
        axis.plot(x, y, linewidth=1.2, label=f"{name} ({score} {value:.3f})")
    if chance is not None:
        axis.plot(*chance, "k--", linewidth=1, label="chance")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_xlabel(axes[0])
    axis.set_ylabel(axes[1])
    shown = "every class" if len(curves) == ranked else f"the {len(curves)} of {ranked} classes with the {chosen_by}"
    axis.set_title(f"{title} ({shown})", fontsize=10)
    axis.legend(loc="lower right" if chance is not None else "lower left", fontsize=7)
    figure.tight_layout()
    save_png(figure, path)


def plot_gallery(items: list[GalleryItem], path: Path, per_row: int = 4) -> None:
    """Each item: the image, and Grad-CAM for the predicted and the true class."""
    panels = 3 if items and items[0].cam_predicted is not None else 1
    rows = max(1, -(-len(items) // per_row))
    figure = new_figure(figsize=(per_row * panels * 1.5, rows * 1.8))
    axes = np.asarray(figure.subplots(rows, per_row * panels, squeeze=False))
    for axis in axes.flat:
        axis.axis("off")
    for number, item in enumerate(items):
        row, column = divmod(number, per_row)
        cells = axes[row, column * panels:(column + 1) * panels]
        cells[0].imshow(item.image)
        if item.true_labels is None:
            cells[0].set_title(f"{Path(item.source).name}\ntrue {item.true} ({item.p_true:.2f})", fontsize=7)
        else:
            cells[0].set_title(f"{Path(item.source).name}\ntrue: {item.true_labels or '(none)'}\npredicted: "
                               f"{item.predicted_labels or '(none)'}", fontsize=6)
        if panels == 3:
            cells[1].imshow(overlay(item.image, item.cam_predicted, size=GALLERY_SIZE))
            cells[1].set_title(f"why {item.predicted}\n(p {item.p_predicted:.2f})", fontsize=7, color="firebrick")
            cells[2].imshow(overlay(item.image, item.cam_true, size=GALLERY_SIZE))
            cells[2].set_title(f"evidence for {item.true}" + (f"\n(p {item.p_true:.2f})" if item.true_labels
                                                              is not None else ""), fontsize=7, color="darkgreen")
    figure.suptitle("highest-loss images" + (" with Grad-CAM" if panels == 3 else ""), fontsize=10)
    figure.tight_layout()
    save_png(figure, path, dpi=90)  # noisy photos compress badly; this keeps report.html near 1 MB


def plot_copies(rows: list[tuple[str, list[tuple[str, object]]]], path: Path, per_row: int = 4) -> None:
    """check-data's copies: a row per group (its title, then up to `per_row` (caption, PIL image) pairs), so
    a reader can see whether they are the same picture."""
    figure = new_figure(figsize=(per_row * 1.8, len(rows) * 2.0))
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
    save_png(figure, path, dpi=90)


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
    top5 = [("top-5", f"{metrics['top5']:.2%}")] if shows_top5(len(metrics["per_class"])) else []
    macro_auc = metrics["macro"]["roc_auc"]
    roc_auc = [("ROC AUC (macro)", f"{macro_auc:.4f}")] if macro_auc is not None else []
    cards = [("top-1", f"{metrics['top1']:.2%}"), ("top-1, 95% interval", f"{low:.2%} - {high:.2%}"), *top5,
             ("loss", f"{metrics['loss']:.4f}"), *roc_auc, ("ECE", f"{metrics['ece']:.4f}"),
             ("images", f"{metrics['images']:,}"), ("unreadable", str(len(failed))), *clip_rows(metrics)]
    scores = ("precision", "recall", "f1", "roc_auc", "average_precision")
    per_class = [[r["class"], *(r[k] for k in scores), r["support"]] for r in metrics["per_class"]]
    per_class += [[f"{name} average", *(metrics[name][k] for k in scores), metrics["images"]]
                  for name in ("macro", "weighted")]
    confused = [[p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.1%}"] for p in metrics["most_confused"]]
    sections = [
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
        sections += [f"<h2>ROC curves</h2><img src='{_png(pictures['roc'])}' alt='ROC curves'>"]
    sections += _clips_section(metrics)
    sections += _unknown_section(metrics, pictures)
    if gallery:
        sections += [_gallery_section(pictures, _table(
            ["image", "true", "predicted", "p(true)", "p(predicted)", "loss"],
            [[g.source, g.true, g.predicted, g.p_true, g.p_predicted, g.loss] for g in gallery]))]
    _write_page(path, title, info, cards, sections, failed)


def write_multi_label_html(path: Path, title: str, metrics: dict, info: dict, pictures: dict[str, Path],
                           gallery: list[GalleryItem], failed: list[str]) -> None:
    """report.html of a multi-label model: mAP and the threshold's scores, per class, PR curves, calibration
    of every (image, class) probability, and the highest-loss images."""
    low, high = metrics["exact_match_ci95"]
    cards = [("mAP", f"{metrics['map']:.2%}" if metrics["map"] is not None else "undefined"),
             ("F1 (micro)", f"{metrics['micro']['f1']:.2%}"), ("F1 (macro)", f"{metrics['macro']['f1']:.2%}"),
             ("exact match", f"{metrics['exact_match']:.2%}"), ("exact match, 95% interval", f"{low:.2%} - {high:.2%}"),
             ("Hamming loss", f"{metrics['hamming_loss']:.4f}"), ("loss", f"{metrics['loss']:.4f}"),
             ("ECE", f"{metrics['ece']:.4f}"), ("images", f"{metrics['images']:,}"), ("unreadable", str(len(failed)))]
    scores = ("average_precision", "roc_auc", "precision", "recall", "f1")
    per_class = [[r["class"], *(r[k] for k in scores), r["support"], r["predicted"], r["threshold"]]
                 for r in metrics["per_class"]]
    per_class.append(["micro average", None, None, *(metrics["micro"][k] for k in ("precision", "recall", "f1")),
                      sum(r["support"] for r in metrics["per_class"]),
                      sum(r["predicted"] for r in metrics["per_class"]), None])
    labels = metrics["labels_per_image"]
    sections = [
        f"<p class='note'>A class is predicted where its probability reaches the model's threshold "
        f"({threshold_text(metrics['thresholds'])}; each class's is in the table below). Images have "
        f"{labels['true']:.2f} labels on average; the model predicts {labels['predicted']:.2f}. Exact match: the "
        "share of images with every label right.</p>",
        "<h2>Per class</h2>",
        _table(["class", "average precision", "ROC AUC", "precision", "recall", "F1", "images with it",
                "predicted", "threshold"], per_class),
        "<p class='note'>Average precision and ROC AUC rank the images by the class's probability and do not "
        "depend on the threshold (mAP is their mean over the classes); blank where no image, or every image, "
        "has the class.</p>",
    ]
    if "pr" in pictures:
        sections += [f"<h2>Precision-recall curves</h2><img src='{_png(pictures['pr'])}' alt='precision-recall'>"]
    sections += _unknown_section(metrics, pictures)
    sections += [
        "<h2>Calibration</h2><p class='note'>Every (image, class) probability, binned: how often the class is "
        f"there against the probability given. ECE averages the gap over {len(metrics['calibration'])} bins.</p>"
        f"<img src='{_png(pictures['reliability'])}' alt='reliability diagram'>"]
    if gallery:
        sections += [_gallery_section(pictures, _table(
            ["image", "true", "predicted", "surest absent class", "p", "least sure true class", "p", "loss"],
            [[g.source, g.true_labels, g.predicted_labels, g.predicted, g.p_predicted, g.true, g.p_true, g.loss]
             for g in gallery]))]
    _write_page(path, title, info, cards, sections, failed)


def _gallery_section(pictures: dict[str, Path], table: str) -> str:
    return (f"<h2>Highest-loss images</h2><img src='{_png(pictures['highest_loss'])}' alt='highest-loss images'>"
            + table)


def _write_page(path: Path, title: str, info: dict, cards: list[tuple[str, str]], sections: list[str],
                failed: list[str]) -> None:
    """One self-contained HTML page: the title, the run's facts, the headline cards, the sections, and the
    images that could not be read."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<p class='note'>" + " &middot; ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in info.items())
        + "</p>",
        "<div class='cards'>" + "".join(f"<div class='card'>{k}<b>{v}</b></div>" for k, v in cards) + "</div>",
        *sections]
    if failed:
        parts += [f"<h2>Unreadable images ({len(failed)}, skipped)</h2><ul>"
                  + "".join(f"<li>{html.escape(message)}</li>" for message in failed) + "</ul>"]
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")


def write_predictions(path: Path, sources: list[str], labels: np.ndarray, probs: np.ndarray,
                      class_names: list[str], item: str = "image", frames: np.ndarray | None = None) -> Path:
    """predictions.csv: one row per image evaluated, in the split's order, with its true and predicted class,
    the probability of each and its loss, to sort and filter beyond the gallery's few (the images most
    likely mislabelled are the confident mistakes). clips.csv the same per clip (`item`), with how many
    `frames` each had."""
    predicted = probs.argmax(1)
    rows = np.arange(len(labels))
    losses = image_losses(probs, labels)
    counts = [None] * len(labels) if frames is None else frames
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow([item, "true", "predicted", "probability", "true_probability", "loss", "correct"]
                        + ([] if frames is None else ["frames"]))
        writer.writerows([source, class_names[true], class_names[guess], f"{probs[row, guess]:.6f}",
                          f"{probs[row, true]:.6f}", f"{loss:.6f}", int(true == guess)]
                         + ([] if count is None else [int(count)])
                         for source, row, true, guess, loss, count in zip(sources, rows, labels, predicted, losses,
                                                                          counts))
    return path


def write_report(out_dir: str | Path, title: str, metrics: dict, info: dict, gallery: list[GalleryItem],
                 failed: list[str], roc: dict[str, tuple[np.ndarray, np.ndarray, float]],
                 score_groups: dict[str, tuple[dict[str, np.ndarray], float]] | None = None) -> dict[str, Path]:
    """Write metrics.json, the pictures and report.html into `out_dir`; returns their paths.
    `roc`: the ROC curves to draw (metrics.hardest_roc_curves). `score_groups`: with unknown images, the
    scores to draw (EvalResult.score_groups)."""
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
    _plot_unknown(out, paths, metrics, score_groups)
    _write_gallery_and_metrics(out, paths, metrics, info, gallery, failed)
    write_html(paths["report"], title, metrics, info, paths, gallery, failed)
    return paths


def _plot_unknown(out: Path, paths: dict[str, Path], metrics: dict,
                  score_groups: dict[str, tuple[dict[str, np.ndarray], float]] | None) -> None:
    """unknown.png (added to `paths`) when unknown images were evaluated."""
    if score_groups is not None:
        paths["unknown"] = out / "unknown.png"
        plot_score_groups(score_groups, metrics["unknown"]["keep_known"], paths["unknown"])


def unknown_scores(unknown: dict) -> list[tuple[str, dict]]:
    """The scores eval measured unknown images by, named, with what each gave (metrics["unknown"])."""
    nearest = unknown.get("nearest") or {"skipped": "not measured"}
    name = ("similarity to the nearest training image" if "skipped" in nearest else
            f"similarity to the nearest training image (k={nearest['k']}, {nearest['bank_images']:,} images)")
    return [("probability of the top class", unknown), (name, nearest)]


def clip_rows(metrics: dict) -> list[tuple[str, str]]:
    """The per-clip numbers, (name, value), where the images were the frames of video clips."""
    if "clips" not in metrics:
        return []
    clips = metrics["clips"]
    low, high = clips["top1_ci95"]
    top5 = [("per clip: top-5", f"{clips['top5']:.2%}")] if shows_top5(len(metrics["per_class"])) else []
    return [("clips (frames' probabilities averaged)", f"{clips['clips']:,} ({clips['frames']:,} frames)"),
            ("per clip: top-1", f"{clips['top1']:.2%}"), ("per clip: top-1, 95% interval", f"{low:.2%} - {high:.2%}"),
            *top5]


def _clips_section(metrics: dict) -> list[str]:
    """The report's section on the video clips the images were frames of, where they were."""
    if "clips" not in metrics:
        return []
    clips = metrics["clips"]
    wrong = clips["answered_wrong"]
    return [f"<h2>Per clip</h2><p class='note'>The images are frames of {clips['clips']:,} video clips (named as "
            f"<code>residual unpack</code> names them). Each clip is answered as a video is classified: by the mean "
            f"of its frames' probabilities. Top-1 over the clips is {clips['top1']:.2%}; every clip is in "
            f"clips.csv. The clips answered wrong, the surest first:</p>",
            _table(["clip", "true", "predicted", "probability", "frames"],
                   [[row["clip"], row["true"], row["predicted"], f"{row['probability']:.3f}", row["frames"]]
                    for row in wrong]) if wrong else "<p>None.</p>"]


def _unknown_section(metrics: dict, pictures: dict[str, Path]) -> list[str]:
    """The report's section on telling unknown images (of none of the classes) from known ones."""
    if "unknown" not in metrics:
        return []
    unknown = metrics["unknown"]
    score = "top-1" if "labelled" not in unknown else "exact match"
    share = lambda value: "-" if value is None else f"{value:.2%}"  # noqa: E731
    flag = "" if "labelled" in unknown else " (predict and serve: --min-confidence)"  # single-label models' floor
    rows = [[name, "-", "-", "-", f"not measured: {detection['skipped']}"] if "skipped" in detection else
            [name, "-" if detection["roc_auc"] is None else f"{detection['roc_auc']:.4f}", f"{detection['floor']:.4f}",
             f"{detection['at_floor']['coverage']:.1%}", f"{detection['at_floor']['unknown_passed']:.1%}"]
            for name, detection in unknown_scores(unknown)]
    return [
        f"<h2>Unknown images</h2><p class='note'>{unknown['unknown_images']:,} images of none of the model's "
        f"classes ({html.escape(unknown['folder'])}) beside the {unknown['known_images']:,} evaluated, told apart "
        f"by two scores: the probability of the most likely class (Hendrycks &amp; Gimpel 2017) and the cosine "
        f"similarity of the image's pooled features to the nearest training image's (Sun et al. 2022). Each "
        f"score's floor keeps {unknown['keep_known']:.0%} of the known images; the share of unknown images above it "
        f"is what it lets through. Among the known images the probability's floor of {unknown['floor']:.4f}{flag} "
        f"keeps, {score} is {share(unknown['at_floor']['accuracy'])}"
        + (f"; without a floor the model gives {unknown['labelled']:.1%} of the unknown images a label"
           if "labelled" in unknown else "") + "."
        + ("" if "skipped" in unknown["nearest"] else " The similarity's training features and floor are in "
           "feature_bank.safetensors beside this report (predict and serve: --feature-bank).") + "</p>",
        _table(["score", "ROC AUC", "floor", "known images kept", "unknown images let through"], rows),
        f"<img src='{_png(pictures['unknown'])}' alt='scores of known and unknown images'>",
        "<h3>Accepting only sure predictions</h3>",
        _table(["probability at least", "known images kept", f"their {score}", "unknown images let through"],
               [[f"{row['threshold']:g}", f"{row['coverage']:.1%}", share(row["accuracy"]),
                 f"{row['unknown_passed']:.1%}"] for row in unknown["thresholds"]])]


def _write_gallery_and_metrics(out: Path, paths: dict[str, Path], metrics: dict, info: dict,
                               gallery: list[GalleryItem], failed: list[str]) -> None:
    """highest_loss.png (when there is a gallery, added to `paths`) and metrics.json: every number, what was
    evaluated, the gallery's images and the unreadable files."""
    if gallery:
        paths["highest_loss"] = out / "highest_loss.png"
        plot_gallery(gallery, paths["highest_loss"])
    document = {**info, **metrics, "highest_loss": [item.summary() for item in gallery], "unreadable": failed}
    write_json(paths["metrics"], document)


def write_multi_label_predictions(path: Path, sources: list[str], targets: np.ndarray, probs: np.ndarray,
                                  class_names: list[str], threshold: float | np.ndarray) -> Path:
    """predictions.csv of a multi-label model: per image its true and predicted classes (space-separated, as a
    multi-label CSV lists them), its loss, whether every label is right, and each class's probability."""
    targets = np.asarray(targets, dtype=bool)
    predicted = probs >= threshold
    losses = label_losses(probs, targets)
    joined = lambda row: " ".join(name for name, on in zip(class_names, row) if on)  # noqa: E731
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "true", "predicted", "loss", "exact", *class_names])
        writer.writerows([source, joined(true), joined(guess), f"{loss:.6f}", int((true == guess).all()),
                          *(f"{p:.6f}" for p in row)]
                         for source, true, guess, loss, row in zip(sources, targets, predicted, losses, probs))
    return path


def write_multi_label_report(out_dir: str | Path, title: str, metrics: dict, info: dict, gallery: list[GalleryItem],
                             failed: list[str], pr: dict[str, tuple[np.ndarray, np.ndarray, float]],
                             score_groups: dict[str, tuple[dict[str, np.ndarray], float]] | None = None
                             ) -> dict[str, Path]:
    """A multi-label model's metrics.json, pictures (reliability, precision-recall curves, highest-loss images)
    and report.html in `out_dir`; returns their paths. `pr`: the curves to draw (metrics.hardest_pr_curves);
    `score_groups` as for write_report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "reliability": out / "reliability.png", "report": out / "report.html"}
    plot_reliability(metrics["calibration"], metrics["ece"], paths["reliability"], "reliability of each class's "
                     "probability", measured="share present", confidence="probability of the class")
    if pr:
        paths["pr"] = out / "pr_curves.png"
        plot_pr_curves(pr, sum(row["average_precision"] is not None for row in metrics["per_class"]), paths["pr"])
    _plot_unknown(out, paths, metrics, score_groups)
    _write_gallery_and_metrics(out, paths, metrics, info, gallery, failed)
    write_multi_label_html(paths["report"], title, metrics, info, paths, gallery, failed)
    return paths
