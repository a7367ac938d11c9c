"""Same weights, same outputs as torchvision's own ResNets.

torchvision is optional (it has no CPU build on the project's machines), so this
skips where it cannot be imported; it runs on the GPU machine, which has it.
"""

import pytest
import torch

import residual

try:
    import torchvision.models as tv_models
except Exception as error:  # absent, or present without its compiled ops
    pytest.skip(f"torchvision not importable ({type(error).__name__}: {error})", allow_module_level=True)

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
         "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", NAMES)
def test_same_parameters_and_outputs_as_torchvision(name):
    torch.manual_seed(0)
    reference = getattr(tv_models, name)(weights=None).eval()
    with torch.no_grad():  # move BN away from its initial values so the comparison means something
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
    ours = residual.create_model(name).eval()
    theirs = reference.state_dict()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.items()]
    ours.load_state_dict(theirs, strict=True)
    reference, ours = reference.to(DEVICE), ours.to(DEVICE)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(4, 3, 224, 224, device=DEVICE)
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    assert (expected - actual).abs().max().item() <= 1e-5
