"""Knowledge distillation: the loss is Hinton et al.'s, the teacher sees what the student sees, and a
student trained on a teacher's predictions alone learns the teacher's answers, not the labels."""

import re

import numpy as np
import pytest
import torch

import residual
from residual.cli import main
from residual.data.shapes import write_shapes
from residual.data.transforms import normalize
from residual.evaluate import evaluate
from residual.models.preprocessing import CIFAR_EVAL, IMAGENET_EVAL
from residual.train.distill import Teacher, distillation_sum
from residual.train.history import plot_curves, read_metrics, write_metrics


def test_the_distillation_term_is_the_softened_kl_divergence_times_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    for temperature in (1.0, 4.0):
        p = (teacher / temperature).softmax(1)
        q = (student / temperature).softmax(1)
        by_hand = (p * (p.log() - q.log())).sum(1) * temperature ** 2
        assert distillation_sum(student, teacher, temperature) == pytest.approx(by_hand.sum().item(), rel=1e-5)
        weighted = distillation_sum(student, teacher, temperature, weights)
        assert weighted == pytest.approx((by_hand * weights).sum().item(), rel=1e-5)
    assert distillation_sum(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_takes_the_student_batch_in_its_own_normalisation(tmp_path):
    names = ["a", "b", "c"]
    teacher = residual.create_model("resnet20", num_classes=3).eval()
    teacher.class_names, teacher.preprocessing = names, IMAGENET_EVAL
    residual.save_model(teacher, tmp_path / "teacher.safetensors")
    pixels = torch.rand(4, 3, 32, 32)
    frozen = Teacher(str(tmp_path / "teacher.safetensors"), names, CIFAR_EVAL, torch.device("cpu"))
    with torch.no_grad():
        expected = teacher(normalize(pixels, IMAGENET_EVAL))
    torch.testing.assert_close(frozen(normalize(pixels, CIFAR_EVAL)), expected, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in frozen.model.parameters())
    # Classes are matched by name, whatever their order in the data.
    reordered = Teacher(str(tmp_path / "teacher.safetensors"), ["c", "a", "b"], CIFAR_EVAL, torch.device("cpu"))
    torch.testing.assert_close(reordered(normalize(pixels, CIFAR_EVAL)), expected[:, [2, 0, 1]], atol=1e-4, rtol=1e-4)
    with pytest.raises(residual.ConfigError, match=r"--teacher .*teacher.safetensors: its classes are not the "
                                                   r"data's \(differing: d\)"):
        Teacher(str(tmp_path / "teacher.safetensors"), ["a", "b", "c", "d"], CIFAR_EVAL, torch.device("cpu"))
    with pytest.raises(residual.ConfigError, match=r"^--teacher .*absent.safetensors: no such file"):
        Teacher(str(tmp_path / "absent.safetensors"), names, CIFAR_EVAL, torch.device("cpu"))


def test_in_training_the_teacher_converts_from_the_normalisation_the_student_is_given(tmp_path):
    """The trainer gives the student the data's mean and std when it builds the loaders; the teacher must
    convert from those, not from the new model's defaults (until 2026-12-04 it did: a teacher trained on
    the same data saw its input shifted by up to 0.2 standard deviations)."""
    from rich.console import Console

    from residual.data.datasets import open_dataset
    from residual.train.config import TrainConfig, resolve
    from residual.train.trainer import Trainer

    data = write_shapes(tmp_path / "shapes", size=16, per_class=4, seed=1, progress=False)
    dataset = open_dataset(data)
    config = resolve(TrainConfig(data=str(data), model="resnet20", quiet=True), dataset)
    first = Trainer(config, dataset, tmp_path / "first", Console(quiet=True))
    teacher = first.model.eval()
    teacher.class_names = list(dataset.classes)
    residual.save_model(teacher, tmp_path / "teacher.safetensors")
    config = resolve(TrainConfig(data=str(data), model="resnet20", quiet=True,
                                 teacher=str(tmp_path / "teacher.safetensors")), dataset)
    student = Trainer(config, dataset, tmp_path / "student", Console(quiet=True))
    assert student.model.preprocessing == teacher.preprocessing and student.model.preprocessing != CIFAR_EVAL
    assert student.teacher.same_normalisation
    images, _ = next(student.val_loader.epoch(0))
    x = normalize(images.float() / 255, student.model.preprocessing)
    with torch.no_grad():
        torch.testing.assert_close(student.teacher(x), teacher(x), atol=1e-4, rtol=1e-4)


def test_a_student_of_a_teacher_alone_learns_the_teachers_answers_not_the_labels(tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", size=16, per_class=24, seed=1, progress=False)
    # A teacher that is wrong on purpose: whatever the image, it says "hexagon". Learning from it alone, a
    # student must say hexagon too, though a tenth of the images are hexagons.
    teacher = residual.create_model("resnet20", num_classes=10).eval()
    teacher.class_names = sorted(path.name for path in (data / "train").iterdir())
    hexagon = teacher.class_names.index("hexagon")
    teacher.fc.weight.data.zero_()
    teacher.fc.bias.data = torch.nn.functional.one_hot(torch.tensor(hexagon), 10).float() * 5
    residual.save_model(teacher, tmp_path / "hexagon.safetensors")
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "4", "--batch-size", "32", "--lr", "0.1",
                 "--teacher", str(tmp_path / "hexagon.safetensors"), "--distill-weight", "1", "--quiet", "--no-report",
                 "--out", str(tmp_path / "runs"), "--name", "student"]) == 0
    result = evaluate(residual.load_model(tmp_path / "runs" / "student" / "model.safetensors"), data, "val",
                      gallery_size=0, workers=0)
    assert np.mean(result.labels == hexagon) == pytest.approx(0.1)  # what the labels would have taught
    assert np.mean(result.probs.argmax(1) == hexagon) > 0.9  # 1.0 on an Intel Xeon, 2026-12-04
    # The log keeps the loss's two terms apart: the teacher's alone is minimised, so the labels' grows apart
    # from it, and the train loss is the teacher's term (its weight is 1).
    history = read_metrics(tmp_path / "runs" / "student" / "metrics.csv")
    assert [row["train_loss"] for row in history] == pytest.approx([row["train_distill_loss"] for row in history],
                                                                   rel=1e-5)
    assert history[-1]["train_label_loss"] > 1.0 > history[-1]["train_distill_loss"]
    assert history[-1]["train_distill_loss"] < history[0]["train_distill_loss"]
    capsys.readouterr()
    assert main(["train", str(data), "--teacher", str(tmp_path / "hexagon.safetensors"), "--distill-weight", "0"]) == 2
    assert "--distill-weight is the distillation term's share of the loss: in (0, 1], got 0" in capsys.readouterr().err


def test_with_a_teacher_the_train_loss_is_the_weighted_sum_of_its_terms_and_both_are_logged(tmp_path, capsys):
    data = write_shapes(tmp_path / "shapes", size=16, per_class=12, seed=2, progress=False)
    teacher = residual.create_model("resnet20", num_classes=10).eval()
    teacher.class_names = sorted(path.name for path in (data / "train").iterdir())
    residual.save_model(teacher, tmp_path / "teacher.safetensors")
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--batch-size", "32", "--mixup", "0.2",
                 "--teacher", str(tmp_path / "teacher.safetensors"), "--distill-weight", "0.3", "--quiet",
                 "--no-report", "--out", str(tmp_path / "runs"), "--name", "student"]) == 0
    (row,) = read_metrics(tmp_path / "runs" / "student" / "metrics.csv")
    assert row["train_loss"] == pytest.approx(0.7 * row["train_label_loss"] + 0.3 * row["train_distill_loss"],
                                              rel=1e-5)
    assert min(row["train_label_loss"], row["train_distill_loss"]) > 0
    # The epoch line prints the three to 4 decimals (metrics.csv's rounded values may round to another last digit).
    printed = re.search(r"train loss ([0-9.]+) \(labels ([0-9.]+), teacher ([0-9.]+)\)", capsys.readouterr().out)
    assert [float(value) for value in printed.groups()] == pytest.approx(
        [row["train_loss"], row["train_label_loss"], row["train_distill_loss"]], abs=1.5e-4)
    # Without a teacher there are no such columns.
    assert main(["train", str(data), "--model", "resnet20", "--epochs", "1", "--batch-size", "32", "--quiet",
                 "--no-report", "--out", str(tmp_path / "runs"), "--name", "alone"]) == 0
    assert "train_label_loss" not in (tmp_path / "runs" / "alone" / "metrics.csv").read_text()


def test_a_run_resumed_from_before_the_terms_were_logged_keeps_its_metrics_readable(tmp_path):
    # Its first epochs have no terms: their cells stay empty, and are left out when read back.
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "train_acc": 0.5, "val_top1": 0.4, "lr": 0.1},
               {"epoch": 2, "train_loss": 0.8, "val_loss": 1.0, "train_acc": 0.6, "val_top1": 0.5, "lr": 0.1,
                "train_label_loss": 0.9, "train_distill_loss": 0.7}]
    write_metrics(history, tmp_path / "metrics.csv")
    first, second = read_metrics(tmp_path / "metrics.csv")
    assert "train_label_loss" not in first and second["train_distill_loss"] == 0.7
    plot_curves([first, second], tmp_path / "curves.png", "resumed")
    assert (tmp_path / "curves.png").stat().st_size > 0
