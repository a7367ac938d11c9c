"""`residual bench` in its tiny CPU mode, and the levers it measures: fused optimizer, bf16 path, auto compile
and CUDA graphs."""

import csv
import os

import pytest
import torch
from rich.console import Console

from residual import bench
from residual.bench import (SETTINGS, TINY_WORKLOADS, BenchRow, compile_payback, fresh_compile_caches, jpeg_folder,
                            select_workloads)
from residual.cli import main
from residual.data.datasets import open_dataset
from residual.data.device_decode import check_decoder
from residual.data.shapes import write_shapes
from residual.data.transforms import AugmentConfig
from residual.errors import ConfigError
from residual.models import build_model
from residual.predict import INFERENCE_COMPILE_FROM_IMAGES
from residual.train import TrainConfig, train
from residual.train.config import COMPILE_FROM_STEPS, auto_compile, auto_compile_mode, compile_log, resolve
from residual.train.optim import OptimConfig, build_optimizer
from residual.train.trainer import Trainer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_tiny_bench_prints_both_paths_side_by_side(capsys):
    assert main(["bench", "--tiny", "--no-compile", "--device", "cpu", "--steps", "2", "--warmup", "1",
                 "--peak-tflops", "1", "--augment", "auto"]) == 0
    printed = capsys.readouterr()
    rows = [line.split("|")[1:-1] for line in printed.out.splitlines() if line.startswith("| tiny")]
    try:  # the JPEGs decoded on the device need torchvision's decoder
        check_decoder("torchvision", torch.device("cpu"))
        workloads = 6
    except ConfigError:
        workloads = 4
        for skipped in ("resnet20 train", "resnet18 inference"):
            assert (f"skipped tiny {skipped} from 48x40 JPEGs decoded on the device, batch 8, 32 px: --decoder"
                    in " ".join(printed.err.split()))
    assert len(rows) == 2 * workloads  # x (fp32 eager, bf16 + channels_last)
    said = " ".join(printed.err.split())
    for workload, setting, ours, peer, theirs, ratio, mfu, _ in rows:
        assert workload.strip().endswith(", augment auto") == (" train" in workload)  # as `residual train` would
        # residual's figure is said before the peer runs, so a row cut short while the peer compiles keeps it.
        assert f"{workload.strip()}: {setting.strip()}: residual {ours.strip()} images/s after a" in said
        ours, theirs = float(ours.replace(",", "")), float(theirs.replace(",", ""))
        # The table rounds images/s to integers and the ratio to two decimals.
        rounding = 0.005 + ours / theirs * (0.5 / ours + 0.5 / theirs)
        assert ours > 0 and theirs > 0 and abs(float(ratio) - ours / theirs) <= rounding + 1e-9
        assert mfu.strip().endswith("%")
        peers = {"residual, synthetic data"} if "JPEGs" in workload else {"plain loop", "torchvision resnet18"}
        assert peer.strip() in peers


def test_the_bench_runs_the_workloads_asked_for(capsys):
    assert [w.name for w in select_workloads(TINY_WORKLOADS, ["JPEG", "INFERENCE"])] == [
        "tiny resnet18 inference, batch 8, 32 px", "tiny resnet20 train from 48x40 JPEGs, batch 8, 32 px",
        "tiny resnet20 train from 48x40 JPEGs decoded on the device, batch 8, 32 px",
        "tiny resnet18 inference from 48x40 JPEGs, batch 8, 32 px",
        "tiny resnet18 inference from 48x40 JPEGs decoded on the device, batch 8, 32 px"]
    assert select_workloads(TINY_WORKLOADS, None) == list(TINY_WORKLOADS)
    assert main(["bench", "--tiny", "--only", "resnet1001"]) == 2
    assert "--only resnet1001 matches no workload; they are: tiny resnet20 train" in capsys.readouterr().err


def test_each_row_is_handed_over_as_soon_as_it_is_measured():
    """benchmarks/gpu.py prints rows as they come, so a run stopped by the device's time limit keeps them."""
    seen = []
    rows = bench.bench(TINY_WORKLOADS[:2], SETTINGS[:1], "cpu", steps=1, warmup=1, console=Console(quiet=True),
                       on_row=seen.append)
    assert seen == rows and len(rows) == 2
    assert bench.bench_table(rows, None).splitlines()[2:] == [bench.bench_line(row, None) for row in rows]


def test_the_jpegs_are_written_once_per_size_and_count(tmp_path, monkeypatch):
    """Every setting and workload reading the same JPEGs shares one folder: writing them is slower than
    measuring."""
    train, infer = (w for w in TINY_WORKLOADS if "from 48x40 JPEGs, batch" in w.name)
    folder = jpeg_folder(tmp_path, train, steps=3)
    assert len(list(folder.glob("train/*/*.jpg"))) == 8 * 3 and len(list(folder.glob("val/*/*.jpg"))) == 2
    longer = jpeg_folder(tmp_path, train, steps=40)  # 16 batches' worth, a folder of its own
    assert longer != folder and len(list(longer.glob("train/*/*.jpg"))) == 8 * 16
    monkeypatch.setattr(bench, "write_jpegs", lambda *args, **kwargs: pytest.fail("written again"))
    assert jpeg_folder(tmp_path, infer, steps=3) == folder and jpeg_folder(tmp_path, train, steps=20) == longer


def test_the_bench_says_after_how_many_steps_compiling_repays_its_warm_up():
    eager, compiled = SETTINGS[1], SETTINGS[2]

    def row(workload, setting, images_per_s, warmup_seconds, train=True):
        return BenchRow(workload, setting.name, images_per_s, 1.0, "peer", 1.0, warmup_seconds, 100, train, setting)

    rows = [row("a", eager, 1000, 2), row("a", compiled, 2000, 52),  # 0.05 s saved per step, 50 s to repay
            row("b", eager, 1000, 2), row("b", compiled, 900, 40),  # slower compiled
            row("c", eager, 1000, 1, train=False), row("c", compiled, 2000, 11, train=False),  # 0.5 ms per image
            row("d", compiled, 5000, 9, train=False)]  # no eager row to compare with
    assert compile_payback(rows) == [
        f"a: torch.compile repays its 50 s warm-up after about 1,000 steps (compiling is chosen automatically "
        f"from {COMPILE_FROM_STEPS:,} steps)",
        f"b: torch.compile never repays its warm-up: compiled steps were not faster (compiling is chosen "
        f"automatically from {COMPILE_FROM_STEPS:,} steps)",
        f"c: torch.compile repays its 10 s warm-up after about 20,000 images (compiling is chosen automatically "
        f"from {INFERENCE_COMPILE_FROM_IMAGES:,} images)"]


def test_each_compiled_row_compiles_afresh(tmp_path, monkeypatch):
    """A compiled row reused the kernels an earlier row of the same net had made and reported a warm-up
    near 0 s: each now compiles with Dynamo's code dropped and empty cache folders, put back after."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    counter = CompileCounter()
    traced = torch.compile(lambda x: x.sin() * 2, backend=counter)
    traced(torch.ones(3)), traced(torch.ones(3))
    assert counter.frame_count == 1, "compiled once, then reused"
    with fresh_compile_caches(tmp_path):
        inductor_dir = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        traced(torch.ones(3))
        assert counter.frame_count == 2, "compiled again"
        torch.compile(lambda x: x.cos() + 1)(torch.ones(3))
    assert any(os.scandir(inductor_dir)), "inductor wrote its kernels to the fresh folder"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "theirs") and "TRITON_CACHE_DIR" not in os.environ


def test_fused_optimizer_makes_the_same_update():
    model = build_model("resnet20")
    twin = build_model("resnet20")
    twin.load_state_dict(model.state_dict())
    config = OptimConfig(lr=0.1, weight_decay=5e-4)
    plain, fused = build_optimizer(model, config), build_optimizer(twin, config, fused=True)
    for _ in range(3):
        for net, optimizer in ((model, plain), (twin, fused)):
            torch.manual_seed(1)
            net(torch.randn(4, 3, 16, 16)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset", ["cifar", "standard"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_training_step_never_waits_for_the_device(tmp_path, monkeypatch, device, preset):
    """Loss and hits stay on the device; the loop reads them back twice a second, so the host queues the next
    steps while the device works. The presets' crops and flips and the weights' EMA are part of the step. On CUDA any
    synchronising call raises; on the CPU, where nothing waits, every way a tensor's value reaches Python does,
    and so does making a tensor from host data (its copy to a GPU would wait)."""
    data = write_shapes(tmp_path / "s", size=16, per_class=8, seed=0, progress=False)
    dataset = open_dataset(data)
    config = TrainConfig(data=str(data), model="resnet20", batch_size=16, augment=AugmentConfig(preset=preset),
                         grad_clip=1.0, label_smoothing=0.1, ema=0.9, amp=True, device=device, quiet=True,
                         out=str(tmp_path))
    trainer = Trainer(resolve(config, dataset), dataset, tmp_path, Console(quiet=True))
    trainer.model.train()
    batches = iter(trainer.train_loader.epoch(0))
    trainer._train_step(*next(batches))  # the first step sets up (cudnn autotuning, optimizer state)
    images, labels = next(batches)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    else:
        def read_back(*args, **kwargs):
            raise AssertionError("the training step read a value back from the device")

        def copy_in(*args, **kwargs):
            raise AssertionError("the training step copied new host data to the device")
        for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, method, read_back)
        for function in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, function, copy_in)
    try:
        loss, correct, _ = trainer._train_step(images, labels)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert loss.device.type == correct.device.type == device
    assert trainer.step == 2 and 0 < loss.item() < 10 and 0 <= correct.item() <= len(labels)


@pytest.mark.parametrize(("preset", "in_memory"), [("cifar", True), ("standard", False), ("strong", True)])
def test_no_training_step_reads_a_value_on_a_stand_in_device(tmp_path, preset, in_memory):
    """PyTorch's meta device stands in for a GPU: its tensors hold no values, so reading one in Python raises,
    as a read from a GPU would wait, and mixing one with host tensors raises, as on CUDA. Every preset runs, from
    memory or through the file loader, the strong one's kornia ops too, with mixup, CutMix, class weights,
    gradient accumulation, clipping and the EMA: kornia draws its random parameters on the host and moves them
    without waiting (kornia's design). Moving the augmentation to the device, as `.to(device)` did, put
    kornia's random draws there: on a GPU its colour jitter then read its order and four factors back as Python
    values every step, five waits; here that move raises."""
    data = write_shapes(tmp_path / "s", size=16, per_class=8, seed=0, progress=False)
    dataset = open_dataset(data)
    config = TrainConfig(data=str(data), model="resnet20", batch_size=16, class_weights="auto", grad_clip=1.0,
                         augment=AugmentConfig(preset=preset, mixup=0.2, cutmix=1.0), label_smoothing=0.1, ema=0.9,
                         amp=False, in_memory=in_memory, workers=0, device="meta", quiet=True,
                         out=str(tmp_path))
    trainer = Trainer(resolve(config, dataset), dataset, tmp_path, Console(quiet=True))
    trainer.model.train()
    batches = iter(trainer.train_loader.epoch(0))
    for _ in range(2):  # two steps of two accumulated batches: their class weights are summed on the device
        (_, _, _, _), (loss, correct, _, weight) = trainer._optimizer_step([next(batches), next(batches)])
    assert loss.device.type == correct.device.type == weight.device.type == "meta" and trainer.step == 2


def test_compile_and_cuda_graphs_are_chosen_by_run_length_size_and_processes(tmp_path, monkeypatch):
    assert auto_compile("cpu", 10**6)[0] is False
    assert auto_compile("cuda", COMPILE_FROM_STEPS - 1)[0] is False
    assert auto_compile("cuda", COMPILE_FROM_STEPS)[0] is True
    assert auto_compile_mode("cuda", 32, processes=1)[0] == "reduce-overhead"  # launch-bound: CUDA graphs
    assert auto_compile_mode("cuda", 224, processes=1)[0] == "default"
    assert auto_compile_mode("cuda", 32, processes=2)[0] == "default"
    assert auto_compile_mode("cpu", 32, processes=1)[0] == "default"  # CUDA graphs exist only on CUDA
    data = write_shapes(tmp_path / "s", size=16, per_class=4, seed=0, progress=False)
    dataset = open_dataset(data)
    off = TrainConfig(data=str(data), device="cpu")
    assert (resolve(off, dataset).compile, resolve(off, dataset).compile_mode) == (False, None)
    assert compile_log(off, resolve(off, dataset), len(dataset.train), 1) == \
        "torch.compile: off (chosen automatically only on CUDA; this run is on cpu)"
    on_cpu = TrainConfig(data=str(data), device="cpu", compile=True)
    assert resolve(on_cpu, dataset).compile_mode == "default"
    assert "CUDA graphs exist only on CUDA" in compile_log(on_cpu, resolve(on_cpu, dataset), len(dataset.train), 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, as far as resolve asks
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked = TrainConfig(data=str(data), device="cuda", compile=True)  # as asked; the mode chosen for 16 px
    assert (resolve(asked, dataset).compile, resolve(asked, dataset).compile_mode) == (True, "reduce-overhead")
    assert resolve(asked, dataset, processes=2).compile_mode == "default"
    assert "mode reduce-overhead: CUDA graphs" in compile_log(asked, resolve(asked, dataset), len(dataset.train), 1)
    chosen = TrainConfig(data=str(data), compile=True, compile_mode="max-autotune")
    assert resolve(chosen, dataset).compile_mode == "max-autotune"
    assert compile_log(chosen, resolve(chosen, dataset), len(dataset.train), 1) == ""  # nothing was automatic
    with pytest.raises(ConfigError, match="--compile-mode"):
        TrainConfig(data=str(data), compile_mode="fastest")


def test_bf16_channels_last_path_follows_the_fp32_loss_curve(tmp_path):
    data = write_shapes(tmp_path / "s", size=16, per_class=30, seed=4, progress=False)
    common = dict(data=str(data), model="resnet20", epochs=2, batch_size=32, workers=0, quiet=True, report=False,
                  optim=OptimConfig(lr=0.05), augment=AugmentConfig(preset="none"), out=str(tmp_path / "runs"))
    losses = {}
    for name, fast in (("fp32", False), ("bf16", True)):
        run = train(TrainConfig(**common, name=name, amp=fast, channels_last=fast)).run_dir
        with open(run / "metrics.csv", newline="") as f:
            losses[name] = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)  # bf16 keeps about 3 significant digits
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16


def test_a_compiled_run_compiles_the_model_once(tmp_path, monkeypatch):
    """The epoch's shorter last batch compiled the model again, for any batch size, and later batches ran
    that graph: compiled runs leave it out (unless it is the only batch)."""
    from torch._dynamo.testing import CompileCounter

    data = write_shapes(tmp_path / "s", size=16, per_class=3, seed=0, progress=False)
    dataset = open_dataset(data)
    assert len(dataset.train) % 8, "a shorter last batch"
    counter, compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, dynamic=None: compile(model, backend=counter,
                                                                                      dynamic=dynamic))
    common = dict(data=str(data), model="resnet20", model_options={"layers": (1, 1, 1)}, epochs=2, device="cpu",
                  quiet=True, report=False, out=str(tmp_path), ema=None)
    train(TrainConfig(**common, batch_size=8, compile=True, name="compiled"))
    assert counter.frame_count == 1
    for batch_size, compiled, batches in [(8, True, len(dataset.train) // 8), (8, False, len(dataset.train) // 8 + 1),
                                          (64, True, 1)]:
        config = resolve(TrainConfig(**common, batch_size=batch_size, compile=compiled), dataset)
        trainer = Trainer(config, dataset, tmp_path / f"{batch_size}-{compiled}", Console(quiet=True))
        assert len(trainer.train_loader) == batches and trainer.steps_per_epoch == batches
        assert sum(len(labels) for _, labels in trainer.train_loader.epoch(0)) == min(batch_size * batches,
                                                                                       len(dataset.train))


def test_the_compiled_step_follows_the_eager_loss_curve(tmp_path):
    """torch.compile (inductor, as chosen automatically on CUDA) changes how the step runs, not what it
    computes: the same first steps give the same losses, so the weights got the same updates."""
    data = write_shapes(tmp_path / "s", size=16, per_class=8, seed=0, progress=False)
    dataset = open_dataset(data)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        config = TrainConfig(data=str(data), model="resnet20", model_options={"layers": (1, 1, 1)}, batch_size=16,
                             augment=AugmentConfig(preset="none"), optim=OptimConfig(lr=0.05), compile=compiled,
                             device="cpu", quiet=True, out=str(tmp_path))
        trainer = Trainer(resolve(config, dataset), dataset, tmp_path, Console(quiet=True))
        trainer.model.train()
        losses[compiled] = [trainer._train_step(*batch)[0].item() for batch in trainer.train_loader.epoch(0)]
    assert len(losses[True]) == 5
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
