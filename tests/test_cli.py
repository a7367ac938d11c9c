"""The command line: each verb end to end, errors as one line."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import residual
from residual.cli import main
from residual.data.shapes import write_shapes
from residual.models import model_info
from residual.predict import Prediction
from residual.progress import LOG_WIDTH
from residual.tables import models_table, predictions_table


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables to the terminal width


def test_models_table_lists_counts(capsys):
    assert main(["models", "resnet1*"]) == 0
    out = capsys.readouterr().out
    for row in ["resnet18", "11.690", "1.814", "resnet101", "44.549", "7.801", "resnet110", "1.728"]:
        assert row in out
    assert "resnet50" not in out


def test_a_narrow_console_folds_long_paths_and_keeps_model_names_whole():
    # Off a terminal rich renders 80 columns, and cut what did not fit to "/photos/field_cam…": which image
    # was which could not be read.
    paths = [f"/photos/{'field_camera_number_seven_' * 3}{i:05d}.png" for i in range(2)]
    table = predictions_table([Prediction(path, [(0, "hexagon", 0.9), (1, "circle", 0.1)]) for path in paths], "t")
    out = io.StringIO()
    Console(file=out, width=60).print(table)
    image_cells = [line.split("│")[1].strip() for line in out.getvalue().splitlines() if line.startswith("│")]
    assert "".join(image_cells) == "".join(paths)
    out = io.StringIO()
    Console(file=out, width=80).print(models_table([model_info("resnet110"), model_info("resnet20")]))
    assert "resnet110 " in out.getvalue() and "…" not in out.getvalue()


def test_off_a_terminal_tables_keep_their_natural_width_unless_columns_says(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS")
    assert main(["models", "preact_resnet152"]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if "preact_resnet152" in line]
    assert "pre-activation ResNet-152 (He et al. 2016)" in row and 120 < len(row) <= LOG_WIDTH
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["models", "preact_resnet152"]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) == 100


def test_summary_of_a_model_name_and_of_a_model_file(tmp_path, capsys):
    assert main(["summary", "resnet20", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "resnet20 layer by layer, for one 32 px image" in out
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in out.splitlines() if line.count("│") > 3}
    assert rows["layer3"] == "64 x 8 x 8" and rows["fc"] == "10" and "layer1.0" not in rows
    assert "269,722" in out and "40.6" in out  # the parameters and MACs (M) `residual models` gives
    model = residual.create_model("resnet20", num_classes=3)
    residual.save_model(model, tmp_path / "three.safetensors")
    assert main(["summary", str(tmp_path / "three.safetensors"), "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in out.splitlines() if line.count("│") > 3}
    assert rows["layer3"] == "64 x 16 x 16" and rows["fc"] == "3" and rows["layer1.0"] == "16 x 64 x 64"
    assert main(["summary", "resnet50.tv2_in1k", "--depth", "1"]) == 0  # published weights: their architecture
    out = capsys.readouterr().out
    assert "for one 224 px image" in out and "25,557,032" in out
    assert main(["summary", "vgg16"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["summary", str(tmp_path / "three.onnx")]) == 2
    assert "give the .safetensors model file" in capsys.readouterr().err


def test_unknown_pattern_is_a_one_line_error(capsys):
    assert main(["models", "vgg*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model matches 'vgg*'") and err.count("\n") == 1


def test_pretrained_lists_torchvision_weights(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["pretrained", "resnet50*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50.tv_in1k" in out and "resnet50.tv2_in1k" in out and "80.858" in out and "232/224" in out
    assert main(["pretrained", "resnet50"]) == 0  # an architecture's name lists its weights
    out = capsys.readouterr().out
    assert "resnet50.tv_in1k" in out and "resnet50.tv2_in1k" in out and "resnet101" not in out
    assert main(["pretrained", "vgg*"]) == 2  # it printed an empty table
    err = capsys.readouterr().err
    assert err.startswith("error: no pretrained weights match 'vgg*'") and err.count("\n") == 1


def test_download_without_network_says_where_to_put_the_file(capsys, monkeypatch):
    monkeypatch.setenv("RESIDUAL_WEIGHTS_MIRROR", "http://127.0.0.1:9")  # discard port: nothing listens
    assert main(["download", "resnet18.tv_in1k", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot download" in err and "resnet18-f37072fd.pth" in err and err.count("\n") == 1


def test_convert_then_info(tmp_path, capsys):
    source = residual.create_model("resnet20", num_classes=3).eval()
    checkpoint = tmp_path / "trained.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, checkpoint)
    names = tmp_path / "classes.txt"
    names.write_text("apple\nbanana\ncherry\n")
    out = tmp_path / "fruit.safetensors"
    assert main(["convert", str(checkpoint), "--arch", "resnet20", "--classes", str(names), "-o", str(out)]) == 0
    model = residual.load_model(out).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), source(x)) and model.class_names == ["apple", "banana", "cherry"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "resnet20" in info and "apple, banana, cherry" in info and "269," in info
    assert "(0.4914, 0.4822, 0.4465) / (0.247, 0.2435, 0.2616)" in info  # CIFAR's statistics, not 16 digits each
    assert main(["convert", str(checkpoint), "--arch", "resnet18"]) == 2
    assert "does not fit resnet18" in capsys.readouterr().err


def test_shapes_and_check_data_commands(tmp_path, capsys):
    assert main(["shapes", str(tmp_path / "s"), "--size", "16", "--per-class", "10", "--masks"]) == 0
    assert "train/val/test = 10/10/10 per class, with masks/" in capsys.readouterr().out
    assert len(list((tmp_path / "s" / "masks" / "val").rglob("*.png"))) == 100
    assert main(["check-data", str(tmp_path / "s")]) == 0
    out, err = capsys.readouterr()
    assert "unreadable images" in out and "1.0x" in out
    assert err == "", "where stderr is not a terminal the progress bar leaves nothing (it left a blank line)"
    (tmp_path / "s" / "train" / "star" / "00001.png").write_bytes(b"broken")
    assert main(["check-data", str(tmp_path / "s")]) == 1
    assert "00001.png" in capsys.readouterr().out


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_draw_on_a_terminal_only(terminal):
    from io import StringIO

    from rich.console import Console

    from residual.progress import progress_bar

    stream = StringIO()
    with progress_bar("checking images", console=Console(file=stream, force_terminal=terminal)) as bar:
        bar.advance(bar.add_task("check", total=2), 2)
    assert ("checking images" in stream.getvalue()) == terminal and (stream.getvalue() == "") != terminal


def test_demo_trains_to_95_percent_on_the_cpu(demo_run):
    """The real `make demo` recipe (about 2 minutes on 2 cores), with its reports."""
    assert demo_run["code"] == 0
    out, run = demo_run["out"], demo_run["run"]
    for name in ("model.safetensors", "metrics.csv", "curves.png", "config.yaml", "last.pt", "train_batch.png",
                 "report.html"):
        assert (run / name).is_file() and name in out
    for name in ("metrics.json", "confusion_matrix.png", "reliability.png", "roc_curves.png", "highest_loss.png"):
        assert (run / name).is_file() and (run / "test-report" / name).is_file()
    best = residual.read_metadata(run / "model.safetensors")["extra"]
    assert best["val_top1"] >= 0.95, best
    assert "test top-1" in out and "95% interval" in out and "Next:" in out
    assert f"residual calibrate {run / 'model.safetensors'}" in out


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "residual", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("residual ")


def test_importing_residual_leaves_matplotlib_and_its_backend_to_the_user(tmp_path):
    """A notebook's backend stays its own, and matplotlib's figures are imported only when one is drawn (the
    import cost every command 0.4 s)."""
    code = f"""
import sys, matplotlib
matplotlib.use("svg")  # a user's choice, as a notebook's inline backend
import residual
from residual.train.history import plot_curves
assert "matplotlib.figure" not in sys.modules, "imported with the package"
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
import matplotlib.pyplot as plt
row = dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=0.9, val_top1=0.6, lr=0.1)
plot_curves([row, dict(row, epoch=2)], __import__("pathlib").Path(r"{tmp_path}") / "curves.png", "a run")
assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [], "drawing went through pyplot"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_experiment_commands_parse_and_report_errors_in_one_line(tmp_path, capsys):
    assert main(["experiment", "degradation", "--depths", "20", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --depths needs two or more") and err.count("\n") == 1
    assert main(["experiment", "degradation", "--depths", "20,1202", "--out", str(tmp_path)]) == 2
    assert "plain1202" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--tiny", "--steps", "0"], "argument --steps: must be at least 1, got 0"),  # divided by zero
    (["bench", "--tiny", "--peak-tflops", "-5"], "argument --peak-tflops: must be above 0, got -5"),
    (["shapes", "out", "--size", "0"], "argument --size: must be at least 1, got 0"),  # Pillow's traceback
    (["experiment", "degradation", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),  # 30 epochs
    (["eval", "model", "data", "--gallery", "-1"], "argument --gallery: must be at least 0, got -1"),
    (["export", "model", "--samples", "0"], "argument --samples: must be at least 1, got 0"),  # a traceback
    (["quantize", "model", "--calib", "data", "--calib-size", "0"], "argument --calib-size: must be at least 1"),
    (["quantize", "model", "--calib", "data", "--max-drop", "-1"], "argument --max-drop: must be at least 0, got -1"),
    (["similar", "model", "query", "gallery", "--topk", "0"], "argument --topk: must be at least 1, got 0"),
    (["export", "model", "--samples", "x"], "argument --samples: invalid int value: 'x'"),
])
def test_counts_and_rates_out_of_range_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(("argv", "message"), [
    # argparse alone said "residual: error: unrecognized arguments: photos", naming neither command nor cause.
    (["finetune", "resnet18", "photos"],
     "residual finetune: error: unrecognized arguments: photos (finetune takes one dataset and read 'resnet18' as "
     "it: name the architecture with --model NAME and pretrained weights with --from NAME|PATH)"),
    (["train", "photos", "--bogus"], "residual train: error: unrecognized arguments: --bogus"),
    (["eval", "model.safetensors", "photos", "more"], "residual eval: error: unrecognized arguments: more"),
])
def test_an_argument_a_command_does_not_take_is_named_with_the_command(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err[-1] == message
    assert len(err) <= 6  # the usage above it is short (train's full usage line ran to 70 lines)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device every write to fails as full")
def test_predictions_sent_to_a_full_disk_are_a_one_line_error(tmp_path):
    data = write_shapes(tmp_path / "s", size=8, per_class=1, seed=0, progress=False)
    net = residual.create_model("resnet20", num_classes=10)
    net.class_names = sorted(folder.name for folder in (data / "test").iterdir())
    residual.save_model(net, tmp_path / "model.safetensors")
    with open("/dev/full", "w") as full:  # `residual predict ... > FILE` on a disk with no room left
        done = subprocess.run([sys.executable, "-m", "residual", "predict", str(tmp_path / "model.safetensors"),
                               str(data / "test"), "--format", "csv", "--quiet"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "error: out of disk space (or quota) writing it; free some space and run again\n"


def test_what_this_user_may_not_read_or_write_is_named_never_left_out(tmp_path):
    # As an owner without privileges (a user namespace mapping us to uid 1000 where we are root, since root reads
    # everything), so permissions apply. os.walk used to leave an unreadable folder out without a word.
    as_user = ["unshare", "-U", "--map-user=1000", "--map-group=1000"] if os.geteuid() == 0 else []
    if as_user and subprocess.run([*as_user, "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -U (a user namespace) to run without root's access to every file")
    data = write_shapes(tmp_path / "s", size=8, per_class=2, seed=0, progress=False)
    net = residual.create_model("resnet20", num_classes=10)
    net.class_names = sorted(folder.name for folder in (data / "test").iterdir())
    model = tmp_path / "model.safetensors"
    residual.save_model(net, model)
    unreadable_image = data / "train" / "square" / "00000.png"
    hidden = data / "val" / ".Trash-1000"  # another user's, left beside the images: never read, so no error
    hidden.mkdir()
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    for path, mode in [(data / "test" / "circle", 0), (unreadable_image, 0), (hidden, 0), (read_only, 0o555)]:
        path.chmod(mode)

    def predict(images, *flags):
        return subprocess.run([*as_user, sys.executable, "-m", "residual", "predict", str(model), str(images),
                               "--format", "csv", "--quiet", *flags], capture_output=True, text=True, timeout=120)

    try:
        done = predict(data / "test")
        assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
            f"error: {data / 'test' / 'circle'}: its files cannot be listed (Permission denied); make it readable "
            f"for this user, or move it away")
        done = predict(data / "train" / "square")
        assert done.returncode == 1 and "00001.png" in done.stdout and "00000.png" not in done.stdout
        assert (f"{unreadable_image}: cannot be read (Permission denied); make it readable for this user"
                in done.stderr)  # said "corrupt or truncated image"
        done = predict(data / "val", "--out", read_only / "predictions.csv")  # listed despite the hidden folder
        assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
            f"error: {read_only / 'predictions.csv'}: Permission denied (this user cannot write there); give a "
            f"folder it can write to")
    finally:
        for path in (data / "test" / "circle", unreadable_image, hidden, read_only):
            path.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/sys/vm/overcommit_memory").exists()
                    or Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
                    reason="needs Linux's overcommit check, which refuses an allocation larger than memory and swap")
def test_running_out_of_memory_is_a_one_line_error_saying_what_to_lower(tmp_path):
    data = write_shapes(tmp_path / "s", size=8, per_class=1, seed=0, progress=False)
    net = residual.create_model("resnet20", num_classes=10)
    net.class_names = sorted(folder.name for folder in (data / "test").iterdir())
    residual.save_model(net, tmp_path / "model.safetensors")
    image = next((data / "test" / "circle").iterdir())
    done = subprocess.run([sys.executable, "-m", "residual", "predict", str(tmp_path / "model.safetensors"),
                           str(image), "--image-size", "1000000", "--quiet"], capture_output=True, text=True,
                          timeout=120)  # 3 TB for the resized image
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == ("error: out of memory (the CPU's: it asked for 2794.0 GiB at once); "
                                            "lower --batch-size, or the image size")


def test_a_gpu_out_of_memory_says_what_training_can_lower():
    from residual.cli import out_of_memory_message

    # torch's own wording of a CUDA allocation that failed (torch.OutOfMemoryError)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                   "79.19 GiB of which 1.06 GiB is free.")
    assert out_of_memory_message(error, "train") == (
        "out of memory (the GPU's: it asked for 2.00 GiB more); lower --batch-size (--accumulate K keeps the "
        "effective batch; --amp and --grad-checkpointing need less memory per image), or the image size")
    assert out_of_memory_message(RuntimeError("shapes do not match"), "train") is None  # stays a traceback


def test_predictions_piped_to_a_reader_that_stops_early_end_quietly(tmp_path):
    # `residual predict ... | head`: more output than a pipe holds (64 KB), so writing fails once head is gone.
    data = write_shapes(tmp_path / "s", size=8, per_class=200, seed=0, progress=False)
    net = residual.create_model("resnet20", num_classes=10)
    net.class_names = sorted(folder.name for folder in (data / "test").iterdir())
    residual.save_model(net, tmp_path / "model.safetensors")
    process = subprocess.Popen([sys.executable, "-m", "residual", "predict", str(tmp_path / "model.safetensors"),
                                str(data / "train"), "--format", "csv", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("image,")
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and err == ""


def test_a_device_or_training_option_that_cannot_be_used_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    data = write_shapes(tmp_path / "s", size=8, per_class=2, seed=0, progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    for flags, message in [(["--device", "cuda"], "error: --device cuda: no CUDA GPU is usable here"),
                           (["--device", "tpu"], "error: --device tpu: not a device"),
                           (["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
                           (["--image-size", "0"], "error: --image-size must be at least 1"),  # was taken as auto
                           (["--grad-clip", "-1"], "error: --grad-clip is the largest gradient norm"),
                           (["--momentum", "2"], "error: --momentum must be in [0, 1)"),
                           (["--mixup", "-1"], "error: --mixup must be 0 (off) or more"),  # was a traceback
                           (["--crop-scale", "2"], "error: --crop-scale is a fraction"),
                           (["--workers", "-2"], "error: --workers must be at least 0"),  # was a traceback
                           # These three left a run directory behind, or (0) were taken as auto:
                           (["--model", "nonesuch"], "error: unknown model 'nonesuch'"),
                           (["--drop-rate", "1.5"], "error: drop_rate must be in [0, 1)"),
                           (["--layer-lr-decay", "0"], "error: --layer-lr-decay is the lr's factor")]:
        assert main(["train", str(data), "--out", str(tmp_path / "runs"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing was started
    model = tmp_path / "model.safetensors"
    net = residual.create_model("resnet20", num_classes=10)
    net.class_names = sorted(folder.name for folder in (data / "test").iterdir())
    residual.save_model(net, model)
    for verb, flags, message in [("predict", ["--topk", "0"], "error: --topk must be at least 1"),  # was a traceback
                                 ("predict", ["--batch-size", "0"], "error: --batch-size must be at least 1"),
                                 ("eval", ["--batch-size", "-1"], "error: --batch-size must be at least 1")]:
        assert main([verb, str(model), str(data / "test"), *flags]) == 2
        err = capsys.readouterr().err.strip()  # predict's progress line may leave a blank line first
        assert err.startswith(message) and "\n" not in err
    # A resumed run goes on as its config.yaml says: --epochs here was silently ignored.
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "50", "--augment", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume {tmp_path / 'run'} goes on as its config.yaml says, so --epochs, "
                          f"--augment would be ignored") and err.count("\n") == 1
    assert main(["finetune", "--resume", str(tmp_path / "run")]) == 2  # finetune's own default is no setting
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'run'}: no such run directory")  # said "no last.pt"
    for not_a_run in [model, tmp_path / "s"]:
        assert main(["train", "--resume", str(not_a_run)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {not_a_run} is not a run directory (it has no config.yaml)")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data: s\n")  # a run killed before its first checkpoint
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'run'}: no last.pt to resume from") and err.count("\n") == 1
    assert main(["lr-find", str(data), "--steps", "1", "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith("error: the range test needs --steps of 2 or more")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, and a run asks for the second
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["bench", "--tiny", "--device", "cuda:1"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda:1: this machine has 1 CUDA GPU(s)")
