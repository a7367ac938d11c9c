import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test reads or writes the user's real weight cache, or reaches a mirror."""
    monkeypatch.setenv("RESIDUAL_HOME", str(tmp_path / "residual-home"))
    monkeypatch.delenv("RESIDUAL_WEIGHTS_MIRROR", raising=False)
    torch.manual_seed(0)
    return tmp_path / "residual-home"
