"""Our metrics against scikit-learn's and SciPy's (test dependencies, in the dev extra; the package never imports
them, and the test is skipped where they are missing). Random single- and multi-label answers, with ties in the
scores (probabilities to two decimals), and a class that no image has or none is predicted as: every number
`residual eval` reports that those libraries also compute must be theirs to rounding."""

import numpy as np
import pytest

from residual.metrics import (calibration_bins, classification_metrics, hardest_pr_curves, mcnemar_exact,
                              multi_label_metrics, roc_curve, unknown_detection, wilson_interval)

sklearn_metrics = pytest.importorskip("sklearn.metrics")
calibration_curve = pytest.importorskip("sklearn.calibration").calibration_curve
stats = pytest.importorskip("scipy.stats")

CLASSES = 7


def single_label_answers(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities to two decimals, labels) of 400 images; the last class is never the label, nor predicted."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES - 1, 400)
    logits = rng.normal(size=(400, CLASSES)) + 2.5 * np.eye(CLASSES)[labels] * rng.random((400, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 2)
    probs[:, -1] = 0.0
    return probs, labels


@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")  # rounded, so they are off by a little
@pytest.mark.parametrize("seed", range(5))
def test_single_label_metrics_are_scikit_learns(seed):
    probs, labels = single_label_answers(seed)
    predicted = probs.argmax(1)  # what ours predicts (the first of tied classes), given to scikit-learn alike
    ours = classification_metrics(probs, labels, [f"c{c}" for c in range(CLASSES)])
    assert np.array_equal(ours["confusion_matrix"], sklearn_metrics.confusion_matrix(labels, predicted,
                                                                                     labels=range(CLASSES)))
    assert ours["top1"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predicted))
    exact = probs + np.random.default_rng(seed).random(probs.shape) * 1e-6  # top-5 without ties to break
    assert classification_metrics(exact, labels, [f"c{c}" for c in range(CLASSES)])["top5"] == pytest.approx(
        sklearn_metrics.top_k_accuracy_score(labels, exact, k=5, labels=range(CLASSES)))
    assert ours["loss"] == pytest.approx(sklearn_metrics.log_loss(labels, np.clip(probs, 1e-12, None),
                                                                  labels=range(CLASSES)), rel=1e-6)
    for average in ("macro", "weighted"):  # over the classes in the labels or the predictions, as ours
        precision, recall, f1, _ = sklearn_metrics.precision_recall_fscore_support(labels, predicted, average=average,
                                                                                  zero_division=0)
        assert [ours[average][name] for name in ("precision", "recall", "f1")] == pytest.approx([precision, recall, f1])
    present = sorted(set(labels))  # ROC AUC and AP are undefined for the class no image has
    for c, row in enumerate(ours["per_class"]):
        if c in present:
            assert row["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(labels == c, probs[:, c]))
            assert row["average_precision"] == pytest.approx(
                sklearn_metrics.average_precision_score(labels == c, probs[:, c]))
        else:
            assert row["roc_auc"] is None and row["average_precision"] is None
    kept = probs[:, present]
    for average in ("macro", "weighted"):
        assert ours[average]["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(
            np.eye(CLASSES)[labels][:, present], kept, average=average))
        assert ours[average]["average_precision"] == pytest.approx(sklearn_metrics.average_precision_score(
            np.eye(CLASSES)[labels][:, present], kept, average=average))
    for c in present:  # the curves report.html draws: every threshold, as scikit-learn's without dropping any
        false_positive_rate, true_positive_rate = roc_curve(probs[:, c], labels == c)
        expected = sklearn_metrics.roc_curve(labels == c, probs[:, c], drop_intermediate=False)
        assert np.allclose(false_positive_rate, expected[0]) and np.allclose(true_positive_rate, expected[1])
    confidence, correct = probs.max(1), predicted == labels
    rows = [row for row in calibration_bins(confidence, correct) if row["count"]]
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15)
    assert [row["accuracy"] for row in rows] == pytest.approx(accuracy)
    assert [row["confidence"] for row in rows] == pytest.approx(mean_confidence)


@pytest.mark.parametrize("seed", range(5))
def test_multi_label_metrics_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    targets = rng.random((300, CLASSES)) < rng.uniform(0.1, 0.5, CLASSES)
    targets[:, -1] = False  # a class no image has
    logits = rng.normal(size=targets.shape) + 2 * (2 * targets - 1) * rng.random((300, 1))
    probs = np.round(1 / (1 + np.exp(-logits)), 2)
    probs[:, -1] = 0.1  # and none is predicted as
    thresholds = rng.uniform(0.3, 0.7, CLASSES)
    ours = multi_label_metrics(probs, targets, [f"c{c}" for c in range(CLASSES)], threshold=list(thresholds))
    predicted = probs >= thresholds
    assert ours["exact_match"] == pytest.approx(sklearn_metrics.accuracy_score(targets, predicted))
    assert ours["hamming_loss"] == pytest.approx(sklearn_metrics.hamming_loss(targets, predicted))
    assert ours["micro"]["f1"] == pytest.approx(sklearn_metrics.f1_score(targets, predicted, average="micro"))
    # The macro average is over the classes in the targets or the predictions; scikit-learn takes every column,
    # so it is given those.
    present = [c for c in range(CLASSES) if targets[:, c].any() or predicted[:, c].any()]
    assert present == list(range(CLASSES - 1))
    for name, score in (("precision", sklearn_metrics.precision_score), ("recall", sklearn_metrics.recall_score),
                        ("f1", sklearn_metrics.f1_score)):
        assert ours["macro"][name] == pytest.approx(score(targets[:, present], predicted[:, present],
                                                          average="macro", zero_division=0))
    assert ours["map"] == pytest.approx(sklearn_metrics.average_precision_score(targets[:, present],
                                                                                probs[:, present], average="macro"))
    assert ours["macro"]["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(targets[:, present],
                                                                                   probs[:, present], average="macro"))
    assert ours["loss"] == pytest.approx(np.mean([sklearn_metrics.log_loss(targets[:, c], probs[:, c], labels=[0, 1])
                                                  for c in range(CLASSES)]) * CLASSES, rel=1e-6)
    curves = hardest_pr_curves(probs, targets, ours["per_class"])
    assert len(curves) == CLASSES - 1  # every class but the one no image has
    for name, (recall, precision, _) in curves.items():
        c = int(name[1:])  # scikit-learn's curve runs from the highest threshold's end, ours from its start
        expected_precision, expected_recall, _ = sklearn_metrics.precision_recall_curve(targets[:, c], probs[:, c])
        assert np.allclose(precision, expected_precision[-2::-1]) and np.allclose(recall, expected_recall[-2::-1])
    rows = [row for row in ours["calibration"] if row["count"]]
    fraction, mean_probability = calibration_curve(targets.ravel(), probs.ravel(), n_bins=15)
    assert [row["accuracy"] for row in rows] == pytest.approx(fraction)
    assert [row["confidence"] for row in rows] == pytest.approx(mean_probability)


def test_the_wilson_interval_and_mcnemars_test_are_scipys():
    for successes, trials in ((0, 10), (3, 10), (10, 10), (512, 1000), (9990, 10000)):
        interval = stats.binomtest(successes, trials).proportion_ci(0.95, method="wilson")
        assert wilson_interval(successes, trials) == pytest.approx((interval.low, interval.high), abs=1e-12)
    for only_first, only_second in ((0, 0), (1, 0), (3, 9), (20, 20), (40, 75), (1200, 1300)):
        discordant = only_first + only_second
        expected = stats.binomtest(only_first, discordant, 0.5).pvalue if discordant else 1.0
        assert mcnemar_exact(only_first, only_second) == pytest.approx(expected, rel=1e-9)


def test_unknown_detection_is_scikit_learns_roc_at_95_percent_true_positives():
    rng = np.random.default_rng(3)
    # Four decimals, as eval shows floors: scikit-learn's thresholds are then ours exactly.
    known = np.round(rng.beta(5, 2, 700), 4)
    unknown = np.round(rng.beta(2, 3, 300), 4)
    ours = unknown_detection(known, rng.random(700) < 0.9, unknown)
    scores, positive = np.concatenate([known, unknown]), np.r_[np.ones(700, bool), np.zeros(300, bool)]
    assert ours["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(positive, scores), abs=1e-12)
    false_positive_rate, true_positive_rate, thresholds = sklearn_metrics.roc_curve(positive, scores)
    first = np.argmax(true_positive_rate >= 0.95)  # the highest threshold that keeps 95% of the known images
    assert ours["floor"] == pytest.approx(thresholds[first])
    assert ours["at_floor"]["unknown_passed"] == pytest.approx(false_positive_rate[first])
    assert ours["at_floor"]["coverage"] == pytest.approx(true_positive_rate[first])
