"""Our label-error suspects against cleanlab's confident-learning filter (a test dependency, in the dev extra; the
package never imports it, and the test is skipped where it is missing). Random out-of-fold probabilities of weak
to strong models, to two or six decimals: single-label, ours must flag exactly the images cleanlab's
find_label_issues(filter_by="confident_learning") flags; multi-label, exactly the (image, class) answers its
find_multilabel_issues_per_class flags."""

import numpy as np
import pytest

from residual.label_errors import label_suspects, suspects

cleanlab_filter = pytest.importorskip("cleanlab.filter")
cleanlab_multi_label = pytest.importorskip("cleanlab.multilabel_classification.filter")

SHARPNESS = (0.3, 1.0, 3.0, 10.0)  # how far the labels move the logits: a weak model to a strong one


@pytest.mark.parametrize("seed", range(40))
def test_single_label_suspects_are_the_images_cleanlab_flags(seed):
    rng = np.random.default_rng(seed)
    images, classes = int(rng.integers(20, 400)), int(rng.integers(2, 8))
    labels = rng.integers(0, classes, images)
    labels[:classes] = np.arange(classes)  # every class has an image
    logits = rng.normal(size=(images, classes)) + SHARPNESS[seed % 4] * 2 * np.eye(classes)[labels] * rng.random(
        (images, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, (2, 6)[seed % 2])
    probs = probs / probs.sum(1, keepdims=True)
    flagged = cleanlab_filter.find_label_issues(labels, probs, filter_by="confident_learning")
    assert sorted(image for image, _ in suspects(probs, labels)) == list(np.flatnonzero(flagged))


@pytest.mark.parametrize("seed", range(20))
def test_multi_label_answers_put_off_are_the_ones_cleanlab_flags(seed):
    rng = np.random.default_rng(seed)
    images, classes = int(rng.integers(30, 400)), int(rng.integers(2, 8))
    targets = (rng.random((images, classes)) < rng.uniform(0.1, 0.6)).astype(int)
    targets[0], targets[1] = 1, 0  # every class present somewhere and absent somewhere
    logits = rng.normal(size=targets.shape) + SHARPNESS[seed % 4] * (2 * targets - 1) * rng.random((images, 1))
    probs = np.round(1 / (1 + np.exp(-logits)), (2, 6)[seed % 2])
    expected = np.array(cleanlab_multi_label.find_multilabel_issues_per_class(
        [list(np.flatnonzero(row)) for row in targets], probs, filter_by="confident_learning"))
    ours = np.zeros(targets.shape, dtype=bool)
    for image, flagged in label_suspects(probs, targets):
        ours[image] = flagged
    assert expected.shape == targets.shape and np.array_equal(ours, expected)
