"""Activation ("gradient") checkpointing: the same step, with batch norm's statistics updated once, for a
fraction of the memory kept for the backward pass; and a training run that is the same run with it."""

import copy

import pytest
import torch

from residual.cli import _train_config, build_parser
from residual.data.shapes import write_shapes
from residual.models import build_model
from residual.models import resnet as resnet_module
from residual.train import TrainConfig, train
from residual.train.checkpoint import load_checkpoint
from residual.train.optim import OptimConfig


def saved_bytes_and_step(model, x):
    """(bytes autograd keeps for the backward pass, the loss) of one forward and backward pass."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    return sum(saved), loss.detach()


@pytest.mark.parametrize("name, options, size", [("resnet20", {}, 32), ("resnet50", {}, 64),
                                                  ("preact_resnet110", {"layers": (2, 2, 2)}, 32),
                                                  ("seresnet18", {"drop_path_rate": 0.2}, 64)])
def test_a_checkpointed_step_equals_the_plain_one_with_the_statistics_updated_once(name, options, size):
    torch.manual_seed(0)
    plain = build_model(name, num_classes=5, **options).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    for step in range(2):  # the second step normalises with statistics the first one updated
        x = torch.randn(4, 3, size, size)
        torch.manual_seed(step)  # stochastic depth draws the same blocks in both (and again in the recomputation)
        plain_bytes, plain_loss = saved_bytes_and_step(plain, x)
        torch.manual_seed(step)
        checkpointed_bytes, checkpointed_loss = saved_bytes_and_step(checkpointed, x)
        assert torch.equal(plain_loss, checkpointed_loss)
    for (key, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=key)
    plain_state, checkpointed_state = plain.state_dict(), checkpointed.state_dict()
    for key in plain_state:  # running means, variances and batch counters: updated once per step, not twice
        assert torch.equal(plain_state[key], checkpointed_state[key]), key
    assert checkpointed_state["layer1.0.bn1.num_batches_tracked"] == 2
    assert checkpointed_bytes < plain_bytes / 2, (checkpointed_bytes, plain_bytes)


def test_without_gradients_nothing_is_recomputed_and_the_outputs_are_the_models():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model.set_grad_checkpointing()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    features = build_model("resnet20", features_only=True).eval()
    features.set_grad_checkpointing()
    assert [m.shape[1] for m in features(x)] == [16, 32, 64]


def test_compiled_the_step_keeps_one_update_of_the_statistics():
    # Dynamo takes no custom recomputation context; the compiled graph applies buffer updates once anyway.
    torch.manual_seed(0)
    plain = build_model("resnet20", num_classes=5, layers=(1, 1, 1)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    compiled = torch.compile(checkpointed, backend="aot_eager")
    torch._dynamo.reset()
    try:
        for _ in range(2):
            x = torch.randn(4, 3, 16, 16)
            plain(x).logsumexp(1).mean().backward()
            compiled(x).logsumexp(1).mean().backward()
    finally:
        torch._dynamo.reset()
    for (key, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5, msg=key)
    plain_state, checkpointed_state = plain.state_dict(), checkpointed.state_dict()
    for key in plain_state:
        torch.testing.assert_close(plain_state[key], checkpointed_state[key], rtol=0, atol=1e-6, msg=key)


def test_a_run_with_grad_checkpointing_is_the_same_run(tmp_path, monkeypatch):
    data = write_shapes(tmp_path / "data", size=16, per_class=8, seed=0, progress=False)
    common = dict(data=str(data), model="resnet20", epochs=2, batch_size=16, optim=OptimConfig(lr=0.05),
                  deterministic=True, quiet=True, report=False, out=str(tmp_path))
    plain = train(TrainConfig(name="plain", **common))
    recomputed = []

    def counted(block, x, checkpointed=resnet_module.checkpointed):
        recomputed.append(block)
        return checkpointed(block, x)

    monkeypatch.setattr(resnet_module, "checkpointed", counted)
    checkpointed = train(TrainConfig(name="checkpointed", grad_checkpointing=True, **common))
    steps = load_checkpoint(checkpointed.run_dir / "last.pt")["step"]
    assert len(recomputed) == 9 * steps, "each of resnet20's 9 blocks in each training step, nothing in validation"
    assert [row["train_loss"] for row in checkpointed.history] == [row["train_loss"] for row in plain.history]
    plain_weights = load_checkpoint(plain.run_dir / "last.pt")["model"]
    checkpointed_weights = load_checkpoint(checkpointed.run_dir / "last.pt")["model"]
    for key, value in plain_weights.items():
        torch.testing.assert_close(checkpointed_weights[key], value, rtol=0, atol=1e-5, msg=key)


def test_the_flag_reaches_the_training_config():
    args = build_parser().parse_args(["train", "data/", "--grad-checkpointing"])
    assert _train_config(args).grad_checkpointing is True
    assert _train_config(build_parser().parse_args(["train", "data/"])).grad_checkpointing is False
