"""Classification metrics from predicted probabilities and true labels (NumPy only).

Conventions, as scikit-learn's: precision, recall and F1 are 0 where undefined
(no predictions, or no support); the macro average is over the classes that
occur in the labels or the predictions; the weighted average weighs by support.
Expected calibration error uses equal-width confidence bins (Guo et al. 2017). ROC AUC and
average precision are per class, one against the rest, as scikit-learn's roc_auc_score
and average_precision_score compute them (ties in the scores count half), and undefined
(None) for a class that is absent from the labels or is all of them.

How sure a top-1 is: its Wilson score interval (as statsmodels' proportion_confint with
method="wilson"); whether two models' top-1 on the same images differ by more than chance:
McNemar's exact test on the images only one of them gets right (statsmodels' mcnemar with
exact=True).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


CONFIDENCE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)  # where eval reports the accuracy of the predictions kept
KNOWN_KEPT = 0.95  # the share of known images the suggested confidence floor keeps (FPR at 95% TPR's point)
SCORE_NAMES = {"top1": "top-1", "map": "mAP"}  # what a model is judged by: its top-1, or a multi-label model's mAP
SIGNIFICANCE = 0.05  # a gap in top-1 whose McNemar p-value is below this is called more than chance


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(1)
    predicted = matrix.sum(0)
    precision = _ratio(true_positives, predicted)
    recall = _ratio(true_positives, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def shows_top5(num_classes: int) -> bool:
    """Whether top-5 is worth printing: with five classes or fewer every label is in the top five (100%)."""
    return num_classes > 5


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(1).mean())


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict]:
    """Per equal-width bin of confidence: its range, count, mean confidence and accuracy."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lower, upper]; a confidence of exactly 0 goes to the first.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "confidence": float(confidence[members].mean()) if count else 0.0,
                     "accuracy": float(correct[members].mean()) if count else 0.0})
    return rows


def selective_accuracy(confidence: np.ndarray, correct: np.ndarray,
                       thresholds: tuple[float, ...] = CONFIDENCE_THRESHOLDS) -> list[dict]:
    """Accepting only predictions whose probability reaches each threshold: the share of images kept
    (coverage) and the top-1 among them (None when none is kept)."""
    rows = []
    for threshold in thresholds:
        kept = confidence >= threshold
        rows.append({"threshold": threshold, "coverage": float(kept.mean()),
                     "accuracy": float(correct[kept].mean()) if kept.any() else None})
    return rows


def unknown_detection(known_confidence: np.ndarray, known_correct: np.ndarray, unknown_confidence: np.ndarray,
                      keep_known: float = KNOWN_KEPT, thresholds: tuple[float, ...] = CONFIDENCE_THRESHOLDS) -> dict:
    """How well a floor on the answer's probability tells images of none of the model's classes (unknown)
    from the images of its classes (known), as Hendrycks & Gimpel's maximum-softmax-probability baseline
    measures it: the ROC AUC of ranking known above unknown by confidence, the floor that keeps `keep_known`
    of the known images (at least that share) and the share of unknown images it still lets through (the
    false positive rate at that true positive rate), and per threshold what it keeps of each."""
    known_confidence = np.asarray(known_confidence, dtype=np.float64)
    unknown_confidence = np.asarray(unknown_confidence, dtype=np.float64)
    auc, _ = ranking_scores(np.concatenate([known_confidence, unknown_confidence]),
                            np.arange(len(known_confidence) + len(unknown_confidence)) < len(known_confidence))
    # The k-th highest known confidence keeps ceil(keep_known x known) images; rounded down to the 4 decimals
    # it is shown with, so that the floor a user copies keeps them too.
    kth = np.sort(known_confidence)[::-1][math.ceil(keep_known * len(known_confidence)) - 1]
    floor = math.floor(kth * 10_000) / 10_000
    rows = [{**row, "unknown_passed": float((unknown_confidence >= row["threshold"]).mean())}
            for row in selective_accuracy(known_confidence, known_correct, (*thresholds, floor))]
    at_floor = rows.pop()
    return {"known_images": int(len(known_confidence)), "unknown_images": int(len(unknown_confidence)),
            "roc_auc": auc, "keep_known": keep_known, "floor": floor, "at_floor": at_floor, "thresholds": rows}


def expected_calibration_error(rows: list[dict]) -> float:
    total = sum(row["count"] for row in rows)
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows) / max(total, 1)


def threshold_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, images called positive) with each distinct score as the threshold, highest first."""
    order = np.argsort(-scores, kind="stable")
    ends = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]  # the last image of each distinct score
    return np.cumsum(positive[order])[ends], ends + 1


def _rates(true_positives: np.ndarray, called: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """threshold_counts as (false positive rate, true positive rate), from (0, 0)."""
    false_positives = called - true_positives
    return (np.r_[0.0, false_positives / max(false_positives[-1], 1)],
            np.r_[0.0, true_positives / max(true_positives[-1], 1)])


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) with each distinct score as the threshold, from (0, 0)."""
    return _rates(*threshold_counts(scores, positive))


def ranking_scores(scores: np.ndarray, positive: np.ndarray) -> tuple[float | None, float | None]:
    """(ROC AUC, average precision) of ranking the `positive` images first by `scores`; (None, None) without
    both positives and negatives.

    AUC is the area under the ROC curve, straight lines between thresholds: the chance that a random positive
    scores above a random negative, a tie counting half. AP is the precision with each distinct score as the
    threshold, weighted by the recall it adds.
    """
    if not positive.any() or positive.all():
        return None, None
    true_positives, called = threshold_counts(scores, positive)  # one sort for both
    false_positive_rate, recall = _rates(true_positives, called)
    auc = np.sum(np.diff(false_positive_rate) * (recall[1:] + recall[:-1]) / 2)
    return float(auc), float(np.sum(np.diff(recall) * true_positives / called))


def hardest_roc_curves(probs: np.ndarray, labels: np.ndarray, per_class: list[dict],
                       limit: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """class name -> (false positive rates, true positive rates, AUC) of the `limit` classes with the lowest
    ROC AUC (`per_class`: classification_metrics' rows), lowest first: the classes hardest to tell apart."""
    ranked = sorted((row["roc_auc"], c) for c, row in enumerate(per_class) if row["roc_auc"] is not None)
    return {per_class[c]["class"]: (*roc_curve(probs[:, c], labels == c), auc) for auc, c in ranked[:limit]}


def most_confused(matrix: np.ndarray, class_names: list[str], limit: int = 10) -> list[dict]:
    """The largest off-diagonal cells: which true class is most often taken for which other."""
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:limit]
    pairs = []
    for flat in order:
        true, predicted = divmod(int(flat), matrix.shape[1])
        if off_diagonal[true, predicted] == 0:
            break
        pairs.append({"true": class_names[true], "predicted": class_names[predicted],
                      "count": int(matrix[true, predicted]),
                      "share_of_true": float(matrix[true, predicted] / matrix[true].sum())})
    return pairs


def mean_average_precision(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """mAP: each class's average precision (images ranked by its probability), averaged over the classes
    that have both positive and negative images; None when none has."""
    targets = np.asarray(targets, dtype=bool)
    return mean_where_defined([ranking_scores(probs[:, c], targets[:, c])[1] for c in range(probs.shape[1])])


def mean_where_defined(values: list[float | None], weights: np.ndarray | None = None) -> float | None:
    """The mean (weighted by `weights`) of the values that are not None; None when none is."""
    kept = [index for index, value in enumerate(values) if value is not None]
    if not kept:
        return None
    return float(np.average([values[index] for index in kept], weights=None if weights is None else weights[kept]))


def image_losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's cross-entropy: minus the log of its true class's probability (clipped at 1e-12)."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: where the true rate lies at `confidence`, given
    `successes` of `trials`. Unlike p +- z*se it stays inside [0, 1] and is not empty at 0% or 100%."""
    if trials == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    rate, spread = successes / trials, z * z / trials
    centre = (rate + spread / 2) / (1 + spread)
    half = z * math.sqrt(rate * (1 - rate) / trials + spread / (4 * trials)) / (1 + spread)
    # At 0% and 100% the bound is exactly 0 or 1; computed, it is off by a rounding error.
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == trials else centre + half)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """McNemar's exact test, two-sided: the chance of a split at least this uneven of the images only one
    of two models gets right, were both equally good (each such image then a fair coin's toss)."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    fewer = min(only_first, only_second)
    # The binomial tail in logarithms: 0.5 ** n underflows for the thousands of images a large test set splits.
    terms = [math.lgamma(discordant + 1) - math.lgamma(k + 1) - math.lgamma(discordant - k + 1)
             - discordant * math.log(2) for k in range(fewer + 1)]
    top = max(terms)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(term - top) for term in terms))


def paired_comparison(first_correct: np.ndarray, second_correct: np.ndarray) -> dict:
    """Two models' answers on the same images (True where right): how many only each got right, and
    McNemar's p-value for a difference that large arising by chance."""
    first_correct, second_correct = np.asarray(first_correct, bool), np.asarray(second_correct, bool)
    only_first = int((first_correct & ~second_correct).sum())
    only_second = int((second_correct & ~first_correct).sum())
    return {"images": int(len(first_correct)), "only_first": only_first, "only_second": only_second,
            "p_value": mcnemar_exact(only_first, only_second)}


BOOTSTRAP_RESAMPLES = 1000  # the percentile interval's 2.5% tail then rests on 25 resamples


def bootstrap_indices(images: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """resamples x images indices, each row the images drawn with replacement: one seeded set, so every model
    scored on the same images is resampled alike (a paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, images, size=(resamples, images))


def bootstrap_maps(probs: np.ndarray, targets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """mAP on each resample of the images (rows of `indices`); 0 where no class has both kinds of image."""
    return np.array([mean_average_precision(probs[rows], targets[rows]) or 0.0 for rows in indices])


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The bootstrap percentile interval: where the middle `confidence` of the resampled values lie."""
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(replicates, tail)), float(np.percentile(replicates, 100 - tail))


def paired_bootstrap(first: np.ndarray, second: np.ndarray) -> dict:
    """Two models' scores on the same resamples of the same images: the first's lead with its 95% interval,
    and a two-sided p-value, twice the share of resamples on the far side of zero (at least one resample's
    worth: 1,000 resamples cannot tell p below 0.002)."""
    difference = np.asarray(first) - np.asarray(second)
    far_side = min((difference <= 0).mean(), (difference >= 0).mean())
    floor = 2 / len(difference)  # the p-value when no resample falls on the far side
    return {"difference_ci95": list(percentile_interval(difference)),
            "p_value": float(min(1.0, max(2 * far_side, floor))), "p_value_floor": floor}


def p_value_text(comparison: dict, digits: int = 3) -> str:
    """A comparison's p-value as text: "0.04", or "<= 0.002" where a bootstrap could show no smaller."""
    p_value = comparison["p_value"]
    at_floor = p_value <= comparison.get("p_value_floor", 0.0)
    return f"{'<= ' if at_floor else ''}{p_value:.{digits}g}"


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str], bins: int = 15) -> dict:
    """Everything `residual eval` reports, as plain JSON-ready values.

    probs: N x C probabilities; labels: N true class indices.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = probs.shape[1]
    predicted = probs.argmax(1)
    matrix = confusion_matrix(labels, predicted, num_classes)
    scores = per_class_scores(matrix)
    present = (scores["support"] > 0) | (scores["predicted"] > 0)
    support = scores["support"]
    average = lambda name, weights: float(np.average(scores[name][present], weights=weights))  # noqa: E731
    confidence = probs.max(1)
    rows = calibration_bins(confidence, predicted == labels, bins)
    ranked = [ranking_scores(probs[:, c], labels == c) for c in range(num_classes)]
    ranking = {"roc_auc": [auc for auc, _ in ranked], "average_precision": [ap for _, ap in ranked]}
    return {
        "images": int(len(labels)),
        "top1": float((predicted == labels).mean()),
        "top1_ci95": list(wilson_interval(int((predicted == labels).sum()), len(labels))),
        "top5": topk_accuracy(probs, labels, 5),
        "loss": float(image_losses(probs, labels).mean()),
        "ece": expected_calibration_error(rows),
        "macro": {**{name: average(name, None) for name in ("precision", "recall", "f1")},
                  **{name: mean_where_defined(values) for name, values in ranking.items()}},
        "weighted": {**{name: average(name, support[present]) for name in ("precision", "recall", "f1")},
                     **{name: mean_where_defined(values, support) for name, values in ranking.items()}},
        "per_class": [{"class": class_names[c], "precision": float(scores["precision"][c]),
                       "recall": float(scores["recall"][c]), "f1": float(scores["f1"][c]), "support": int(support[c]),
                       "roc_auc": ranking["roc_auc"][c], "average_precision": ranking["average_precision"][c]}
                      for c in range(num_classes)],
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, class_names),
        "calibration": rows,
        "selective": selective_accuracy(confidence, predicted == labels),
    }


# --- multi-label ---------------------------------------------------------------------------------

def label_losses(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each image's binary cross-entropy summed over the classes (a multi-label model's training loss),
    probabilities clipped at 1e-12 from 0 and 1."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    targets = np.asarray(targets, dtype=bool)
    return -np.where(targets, np.log(probs), np.log1p(-probs)).sum(1)


def multi_label_metrics(probs: np.ndarray, targets: np.ndarray, class_names: list[str],
                        threshold: float | list[float] = 0.5, bins: int = 15) -> dict:
    """Everything `residual eval` reports of a multi-label model, as plain JSON-ready values.

    probs: N x C probabilities, each class's own; targets: N x C, 1 where the image has the class. A class is
    predicted where its probability reaches `threshold` (one for every class, or one per class). Mean average
    precision (mAP, the ranking of the images by each class's probability, averaged over the classes that have
    both positives and negatives) does not depend on the threshold; precision, recall and F1 do:
    micro-averaged over every (image, class) decision, and macro-averaged over the classes that occur in the
    targets or the predictions. Exact match is the share of images whose every label is right; calibration
    bins every (image, class) probability.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (probs.shape[1],))
    predicted = probs >= thresholds
    true_positives = (predicted & targets).sum(0).astype(np.float64)
    support, called = targets.sum(0), predicted.sum(0)
    precision, recall = _ratio(true_positives, called), _ratio(true_positives, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (called > 0)
    ranked = [ranking_scores(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
    average_precision = [ap for _, ap in ranked]
    micro_precision = float(true_positives.sum() / max(called.sum(), 1))
    micro_recall = float(true_positives.sum() / max(support.sum(), 1))
    exact = (predicted == targets).all(1)
    rows = calibration_bins(probs.ravel(), targets.ravel(), bins)
    macro = lambda values: float(values[present].mean()) if present.any() else 0.0  # noqa: E731
    return {
        "images": int(len(probs)),
        "thresholds": thresholds.tolist(),
        "map": mean_where_defined(average_precision),
        "exact_match": float(exact.mean()),
        "exact_match_ci95": list(wilson_interval(int(exact.sum()), len(exact))),
        "hamming_loss": float((predicted != targets).mean()),
        "loss": float(label_losses(probs, targets).mean()),
        "ece": expected_calibration_error(rows),
        "labels_per_image": {"true": float(targets.sum(1).mean()), "predicted": float(predicted.sum(1).mean())},
        "micro": {"precision": micro_precision, "recall": micro_recall,
                  "f1": 2 * micro_precision * micro_recall / (micro_precision + micro_recall)
                  if micro_precision + micro_recall else 0.0},
        "macro": {"precision": macro(precision), "recall": macro(recall), "f1": macro(f1),
                  "roc_auc": mean_where_defined([auc for auc, _ in ranked])},
        "per_class": [{"class": class_names[c], "average_precision": average_precision[c],
                       "roc_auc": ranked[c][0], "precision": float(precision[c]), "recall": float(recall[c]),
                       "f1": float(f1[c]), "support": int(support[c]), "predicted": int(called[c]),
                       "threshold": float(thresholds[c])}
                      for c in range(probs.shape[1])],
        "calibration": rows,
    }


def hardest_pr_curves(probs: np.ndarray, targets: np.ndarray, per_class: list[dict],
                      limit: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """class name -> (recall, precision, average precision) of the `limit` classes with the lowest average
    precision (`per_class`: multi_label_metrics' rows), lowest first."""
    ranked = sorted((row["average_precision"], c) for c, row in enumerate(per_class)
                    if row["average_precision"] is not None)
    curves = {}
    for ap, c in ranked[:limit]:
        true_positives, called = threshold_counts(probs[:, c], np.asarray(targets[:, c], dtype=bool))
        curves[per_class[c]["class"]] = (true_positives / true_positives[-1], true_positives / called, ap)
    return curves
