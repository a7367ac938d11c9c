"""`residual demo`: a tour of what works today, on data the toolkit draws itself.

It builds every registered ResNet (the model table), draws a few `shapes`
images, classifies them with a randomly initialised CIFAR ResNet-20 (and
says plainly that it is untrained), and round-trips that model through a
model file. Training is not part of the toolkit yet, so neither is it here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from .data.shapes import SHAPE_CLASSES, render_shape
from .models import list_models
from .tables import collect_model_info, models_table
from .weights import create_model, load_model, save_model


def image_to_tensor(image, preprocessing) -> torch.Tensor:
    """An RGB image already at the model's input size -> a normalised CHW float tensor."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    return (array - mean) / std


def run_demo(out_dir: str | Path = "runs/demo", console: Console | None = None, images: int = 10,
             seed: int = 0) -> dict:
    """Run the tour; returns what it made (paths, predictions) for scripts and tests."""
    console = console or Console()
    out_dir = Path(out_dir)
    console.rule("[bold]residual demo")
    console.print("1. Every registered ResNet, built and run on one image to count its cost:")
    infos = collect_model_info(list_models(), console)
    console.print(models_table(infos))

    console.print(f"\n2. {images} generated `shapes` images ({out_dir / 'images'}):")
    rng = np.random.default_rng(seed)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    truths, paths, batch = [], [], []
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=len(SHAPE_CLASSES)).eval()
    model.class_names = list(SHAPE_CLASSES)
    for index in range(images):
        shape = SHAPE_CLASSES[index % len(SHAPE_CLASSES)]
        image, _ = render_shape(shape, model.preprocessing.input_size, rng)
        path = image_dir / f"{index:02d}_{shape}.png"
        image.save(path)
        truths.append(shape)
        paths.append(path)
        batch.append(image_to_tensor(image, model.preprocessing))
    inputs = torch.stack(batch)
    with torch.inference_mode():
        probs = model(inputs).softmax(1)
    confidence, predicted = probs.max(1)

    table = Table(title="CIFAR ResNet-20, randomly initialised: UNTRAINED, so these guesses are chance")
    for column in ("image", "true shape", "predicted", "probability"):
        table.add_column(column)
    for path, truth, p, c in zip(paths, truths, predicted.tolist(), confidence.tolist()):
        table.add_row(path.name, truth, SHAPE_CLASSES[p], f"{c:.2f}")
    console.print(table)
    correct = sum(SHAPE_CLASSES[p] == t for p, t in zip(predicted.tolist(), truths))
    console.print(f"{correct}/{images} right. With {len(SHAPE_CLASSES)} classes, chance is about "
                  f"{images / len(SHAPE_CLASSES):.0f}/{images}: [bold]this model has not been trained[/bold].")

    model_path = save_model(model, out_dir / "resnet20-untrained.safetensors", extra={"trained": False})
    with torch.inference_mode():
        reloaded = load_model(model_path).eval()(inputs).softmax(1)
    same = torch.equal(reloaded, probs)
    console.print(f"\n3. Saved the model to {model_path} and loaded it back: "
                  f"{'identical predictions' if same else 'PREDICTIONS DIFFER'}.")
    console.print("\nNext: `residual models`, `residual info " + str(model_path) + "`, `residual pretrained`, "
                  "and in Python `residual.create_model('resnet50.tv2_in1k')` (needs network once).")
    return {"model_path": model_path, "images": paths, "predicted": [SHAPE_CLASSES[p] for p in predicted.tolist()],
            "truths": truths, "reload_identical": same}
