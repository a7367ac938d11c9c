"""Our perceptual hash against the `imagehash` package's pHash (a test dependency, in the dev extra; the package
never imports it, and the test is skipped where it is missing). The bits must be the same for images that are
not shrunk first (shorter side under 192 px), and within 4 of 64 for larger ones."""

import numpy as np
import pytest
from PIL import Image

from residual.data.fingerprint import fingerprint
from residual.data.shapes import SHAPE_CLASSES, render_shape

imagehash = pytest.importorskip("imagehash")


@pytest.mark.parametrize("side, most_bits", [(40, 0), (120, 0), (250, 4), (640, 4), (1500, 4)])
def test_our_phash_is_imagehashs(side, most_bits):
    rng = np.random.default_rng(side)
    for index in range(10):
        image = render_shape(SHAPE_CLASSES[index], 64, rng)[0].convert("RGB").resize(
            (side * 4 // 3, side), Image.Resampling.BICUBIC)
        theirs = int(str(imagehash.phash(image)), 16)
        assert bin(fingerprint(image).phash ^ theirs).count("1") <= most_bits
