"""`residual demo`: the main job, end to end, on data the toolkit draws itself.

It writes the `shapes` dataset (once), trains a CIFAR-style ResNet-20 on it on
the CPU in a few minutes, classifies test images the model never saw with the
saved model file, and says where everything is. No network is needed.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .data.shapes import write_shapes
from .data.transforms import AugmentConfig
from .evaluate import evaluate
from .predict import predict
from .progress import message_console
from .runs import cpu_has_native_bf16, pick_device
from .tables import new_table
from .train import TrainConfig, train
from .train.optim import OptimConfig
from .weights import load_model

# The recipe, measured on 2 CPU cores: about 1.5 minutes of training in bf16 (docs/BENCHMARKS.md). Progressive
# resizing (24 px for 12 epochs, then 28 and 32) trained in 0.74-0.79x the time of 12 epochs at 32 px and scored
# higher: 99.53% mean test top-1 over three seeds against 99.08%.
DEMO_RECIPE = dict(model="resnet20", epochs=16, progressive_resize=24, batch_size=128, label_smoothing=0.1,
                   optim=OptimConfig(lr=0.2, schedule="onecycle", weight_decay=5e-4),
                   augment=AugmentConfig(preset="cifar"))


def run_demo(out_dir: str | Path = "runs/demo", data_dir: str | Path = "data/shapes-32", per_class: int = 600,
             epochs: int | None = None, console: Console | None = None, show: int = 10) -> dict:
    """Run the tour; returns what it made (paths, accuracies) for scripts and tests."""
    console = console or message_console()
    console.rule("[bold]residual demo")
    console.print(f"1. The built-in `shapes` dataset: 10 classes of 32 px shapes on noisy backgrounds -> {data_dir}")
    write_shapes(data_dir, size=32, per_class=per_class, seed=0)

    # bf16 autocast on a CPU that computes it in hardware: the same accuracy, at 1.7-2.6x fp32's speed there
    # (docs/BENCHMARKS.md). Elsewhere the trainer's own choice (fp32 on a CPU, bf16 on CUDA).
    native_bf16 = pick_device("auto").type == "cpu" and cpu_has_native_bf16()
    precision = " in bfloat16 (this CPU computes it natively)" if native_bf16 else ""
    console.print(f"2. Training a CIFAR-style ResNet-20{precision} (a live bar shows progress):")
    recipe = {**DEMO_RECIPE, "amp": True if native_bf16 else None, **({"epochs": epochs} if epochs else {})}
    result = train(TrainConfig(data=str(data_dir), out=str(out_dir), name="resnet20-shapes", **recipe),
                   console=console)

    console.print(f"\n3. The saved model ({result.model_path}) on test images it never saw:")
    model = load_model(result.model_path).eval()
    test = evaluate(model, data_dir, "test", out_dir=result.run_dir / "test-report")
    step = max(1, len(test.sources) // show)
    sample = predict(model, test.sources[::step][:show], topk=1).predictions
    table = new_table(f"{len(sample)} of {len(test.sources)} test images",
                      ("image", "true", "predicted", "probability"), right=("probability",))
    for prediction in sample:
        path = Path(prediction.source)
        [(_, name, probability)] = prediction.top
        mark = "" if name == path.parent.name else "  [red]wrong"
        table.add_row(f"{path.parent.name}/{path.name}", path.parent.name, name + mark, f"{probability:.3f}")
    console.print(table)
    test_top1 = test.metrics["top1"]
    val_top1 = result.best.get("val_top1", float("nan"))
    low, high = test.metrics["top1_ci95"]
    console.print(f"validation top-1 {val_top1:.2%} (best epoch {result.best_epoch}), "
                  f"test top-1 {test_top1:.2%} over {len(test.sources)} images (95% interval {low:.2%} - {high:.2%}).")

    console.print(f"\nEverything is in {result.run_dir}:")
    for name, what in [("model.safetensors", "the best model: weights, classes and preprocessing in one file"),
                       ("metrics.csv", "loss, accuracy, learning rate and speed per epoch"),
                       ("curves.png", "the training curves"),
                       ("report.html", "the validation report: per-class scores, confusion matrix, calibration, "
                                       "ROC curves, the highest-loss images with Grad-CAM"),
                       ("test-report/", "the same report on the test split"),
                       ("config.yaml", "the resolved recipe, to repeat the run"),
                       ("last.pt", "the checkpoint to resume from")]:
        console.print(f"  {name:<18} {what}")
    console.print("\nNext: `residual train YOUR_IMAGES/` (a folder per class, or a CSV of image,label rows), "
                  "`residual check-data YOUR_IMAGES/`, "
                  f"`residual predict {result.model_path} IMAGES`, `residual explain {result.model_path} IMAGES`, "
                  f"`residual eval {result.model_path} DATA`, `residual calibrate {result.model_path} {data_dir}` "
                  f"(fits its confidence to its accuracy), `residual serve {result.model_path}` (the model behind "
                  f"HTTP), `residual summary {DEMO_RECIPE['model']}` (the network "
                  f"layer by layer), `residual compare runs/train` (runs side by side), `residual models`.")
    return {"run_dir": result.run_dir, "model_path": result.model_path, "val_top1": val_top1, "test_top1": test_top1}
