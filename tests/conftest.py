import os

import pytest
import torch

# `make test` runs the suite in parallel processes (pytest-xdist). Each takes its share of the cores,
# and so do the processes it starts: two processes of two threads each on two cores wait on each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

# Tests that share an expensive fixture run in one process, so it is built once (`--dist loadgroup`).
_SHARED_BY_MODULE = {"test_distributed.py": "two torchrun workers", "test_finetune.py": "the pretrained model"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):  # its marker is unknown without it (--strict-markers)
        return
    for item in items:
        if "demo_run" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("the demo model"))
        elif item.path.name in _SHARED_BY_MODULE:
            item.add_marker(pytest.mark.xdist_group(_SHARED_BY_MODULE[item.path.name]))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test reads or writes the user's real weight cache, or reaches a mirror."""
    monkeypatch.setenv("RESIDUAL_HOME", str(tmp_path / "residual-home"))
    monkeypatch.delenv("RESIDUAL_WEIGHTS_MIRROR", raising=False)
    torch.manual_seed(0)
    return tmp_path / "residual-home"


@pytest.fixture
def stand_in_pinning(monkeypatch):
    """Page-locking stood in for on a machine without a GPU: `Tensor.pin_memory` returns a copy marked
    `page_locked`, so the DataLoader's own pinning function can run and be checked."""
    def marked_copy(tensor):
        copy = tensor.clone()
        copy.page_locked = True
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", marked_copy)


@pytest.fixture
def untrained(tmp_path):
    """A model file of an untrained CIFAR ResNet-20 with three classes, a, b and c: for what needs a model, not
    a good one (the video and stream tests)."""
    import residual

    model = residual.create_model("resnet20", num_classes=3)
    model.class_names = ["a", "b", "c"]
    residual.save_model(model, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`residual demo` run once for the session: its console output and run directory.

    The demo test checks the run itself; the evaluate, predict and explain tests use its
    trained model, so the suite trains the real demo model once.
    """
    import contextlib
    import io
    import os

    from residual.cli import main

    root = tmp_path_factory.mktemp("demo")
    output = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"  # rich wraps to the terminal width
    try:
        with contextlib.redirect_stdout(output):
            code = main(["demo", "--out", str(root / "runs"), "--data", str(root / "shapes")])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    run = root / "runs" / "resnet20-shapes"
    return {"code": code, "out": output.getvalue(), "run": run, "model": run / "model.safetensors",
            "data": root / "shapes"}
