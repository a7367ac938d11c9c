"""Temperature scaling's fits against SciPy's bounded scalar minimiser on the same objective (a test dependency,
in the dev extra; skipped where it is missing): random logits of an over- and an under-confident model, the
softmax's negative log-likelihood for one temperature, each class's binary cross-entropy for multi-label."""

import numpy as np
import pytest

from residual.calibrate import CLASS_TEMPERATURE_BOUND, fit_class_temperatures, fit_temperature

optimize = pytest.importorskip("scipy.optimize")
special = pytest.importorskip("scipy.special")


@pytest.mark.parametrize("sharpness", [0.3, 3.0])  # too sure (T > 1 fits) and not sure enough (T < 1)
def test_the_temperature_is_the_one_scipy_finds(sharpness):
    rng = np.random.default_rng(int(sharpness * 10))
    labels = rng.integers(0, 6, 500)
    logits = (rng.normal(size=(500, 6)) + 2 * np.eye(6)[labels]) / sharpness
    nll = lambda log_t: -special.log_softmax(logits / np.exp(log_t), axis=1)[np.arange(500), labels].mean()  # noqa
    expected = np.exp(optimize.minimize_scalar(nll, bounds=(-5, 5), method="bounded",
                                               options={"xatol": 1e-9}).x)
    assert fit_temperature(special.log_softmax(logits, axis=1), labels) == pytest.approx(expected, rel=1e-4)
    assert (expected > 1) == (sharpness < 1)


def test_each_class_temperature_is_the_one_scipy_finds():
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 4)) < 0.3).astype(int)
    logits = (rng.normal(size=targets.shape) + 2 * (2 * targets - 1)) * np.array([0.3, 1.0, 3.0, 1.0])
    logits[:, 3] = rng.normal(size=400) * 5  # a class the model knows nothing of: T goes to the upper bound
    bound = np.log(CLASS_TEMPERATURE_BOUND)
    fitted = fit_class_temperatures(logits, targets)
    for c in range(4):
        def bce(log_t):
            z = logits[:, c] / np.exp(log_t)
            return np.mean(np.logaddexp(0, z) - targets[:, c] * z)
        expected = np.exp(optimize.minimize_scalar(bce, bounds=(-bound, bound), method="bounded",
                                                   options={"xatol": 1e-9}).x)
        assert fitted[c] == pytest.approx(expected, rel=1e-3), c
