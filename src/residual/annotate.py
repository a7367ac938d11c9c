"""Pictures with the model's answer written on them.

`captioned` writes a line across the top of a picture, white on a dark band sized to the picture: the frames of
`residual predict clip.mp4 --annotate` and of `residual explain clip.mp4`, and the images of
`residual predict IMAGES --annotate DIR` (what Ultralytics' `save=True` gives a classifier's images).

`annotated_images` passes predictions through as they come, and writes each image, upright (EXIF applied),
enlarged to DISPLAY_SIZE where it is smaller (so a 32 px image's caption can be read), with its answer: the top
classes and their probabilities, a multi-label model's present classes, or "unsure" below a floor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path
from .data.decode import read_image
from .explain import DISPLAY_SIZE, output_names
from .predict import Prediction, source_name

CAPTION_CLASSES = 3  # classes named on an annotated image, at most: more do not fit across a small one


def captioned(picture: Image.Image, text: str) -> Image.Image:
    """A copy of `picture` with `text` across its top, white on a dark band, sized to the picture."""
    image = picture.copy()
    size = max(10, image.height // 16)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image, "RGBA")
    left, top, right, bottom = draw.textbbox((size // 2, size // 3), text, font=font)
    draw.rectangle((0, 0, max(right + size // 2, 1), bottom + size // 3), fill=(0, 0, 0, 160))
    draw.text((size // 2, size // 3), text, font=font, fill=(255, 255, 255))
    return image


def answer_text(prediction: Prediction) -> str:
    """The answer in a line: "cat 0.93, dog 0.05, fox 0.01"; a multi-label model's present classes (or "(none)");
    "unsure" and the top class where a floor said no class."""
    if prediction.unsure:
        _, name, probability = prediction.top[0]
        return f"unsure (top: {name} {probability:.2f})"
    shown = prediction.top[:CAPTION_CLASSES] if prediction.present is None else prediction.present
    return ", ".join(f"{name} {probability:.2f}" for _, name, probability in shown) or "(none)"


def annotated_images(predictions: Iterable[Prediction], items: list, folder: str | Path) -> Iterator[Prediction]:
    """`predictions` of `items` (predict's inputs, in order) as they come, each image also written to `folder` as
    NAME.annotated.png (explain's names: the folders below their common one where names repeat) with its answer
    across its top."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = output_names(items, "annotated")
    by_source = {source_name(item, index): (item, names[index]) for index, item in enumerate(items)}
    for prediction in predictions:
        item, name = by_source[prediction.source]
        image = _picture(item)
        if min(image.size) < DISPLAY_SIZE:
            scale = DISPLAY_SIZE / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        with atomic_path(folder / name) as tmp:
            captioned(image, answer_text(prediction)).save(tmp, format="PNG")
        yield prediction


def _picture(item) -> Image.Image:
    """An input of predict as an RGB picture: a file read as predict reads it, an image, or an H x W x 3 array."""
    if isinstance(item, (str, Path)):
        return read_image(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    return Image.fromarray(np.asarray(item, dtype=np.uint8))
