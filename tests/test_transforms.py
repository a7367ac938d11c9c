"""Augmentation presets, batched augmentation, mixup/CutMix and eval resizing."""

import numpy as np
import pytest
import torch
from PIL import Image

import residual
from residual.data import augmix
from residual.data.transforms import (AugmentConfig, RandomCropFlip, RandomResizedCropFlip, build_augment,
                                      crop_resize, mix_batch, resize_center_crop, resize_center_crop_pixels,
                                      resize_in_float, resized_size, soft_targets)


def test_presets_resolve_their_knobs_and_explicit_knobs_win():
    none = AugmentConfig(preset="none").resolved(32)
    assert not none.hflip and none.pad_crop == 0 and none.crop_scale == 0
    cifar = AugmentConfig(preset="cifar").resolved(32)
    assert cifar.hflip and cifar.pad_crop == 4 and not cifar.rotation
    standard = AugmentConfig(preset="standard").resolved(224)
    assert standard.crop_scale == 0.08 and standard.hflip and not standard.auto_augment
    strong = AugmentConfig(preset="strong").resolved(224)
    assert (strong.rotation, strong.shift, strong.brightness, strong.contrast) == (15.0, 0.1, 0.2, 0.2)
    assert strong.random_erasing == 0.25 and strong.auto_augment == "trivialaugment"
    custom = AugmentConfig(preset="strong", hflip=False, auto_augment="randaugment", rotation=0).resolved(224)
    assert not custom.hflip and custom.auto_augment == "randaugment" and custom.rotation == 0
    assert AugmentConfig().resolved(32).preset == "cifar" and AugmentConfig().resolved(224).preset == "standard"
    with pytest.raises(residual.ConfigError):
        AugmentConfig(preset="heavy")
    # Reflection padding mirrors the image into the border: it needs a border narrower than the image.
    (crop,) = build_augment(AugmentConfig(preset="cifar", pad_mode="reflect"), 32, 32)
    assert (crop.padding, crop.pad_mode) == (4, "reflect")
    with pytest.raises(residual.ConfigError, match="--pad-crop must be less than the image's side \\(8 px\\), got 8"):
        build_augment(AugmentConfig(preset="cifar", pad_crop=8, pad_mode="reflect"), 8, 8)
    with pytest.raises(residual.ConfigError, match="--pad-mode must be one of zeros, reflect, got 'edge'"):
        AugmentConfig(pad_mode="edge")


@pytest.mark.parametrize("preset, stored, size", [("none", 32, 32), ("none", 40, 32), ("cifar", 32, 32),
                                                  ("standard", 73, 64), ("strong", 73, 64)])
def test_every_preset_produces_batches_of_the_input_size(preset, stored, size):
    torch.manual_seed(0)
    augment = build_augment(AugmentConfig(preset=preset), size, stored)
    images = torch.rand(6, 3, stored, stored)
    out = augment(images)
    assert out.shape == (6, 3, size, size) and torch.isfinite(out).all()
    if preset == "none":
        assert torch.equal(out, images[..., 4:36, 4:36] if stored == 40 else images), "the centre, always"
    if preset in ("cifar", "strong"):
        assert not torch.allclose(out, augment(images)), "random each call"
    # A batch of files none of which could be read is empty; it still steps (data-parallel workers step together).
    assert augment(images[:0]).shape == (0, 3, size, size)


@pytest.mark.parametrize("size, policy", [(32, "cifar10"), (64, "cifar10"), (96, "imagenet")])
def test_autoaugment_uses_the_policy_searched_for_images_of_that_size(size, policy):
    import kornia.augmentation as K

    torch.manual_seed(2)
    augment = build_augment(AugmentConfig(preset="none", auto_augment="autoaugment"), size, size)
    found = [module for module in augment.modules() if isinstance(module, K.auto.AutoAugment)]
    assert len(found) == 1
    first_ops = [[type(op).__name__ for op in sub_policy] for sub_policy in found[0]]
    assert first_ops == [[type(op).__name__ for op in sub_policy] for sub_policy in K.auto.AutoAugment(policy)]
    images = torch.rand(16, 3, size, size)
    out = augment(images)
    assert out.shape == images.shape and not torch.allclose(out, images)
    with pytest.raises(residual.ConfigError, match="--auto-augment must be one of autoaugment, randaugment"):
        AugmentConfig(auto_augment="augmax")


def test_augmix_operations_do_what_the_paper_defines():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 30, 30) * 0.5 + 0.25
    level = torch.full((6,), 3.0)
    stretched = augmix.autocontrast(x, level)
    assert torch.allclose(stretched.amin((2, 3)), torch.zeros(6, 3)) and torch.allclose(stretched.amax((2, 3)),
                                                                                         torch.ones(6, 3))
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert torch.equal(augmix.autocontrast(flat, level[:1]), flat)
    poster = (augmix.posterize(x, level) * 255).round()  # level 3: 4 - int(1.2) = 3 bits kept
    assert torch.equal(poster % 32, torch.zeros_like(poster))
    solar = augmix.solarize(x, torch.full((6,), 5.0))  # threshold 1 - 128/256: the upper half inverted
    torch.testing.assert_close(solar, torch.where(x >= 0.5, 1 - x, x))
    shifted = augmix.translate_x(x, torch.full((6,), 10.0))  # a third of 30 px: 10 px, either way
    for image, moved in zip(x, shifted):
        assert torch.allclose(moved[..., 10:], image[..., :-10], atol=1e-5) or torch.allclose(
            moved[..., :-10], image[..., 10:], atol=1e-5)
    torch.testing.assert_close(augmix.rotate(x, torch.full((6,), 0.2)), x)  # int(0.6) = 0 degrees


def test_augmix_mixes_each_image_with_its_own_chains(monkeypatch):
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = augmix.AugMix()(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 and not torch.allclose(out, x)
    torch.manual_seed(1)
    assert torch.equal(augmix.AugMix()(x), out)
    # Chains of operations that change nothing: a convex mixture of the image with itself is the image.
    monkeypatch.setattr(augmix, "OPERATIONS", (lambda images, level: images,) * 3)
    torch.testing.assert_close(augmix.AugMix()(x), x)
    found = build_augment(AugmentConfig(preset="cifar", auto_augment="augmix"), 16, 16)
    assert [type(stage).__name__ for stage in found] == ["RandomCropFlip", "AugMix"]
    assert found(x[:0]).shape == (0, 3, 16, 16)


def test_augmix_views_are_the_clean_crop_and_two_augmixed_copies_of_it(monkeypatch):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    alone = build_augment(AugmentConfig(preset="none", auto_augment="augmix", random_erasing=1.0), 16, 16)
    torch.manual_seed(0)
    views = augmix.augmix_views(alone, x)
    assert views.shape == (12, 3, 16, 16) and torch.equal(views[:4], x)  # no crop here: the first view is x
    assert not torch.allclose(views[4:8], views[8:]) and not torch.allclose(views[4:8], x)
    # With a crop, all three views are of the same crop: AugMix chains of identities leave them equal,
    # and only the AugMix views go through the stages after it (random erasing here).
    monkeypatch.setattr(augmix, "OPERATIONS", (lambda images, level: images,))
    cropped = build_augment(AugmentConfig(preset="cifar", auto_augment="augmix"), 16, 16)
    views = augmix.augmix_views(cropped, x)
    torch.testing.assert_close(views[4:8], views[:4])
    torch.testing.assert_close(views[8:], views[:4])
    assert not torch.equal(views[:4], x)
    views = augmix.augmix_views(alone, x)
    assert torch.equal(views[:4], x) and (views[4:] == 0).any()


def test_randaugment_takes_its_count_and_strength_and_refuses_them_alone():
    import kornia.augmentation as K

    (default,) = [m for m in build_augment(AugmentConfig(preset="none", auto_augment="randaugment"), 32, 32).modules()
                  if isinstance(m, K.auto.RandAugment)]
    assert (default.n, default.m) == (2, 9)  # the paper's ResNet-50 setting
    config = AugmentConfig(preset="none", auto_augment="randaugment", randaugment_ops=3, randaugment_magnitude=21)
    (found,) = [m for m in build_augment(config, 32, 32).modules() if isinstance(m, K.auto.RandAugment)]
    assert (found.n, found.m) == (3, 21)
    for options, message in [({"randaugment_magnitude": 7}, "--randaugment-magnitude sets RandAugment: give "
                                                             "--auto-augment randaugment"),
                             ({"auto_augment": "randaugment", "randaugment_magnitude": 30}, "1 to 29, got 30"),
                             ({"auto_augment": "randaugment", "randaugment_ops": 0}, "1 to 15, got 0")]:
        with pytest.raises(residual.ConfigError, match=message):
            AugmentConfig(**options)


def test_flip_alone_mirrors_some_images():
    torch.manual_seed(1)
    augment = build_augment(AugmentConfig(preset="none", hflip=True), 8, 8)
    images = torch.rand(64, 3, 8, 8)
    out = augment(images)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


@pytest.mark.parametrize("pad_mode, torch_mode", [("zeros", "constant"), ("reflect", "reflect")])
def test_pad_crop_flip_takes_every_window_of_the_padded_image_and_mirrors_half(pad_mode, torch_mode):
    """What kornia's RandomCrop(padding=2) + RandomHorizontalFlip do: each output is one window of the
    zero-padded (or reflection-padded) image, every offset turns up, and about half are mirrored."""
    torch.manual_seed(4)
    images = torch.rand(1, 3, 6, 6).expand(400, 3, 6, 6)
    padded = torch.nn.functional.pad(images[0], (2, 2, 2, 2), mode=torch_mode)
    windows = {(top, left, mirrored): padded[:, top:top + 6, left:left + 6].flip(-1) if mirrored
               else padded[:, top:top + 6, left:left + 6]
               for top in range(5) for left in range(5) for mirrored in (False, True)}
    seen = []
    for out in RandomCropFlip(6, padding=2, hflip=True, pad_mode=pad_mode)(images):
        seen += [key for key, window in windows.items() if torch.equal(out, window)]
    assert len(seen) == 400, "every output is exactly one window"
    assert {(top, left) for top, left, _ in seen} == {(top, left) for top in range(5) for left in range(5)}
    assert 150 < sum(mirrored for _, _, mirrored in seen) < 250
    unpadded = RandomCropFlip(4)(images)
    assert unpadded.shape == (400, 3, 4, 4) and any(torch.equal(unpadded[0], images[0, :, top:top + 4, left:left + 4])
                                                    for top in range(3) for left in range(3))


def test_resized_crop_boxes_follow_torchvision_rules():
    torch.manual_seed(5)
    crop = RandomResizedCropFlip(24, scale=(0.08, 1.0))
    top, left, h, w = crop.boxes(4000, 48, 64, torch.device("cpu")).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    area = h * w / (48 * 64)
    assert area.min() < 0.1 and area.max() > 0.9 and (area > 0.07).all()
    assert ((w / h > 3 / 4 * 0.9) & (w / h < 4 / 3 * 1.1)).all(), "aspect ratios within range, up to rounding"
    assert {int(v) for v in top} >= set(range(0, 10)), "offsets spread over the image"
    # When no try can fit, the centred crop with the widest ratio in range (torchvision's fallback).
    impossible = RandomResizedCropFlip(8, scale=(2.0, 3.0)).boxes(3, 10, 40, torch.device("cpu"))
    assert impossible.tolist() == [[0, 13, 10, 13]] * 3


def test_crop_resize_is_a_bilinear_resize_of_each_box_and_mirrors_on_request():
    torch.manual_seed(6)
    images = torch.rand(3, 3, 20, 30)
    top, left = torch.tensor([0.0, 5.0, 2.0]), torch.tensor([0.0, 7.0, 20.0])
    h, w = torch.tensor([20.0, 9.0, 6.0]), torch.tensor([30.0, 12.0, 10.0])
    mirrored = torch.tensor([False, True, False])
    out = crop_resize(images, top, left, h, w, 16, mirrored)
    for i in range(3):
        t, l_, hh, ww = int(top[i]), int(left[i]), int(h[i]), int(w[i])
        expected = torch.nn.functional.interpolate(images[i:i + 1, :, t:t + hh, l_:l_ + ww], size=(16, 16),
                                                   mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out[i], expected.flip(-1) if mirrored[i] else expected, atol=1e-5, rtol=0)
    flips = RandomResizedCropFlip(30, scale=(1.0, 1.0), hflip=True, ratio=(1.0, 1.0))(torch.rand(1, 3, 30, 30)
                                                                                      .expand(200, 3, 30, 30))
    mirrored_count = sum(torch.allclose(o, flips[0].flip(-1), atol=1e-5) for o in flips)
    assert 60 < mirrored_count < 140


def test_mixup_and_cutmix_targets():
    torch.manual_seed(2)
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % 4
    plain_images, plain = mix_batch(images, labels, 4, 0.0, 0.0, smoothing=0.1)
    assert torch.equal(plain_images, images) and torch.equal(plain, labels), "no mixing: the labels themselves"
    assert soft_targets(labels, 4, 0.1)[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])
    logits = torch.randn(8, 4)
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1),
                          torch.nn.functional.cross_entropy(logits, soft_targets(labels, 4, 0.1)))
    for mixup, cutmix in [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)]:
        mixed, targets = mix_batch(images, labels, 4, mixup, cutmix)
        assert mixed.shape == images.shape and torch.allclose(targets.sum(1), torch.ones(8))
        assert (targets.max(1).values < 1).any(), "some targets are mixtures"
    torch.manual_seed(3)
    mixed, targets = mix_batch(images, labels, 4, 0.0, 1.0)
    changed = (mixed != images).any(1).float().mean(dim=(1, 2))  # pasted-box area per image
    own = targets[torch.arange(8), labels]
    moved = own < 1
    assert torch.allclose((1 - own)[moved], changed[moved], atol=0.15)


def test_resize_center_crop():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 0, 0), (90, 40, 110, 60))
    out = resize_center_crop(image, 50, 40)
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    assert out[0, 20, 20] > 200 and out[0, 0, 0] == 0


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(500, 375), (40, 70)])  # shrunk, and enlarged
def test_resize_center_crop_is_pillows_resize_to_one_grey_level(interpolation, size):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    scale = 64 / min(size)
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC}
    resized = image.resize((round(size[0] * scale), round(size[1] * scale)), filters[interpolation])
    left, top = (resized.width - 56) // 2, (resized.height - 56) // 2
    expected = torch.from_numpy(np.asarray(resized.crop((left, top, left + 56, top + 56))).copy()).permute(2, 0, 1)
    difference = (resize_center_crop(image, 64, 56, interpolation).int() - expected.int()).abs()
    assert difference.max() <= (0 if interpolation == "nearest" else 1) and difference.float().mean() < 0.01


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(500, 375), (40, 70)])  # shrunk, and enlarged
def test_resizing_decoded_tensors_gives_the_pillow_paths_pixels(interpolation, size):
    """What `--decoder torchvision` resizes: batches of one size as tensors, in float32 off the CPU."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(2)]
    expected = torch.stack([resize_center_crop(image, 64, 56, interpolation) for image in images]).int()
    pixels = torch.stack([torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images])
    batched = resize_center_crop_pixels(pixels, 64, 56, interpolation).int()
    if interpolation == "nearest":  # Pillow's pixels, but at some half-way positions (5% of them shrinking here)
        assert (batched == expected).all(dim=1).float().mean() > (0.9 if size == (500, 375) else 0.999)
        return
    assert torch.equal(batched, expected)  # on the CPU: the same uint8 kernel, a batch at a time
    height, width = resized_size(size[1], size[0], 64, 56)
    top, left = (height - 56) // 2, (width - 56) // 2
    in_float = resize_in_float(pixels, height, width, interpolation)[..., top:top + 56, left:left + 56].int()
    difference = (in_float - expected).abs()
    if interpolation == "bicubic" and size == (40, 70):  # overshoots clipped once here, between passes there
        assert difference.float().mean() < 0.5
    else:
        assert difference.max() <= 1 and difference.float().mean() < 0.3
