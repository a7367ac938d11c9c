import pytest
import torch


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
