"""The safe image reader, with real files in every mode."""

import numpy as np
import pytest
from PIL import Image

from residual.data import decode
from residual.data.decode import BadImageError, decode_bytes, image_files, read_image
from residual.data.transforms import resize_center_crop


def _pixel(image, xy=(0, 0)):
    return image.getpixel(xy)


def _palette_image(colour):
    image = Image.new("P", (4, 4), 0)
    image.putpalette(list(colour) + [0] * 765)
    return image


def test_every_mode_becomes_rgb(tmp_path):
    cases = {
        "L.png": Image.new("L", (4, 4), 100),
        "one_bit.png": Image.new("1", (4, 4), 1),
        "cmyk.tif": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),  # pure red in CMYK
        "palette.png": _palette_image((10, 200, 30)),
        "rgba.png": Image.new("RGBA", (4, 4), (250, 0, 0, 255)),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    assert _pixel(read_image(tmp_path / "L.png")) == (100, 100, 100)
    assert _pixel(read_image(tmp_path / "one_bit.png")) == (255, 255, 255)
    assert _pixel(read_image(tmp_path / "cmyk.tif")) == (255, 0, 0)
    assert _pixel(read_image(tmp_path / "palette.png")) == (10, 200, 30)
    assert _pixel(read_image(tmp_path / "rgba.png")) == (250, 0, 0)
    for name in cases:
        assert read_image(tmp_path / name).mode == "RGB"


def test_jfif_and_avif_files_are_images(tmp_path):
    """Browsers save JPEGs as .jfif; phones and the web use AVIF. Both were left out as non-images."""
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "saved.jfif", "JPEG")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "photo.avif", quality=95)
    assert decode.image_files([tmp_path]) == [tmp_path / "photo.avif", tmp_path / "saved.jfif"]
    for name in ("saved.jfif", "photo.avif"):
        red, green, _ = _pixel(read_image(tmp_path / name), (8, 8))
        assert red > 170 and green < 60


def test_transparency_is_composited_not_dropped(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert _pixel(image, (0, 0)) == (255, 255, 255) and _pixel(image, (1, 0)) == (0, 0, 255)
    la = Image.new("LA", (1, 1), (0, 0))
    la.save(tmp_path / "la.png")
    assert _pixel(read_image(tmp_path / "la.png")) == (255, 255, 255)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    image = read_image(tmp_path / "p.png")
    assert _pixel(image, (0, 0)) == (255, 255, 255) and _pixel(image, (1, 0)) == (255, 0, 0)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = read_image(tmp_path / "deep.png")
    assert [_pixel(image, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (32, 16), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = read_image(tmp_path / "rotated.jpg")
    assert shown.size == (16, 32)
    top, bottom = _pixel(shown, (8, 4)), _pixel(shown, (8, 28))
    assert top[0] > 200 and top[1] < 50 and max(bottom) < 50  # the left half is now on top


def test_broken_files_raise_one_clear_error_each(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    cases = {"truncated.jpg": "corrupt or truncated", "empty.png": "empty file", "notes.jpg": "not an image",
             "missing.png": "no such file"}
    for name, reason in cases.items():
        with pytest.raises(BadImageError, match=reason) as error:
            read_image(tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)) and "\n" not in str(error.value)


def test_a_url_among_the_images_is_named_as_a_url_and_skipped(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "local.png")
    url = "https://example.com/cat.jpg"
    assert image_files([url, tmp_path / "local.png"]) == [url, tmp_path / "local.png"]  # Path made it https:/...
    with pytest.raises(BadImageError) as error:
        read_image(url)
    assert str(error.value) == f"{url}: a URL; residual reads image files, so download it first (curl -O URL)"


def test_a_folder_input_names_the_files_it_leaves_out(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"an iPhone photo")  # Pillow cannot read it: it was left out unsaid
    (tmp_path / "notes.txt").write_text("shot in May")
    (tmp_path / ".DS_Store").write_bytes(b"")  # a system's file: never an image, not worth a word
    assert image_files([tmp_path]) == [tmp_path / "photo.png"]
    assert caplog.messages == [f"{tmp_path}: left out 2 file(s) whose extension is no image's: IMG_0001.HEIC, "
                               f"notes.txt"]


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(decode, "MAX_PIXELS", 5000)
    with pytest.raises(BadImageError, match="decompression bomb"):
        read_image(tmp_path / "big.png")


def test_large_jpegs_decode_at_a_reduced_scale_that_still_covers_the_target(tmp_path):
    # A smooth 1600x1200 photo-like image: reduced decoding must keep what the model sees.
    y, x = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([x / 1600 * 255, y / 1200 * 255, (x + y) / 2800 * 255], axis=2).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=92)
    full = read_image(tmp_path / "photo.jpg")
    reduced = read_image(tmp_path / "photo.jpg", min_side=256)
    assert full.size == (1600, 1200) and reduced.size == (400, 300)  # 1/4: the smallest scale >= 256 px
    assert read_image(tmp_path / "photo.jpg", min_side=700).size == (1600, 1200)  # 1/2 would be too small
    a = resize_center_crop(full, 256, 224).int()
    b = resize_center_crop(reduced, 256, 224).int()
    assert (a - b).abs().float().mean() < 2.0  # of 255
    Image.fromarray(pixels).save(tmp_path / "photo.png")  # other formats decode in full
    assert read_image(tmp_path / "photo.png", min_side=256).size == (1600, 1200)


def test_images_in_memory_are_read_as_files_are(tmp_path):
    """An upload (`residual serve`) goes through the same checks, its errors named as the caller says."""
    Image.new("RGB", (60, 45), (200, 30, 30)).save(tmp_path / "b.jpg")
    data = (tmp_path / "b.jpg").read_bytes()
    assert decode_bytes(data, "b.jpg").size == (60, 45)
    with pytest.raises(BadImageError, match=r"^upload: corrupt or truncated image"):
        decode_bytes(data[:200], "upload")
    with pytest.raises(BadImageError, match=r"^upload: empty \(0 bytes\)"):
        decode_bytes(b"", "upload")
