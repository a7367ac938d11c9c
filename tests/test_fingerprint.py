"""Near-identical images: perceptual hashes, the bucketed search for close pairs, and the groups they form."""

import io

import numpy as np
import pytest
from PIL import Image

from residual.data.fingerprint import (MAX_BITS, Fingerprint, connected_groups, fingerprint, hash_distance,
                                       near_duplicate_pairs)


def smooth_picture(rng, side: int = 48) -> Image.Image:
    """A picture of its own: a random 5 x 5 colour field enlarged (like a photo's gradients more than noise)."""
    return Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((side, side),
                                                                                 Image.Resampling.BICUBIC)


def reencoded(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_copies_are_near_and_other_pictures_are_not():
    rng = np.random.default_rng(0)
    pictures = [smooth_picture(rng) for _ in range(40)]
    copies = [reencoded(pictures[0], 60), pictures[1].resize((96, 96), Image.Resampling.BICUBIC),
              pictures[2].resize((36, 36), Image.Resampling.BILINEAR)]
    found = near_duplicate_pairs([fingerprint(image) for image in pictures + copies])
    assert found == [(0, 40), (1, 41), (2, 42)]
    mirrored = pictures[3].transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # an edit, not a copy
    assert near_duplicate_pairs([fingerprint(pictures[3]), fingerprint(mirrored)]) == []


def test_the_thumbnail_rejects_another_colour_with_the_same_layout():
    grey = np.asarray(smooth_picture(np.random.default_rng(1)).convert("L"))
    red = Image.fromarray(np.stack([grey, grey // 4, grey // 4], axis=2))
    blue = Image.fromarray(np.stack([grey // 4, grey // 4, grey], axis=2))
    first, second = fingerprint(red), fingerprint(blue)
    assert hash_distance(np.uint64(first.phash), np.uint64(second.phash)) <= MAX_BITS  # pHash sees grey only
    assert near_duplicate_pairs([first, second]) == []


@pytest.mark.parametrize("max_bits", [2, 6])
def test_the_bucketed_search_finds_every_pair_a_full_comparison_finds(max_bits):
    """The pigeonhole bands must miss nothing: against all pairs compared, on hashes made to be close."""
    rng = np.random.default_rng(max_bits)
    seeds = rng.integers(0, 2**63, 30, dtype=np.uint64)
    hashes = []
    for seed in seeds:  # a family of hashes around each seed, 0 to 9 bits away
        for flips in range(4):
            bits = rng.choice(64, size=rng.integers(0, 10), replace=False)
            hashes.append(int(seed) ^ sum(1 << int(bit) for bit in bits))
    thumbnail = np.zeros((16, 16, 3), dtype=np.uint8)
    fingerprints = [Fingerprint(h, thumbnail) for h in hashes]
    array = np.array(hashes, dtype=np.uint64)
    distances = hash_distance(array[:, None], array[None, :])
    assert distances[0, 1] == bin(hashes[0] ^ hashes[1]).count("1")
    everything = [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if distances[i, j] <= max_bits]
    assert near_duplicate_pairs(fingerprints, max_bits=max_bits) == everything and everything


def test_pairs_join_into_groups():
    assert connected_groups(6, [(0, 3), (3, 5), (1, 2)]) == [[0, 3, 5], [1, 2]]
    assert connected_groups(3, []) == []
