"""Knowledge distillation (Hinton et al. 2015): the model being trained also learns a trained teacher's
softened probabilities, which carry how alike the classes look to it, not only which one is right.
The usual way to make a small, fast model (resnet18) nearly as good as a big one (resnet50).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import Preprocessing, prepare_for_inference
from ..weights import ModelFileError, load_model


def distillation_sum(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """The KL divergence from the teacher's probabilities to the student's, both softened by `temperature`,
    times temperature² (so the gradients keep their size whatever the temperature), summed over the images,
    each times its weight (its class weight): a sum, like the trainer's cross-entropy."""
    log_student = F.log_softmax(logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_image = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(1) * temperature ** 2
    return per_image.sum() if weights is None else (per_image * weights).sum()


class Teacher:
    """A trained model file, frozen, on the training device (BN folded; bf16 on CUDA), that takes the
    student's normalised batch (renormalised first where the two models' mean and std differ) and gives
    logits in the data's class order."""

    def __init__(self, path: str, classes: list[str], student: Preprocessing, device: torch.device):
        try:
            model = load_model(path)
        except ModelFileError as error:  # which flag named the file, as well as what is wrong with it
            raise ConfigError(f"--teacher {error}") from None
        if model.multi_label:
            raise ConfigError(f"--teacher {path}: a multi-label model; distillation learns a softmax over classes "
                              f"that exclude each other")
        names = model.class_names or []
        if sorted(names) != sorted(classes):
            missing = sorted(set(classes) - set(names)) or sorted(set(names) - set(classes)) or ["(unnamed)"]
            raise ConfigError(f"--teacher {path}: its classes are not the data's (differing: {', '.join(missing[:5])}"
                              f"{', ...' if len(missing) > 5 else ''}); distil from a model trained on these classes")
        # Matched by name: a folder sorts "10" before "2", a CSV of numbers after it.
        self.order = torch.tensor([names.index(name) for name in classes], device=device)
        self.model = prepare_for_inference(model, device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        shape = (1, -1, 1, 1)
        to_tensor = lambda values: torch.tensor(values, device=device).view(shape)  # noqa: E731
        teacher = model.preprocessing
        self.scale = to_tensor(student.std) / to_tensor(teacher.std)
        self.shift = (to_tensor(student.mean) - to_tensor(teacher.mean)) / to_tensor(teacher.std)
        self.same_normalisation = (student.mean, student.std) == (teacher.mean, teacher.std)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (float32) for a batch normalised as the student's input."""
        if not self.same_normalisation:
            x = x * self.scale + self.shift
        return self.model(x)[:, self.order]
