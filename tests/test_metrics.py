"""Metrics against numbers worked out by hand on a six-image, three-class fixture."""

import math

import numpy as np
import pytest

from residual.metrics import (bootstrap_indices, bootstrap_maps, calibration_bins, classification_metrics,
                              confusion_matrix, mcnemar_exact, multi_label_metrics, p_value_text, paired_bootstrap,
                              paired_comparison, percentile_interval, ranking_scores, roc_curve, topk_accuracy,
                              unknown_detection, wilson_interval)

NAMES = ["a", "b", "c"]
# image: probabilities of a, b, c        true  predicted  confidence  correct
PROBS = np.array([
    [0.70, 0.20, 0.10],  # 0: a          a     a          0.70        yes
    [0.10, 0.60, 0.30],  # 1: a          a     b          0.60        no
    [0.20, 0.50, 0.30],  # 2: b          b     b          0.50        yes
    [0.25, 0.35, 0.40],  # 3: b          b     c          0.40        no
    [0.10, 0.10, 0.80],  # 4: c          c     c          0.80        yes
    [0.04, 0.90, 0.06],  # 5: c          c     b          0.90        no
])
LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_confusion_matrix_rows_are_true_classes():
    assert confusion_matrix(LABELS, PROBS.argmax(1), 3).tolist() == [[1, 1, 0], [0, 1, 1], [0, 1, 1]]


def test_hand_computed_metrics():
    m = classification_metrics(PROBS, LABELS, NAMES, bins=5)
    assert m["images"] == 6
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top5"] == 1.0  # three classes: the true one is always in the top five
    assert topk_accuracy(PROBS, LABELS, 2) == pytest.approx(5 / 6)  # only image 1 misses its top two
    p_true = [0.70, 0.10, 0.50, 0.35, 0.80, 0.06]
    assert m["loss"] == pytest.approx(-sum(math.log(p) for p in p_true) / 6)
    # precision = TP / predicted: a 1/1, b 1/3, c 1/2; recall = TP / support: 1/2 each.
    per_class = {r["class"]: r for r in m["per_class"]}
    assert [per_class[c]["precision"] for c in NAMES] == pytest.approx([1.0, 1 / 3, 1 / 2])
    assert [per_class[c]["recall"] for c in NAMES] == pytest.approx([0.5, 0.5, 0.5])
    # F1 = 2PR / (P + R): a 2/3, b (1/3)/(5/6) = 0.4, c 0.5.
    assert [per_class[c]["f1"] for c in NAMES] == pytest.approx([2 / 3, 0.4, 0.5])
    assert [per_class[c]["support"] for c in NAMES] == [2, 2, 2]
    assert m["macro"]["precision"] == pytest.approx(11 / 18)
    assert m["macro"]["f1"] == pytest.approx((2 / 3 + 0.4 + 0.5) / 3)
    assert m["weighted"]["f1"] == pytest.approx(m["macro"]["f1"])  # equal supports
    # Bins of width 0.2, (lower, upper]: (.2,.4] holds 0.4 (wrong): gap 0.4; (.4,.6] holds 0.5 (right)
    # and 0.6 (wrong): accuracy .5, confidence .55; (.6,.8] holds 0.7 and 0.8 (both right): gap .25;
    # (.8,1] holds 0.9 (wrong): gap .9. ECE = (0.4 + 2 * 0.05 + 2 * 0.25 + 0.9) / 6.
    assert m["ece"] == pytest.approx(1.9 / 6)
    assert [r["count"] for r in m["calibration"]] == [0, 1, 2, 2, 1]
    # Kept at 0.5: 0.7, 0.6, 0.5, 0.8, 0.9, of which 0.7, 0.5 and 0.8 are right; at 0.8: 0.8 (right) and 0.9;
    # at 0.9: 0.9 (wrong); nothing reaches 0.95.
    kept = [(r["threshold"], r["coverage"], r["accuracy"]) for r in m["selective"]]
    assert kept[:3] == pytest.approx([(0.5, 5 / 6, 3 / 5), (0.8, 2 / 6, 1 / 2), (0.9, 1 / 6, 0.0)])
    assert kept[3:] == [(0.95, 0.0, None), (0.99, 0.0, None)]
    assert [(p["true"], p["predicted"], p["count"]) for p in m["most_confused"]] == [
        ("a", "b", 1), ("b", "c", 1), ("c", "b", 1)]
    assert m["most_confused"][0]["share_of_true"] == 0.5
    # ROC AUC, each class against the rest: the share of (positive, negative) pairs the class's probability
    # orders right, a tie counting half. a: 0.70 beats all four negatives; 0.10 beats 0.04, ties 0.10 and
    # loses to 0.20 and 0.25: 5.5 / 8. b: 0.50 and 0.35 each beat 0.20 and 0.10 only: 4 / 8. c: 0.80 beats
    # all four, 0.06 none: 4 / 8.
    assert [per_class[c]["roc_auc"] for c in NAMES] == pytest.approx([5.5 / 8, 0.5, 0.5])
    assert m["macro"]["roc_auc"] == pytest.approx((5.5 / 8 + 1) / 3) == m["weighted"]["roc_auc"]
    # Average precision of a: thresholds 0.70 (precision 1, recall 1/2), 0.25, 0.20 (no recall added),
    # 0.10 (2 of the 5 called are a, recall 1): 1/2 * 1 + 1/2 * 2/5.
    assert per_class["a"]["average_precision"] == pytest.approx(0.7)


def test_roc_auc_and_average_precision_agree_with_their_definitions():
    scores, positive = np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])
    assert ranking_scores(scores, positive) == pytest.approx((0.75, 5 / 6))  # scikit-learn's documented example
    assert roc_curve(scores, positive)[1].tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]  # true positive rate
    rng = np.random.default_rng(0)
    scores, positive = rng.integers(0, 5, 200) / 4, rng.random(200) < 0.3  # many ties
    pairs = scores[positive][:, None] - scores[~positive][None, :]
    assert ranking_scores(scores, positive)[0] == pytest.approx(((pairs > 0) + 0.5 * (pairs == 0)).mean())
    assert ranking_scores(scores, np.ones(200, bool)) == ranking_scores(scores, np.zeros(200, bool)) == (None, None)


def test_weighted_average_weighs_by_support_and_absent_classes_do_not_count():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0]])
    labels = np.array([0, 0, 0, 0])  # class b is predicted once but has no support; c never appears
    m = classification_metrics(probs, labels, NAMES)
    # a: P 3/3, R 3/4, F1 6/7; b: P 0, R 0 (no support), F1 0; c: absent from labels and predictions.
    assert m["macro"]["f1"] == pytest.approx((6 / 7 + 0) / 2)
    assert m["weighted"]["f1"] == pytest.approx(6 / 7)
    assert m["per_class"][2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0,
                                 "roc_auc": None, "average_precision": None}
    # Every image is a's: no class has both positives and negatives to rank.
    assert m["macro"]["roc_auc"] is None and m["weighted"]["average_precision"] is None


def test_calibration_bin_edges_are_right_closed():
    rows = calibration_bins(np.array([0.0, 0.2, 0.2001, 1.0]), np.array([1, 1, 0, 1]), bins=5)
    assert [r["count"] for r in rows] == [2, 1, 0, 0, 1]


def test_the_wilson_interval_of_a_top1():
    # statsmodels.stats.proportion.proportion_confint(95, 100, method="wilson") = (0.888250, 0.978456); at 0 of
    # 10 it is (0, 0.277533): not the empty interval p +- z*se would give.
    assert wilson_interval(95, 100) == pytest.approx((0.888250, 0.978456), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6) and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    # By hand: z = 1.959964, p = 3/6: centre 0.5, half-width z * sqrt(1/24 + z^2/144) / (1 + z^2/6).
    z = 1.959964
    half = z * math.sqrt(0.25 / 6 + z * z / 144) / (1 + z * z / 6)
    assert classification_metrics(PROBS, LABELS, NAMES)["top1_ci95"] == pytest.approx([0.5 - half, 0.5 + half])


def test_mcnemars_exact_test_is_the_binomial_tail_of_the_images_only_one_model_gets_right():
    # 10 against 2: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096) and mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # Thousands of images, where 0.5 ** n underflows a float: against exact integer arithmetic. Each binomial
    # coefficient from the one before (C(n, k+1) = C(n, k) (n - k) / (k + 1)): math.comb afresh for each k took 8 s.
    coefficient, tail = 1, 0
    for k in range(5001):
        tail += coefficient
        coefficient = coefficient * (10300 - k) // (k + 1)
    exact = 2 * tail / 2 ** 10300
    assert mcnemar_exact(5000, 5300) == pytest.approx(exact, rel=1e-9) and 0.003 < exact < 0.004
    first = np.array([1, 1, 1, 0, 0, 1], bool)
    second = np.array([1, 0, 0, 0, 1, 1], bool)
    assert paired_comparison(first, second) == {"images": 6, "only_first": 2, "only_second": 1,
                                                "p_value": pytest.approx(1.0)}


def test_a_paired_bootstrap_of_map_tells_a_real_gap_from_none():
    rng = np.random.default_rng(0)
    targets = rng.random((300, 4)) < 0.3
    sharp = np.where(targets, 0.6, 0.4) + 0.35 * rng.random((300, 4))  # ranks nearly every image right
    vague = rng.random((300, 4))  # ranks them by chance
    indices = bootstrap_indices(300, resamples=400, seed=1)
    assert indices.shape == (400, 300) and np.array_equal(indices, bootstrap_indices(300, resamples=400, seed=1))
    whole = bootstrap_maps(sharp, targets, np.arange(300)[None])
    assert whole[0] == pytest.approx(multi_label_metrics(sharp, targets, list("abcd"))["map"])
    sharp_maps, vague_maps = bootstrap_maps(sharp, targets, indices), bootstrap_maps(vague, targets, indices)
    low, high = percentile_interval(sharp_maps)
    assert low < whole[0] < high and high - low < 0.1
    gap = paired_bootstrap(sharp_maps, vague_maps)
    assert gap["p_value"] == pytest.approx(2 / 400) and gap["difference_ci95"][0] > 0.3  # at most 2 / resamples
    assert p_value_text(gap) == "<= 0.005" and p_value_text({"p_value": 0.04}) == "0.04"  # said as a bound
    same = paired_bootstrap(sharp_maps, sharp_maps)
    assert same["p_value"] == 1.0 and same["difference_ci95"] == [0.0, 0.0] and p_value_text(same) == "1"


def test_unknown_detection_by_hand():
    # The fixture's six images are the known ones (confidence 0.7 .6 .5 .4 .8 .9; right: the 1st, 3rd, 5th);
    # four unknown images. Keeping 95% of six known images keeps all six: the floor is the lowest, 0.4.
    known, right = PROBS.max(1), PROBS.argmax(1) == LABELS
    unknown = np.array([0.95, 0.45, 0.3, 0.6])
    result = unknown_detection(known, right, unknown, thresholds=(0.5, 0.8))
    assert (result["known_images"], result["unknown_images"], result["floor"]) == (6, 4, 0.4)
    # Pairs (known, unknown) ordered right: 0.7 beats 3 (ties none), 0.6 beats 2 and ties 0.6, 0.5 beats 2,
    # 0.4 beats 1, 0.8 beats 3, 0.9 beats 3: 14 + 0.5 of 24 pairs.
    assert result["roc_auc"] == pytest.approx(14.5 / 24)
    assert result["at_floor"] == pytest.approx({"threshold": 0.4, "coverage": 1.0, "accuracy": 0.5,
                                                "unknown_passed": 0.75})
    assert [(r["threshold"], r["coverage"], r["unknown_passed"]) for r in result["thresholds"]] == pytest.approx(
        [(0.5, 5 / 6, 0.5), (0.8, 2 / 6, 0.25)])
    # Keeping half: the 3rd highest known confidence, 0.7; it keeps 0.7, 0.8, 0.9 (two of them right) and lets
    # one unknown image (0.95) through.
    half = unknown_detection(known, right, unknown, keep_known=0.5)
    assert half["floor"] == 0.7 and half["at_floor"] == pytest.approx(
        {"threshold": 0.7, "coverage": 0.5, "accuracy": 2 / 3, "unknown_passed": 0.25})


def test_unknown_detection_floor_is_rounded_down_to_what_is_shown():
    known = np.array([0.123456789] * 19 + [0.99])
    result = unknown_detection(known, np.ones(20, bool), np.array([0.12345, 0.1235]))
    assert result["floor"] == 0.1234  # 0.1235 would turn every known image but one away
    assert result["at_floor"]["coverage"] == 1.0 and result["at_floor"]["unknown_passed"] == 1.0
    separated = unknown_detection(np.array([0.9, 0.8]), np.ones(2, bool), np.array([0.1, 0.2]))
    assert separated["roc_auc"] == 1.0 and separated["at_floor"]["unknown_passed"] == 0.0


def test_top5_is_shown_only_with_more_than_five_classes(tmp_path):
    from PIL import Image
    from rich.console import Console

    from residual.report import write_html
    from residual.tables import eval_tables

    picture = tmp_path / "picture.png"
    Image.new("RGB", (2, 2)).save(picture)

    def shown(metrics):
        console = Console(record=True, width=200)
        for table in eval_tables(metrics, "val"):
            console.print(table)
        write_html(tmp_path / "report.html", "val", metrics, {}, {"confusion_matrix": picture, "reliability": picture},
                   [], [])
        return "top-5" in console.export_text(), "top-5" in (tmp_path / "report.html").read_text()

    assert shown(classification_metrics(PROBS, LABELS, NAMES)) == (False, False)  # always 100% with three
    six = np.hstack([PROBS, np.zeros((len(LABELS), 3))])
    assert shown(classification_metrics(six, LABELS, [*NAMES, "d", "e", "f"])) == (True, True)
