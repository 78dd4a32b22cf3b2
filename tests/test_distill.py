"""Distillation does what DeiT's hard distillation says: the loss by hand, and a teacher that steers the student.

DeiT (Touvron et al., 2021), as the official iFormer trains it: with the
student's two heads `(cls, dist)` and the teacher's hard decision
`t = argmax teacher(x)`,

    loss = (1 - alpha) * base(cls, y) + alpha * CE(dist, t)

where `base` is the configured criterion (cross-entropy with label smoothing
eps: target (1 - eps) * onehot(y) + eps / C on every class) and the
distillation term is plain cross-entropy on the teacher's label.
"""
import copy
import math

import pytest
import timm
import torch
from torch import nn

from conftest import ROOT, TINY, deep_update, make_repo
from pipeline.core import checkpoint
from pipeline.config import Config, load_config


def _log_softmax(z: list[float]) -> list[float]:
    top = max(z)
    norm = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - norm for v in z]


def _ce(z: list[float], y: int, eps: float = 0.0) -> float:
    """Cross-entropy of logits `z` against label `y` smoothed by `eps`, written out."""
    logp = _log_softmax(z)
    return -(1 - eps) * logp[y] - eps / len(z) * sum(logp)


def _hand_loss(cls, dist, labels, teacher_labels, eps: float, alpha: float) -> float:
    n = len(labels)
    base = sum(_ce(z, y, eps) for z, y in zip(cls, labels)) / n
    kd = sum(_ce(z, t) for z, t in zip(dist, teacher_labels)) / n
    return (1 - alpha) * base + alpha * kd


class LookupTeacher(nn.Module):
    """A teacher whose logits are the first C values of each input: its answer is ours to choose."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x.flatten(1)[:, :self.classes]


def constant_teacher(arch: str, classes: int, answer: int) -> nn.Module:
    """A real timm network that answers `answer` for every image: final layer weights 0, bias one-hot."""
    teacher = timm.create_model(arch, num_classes=classes)
    with torch.no_grad():
        fc = teacher.get_classifier()
        fc.weight.zero_()
        fc.bias.zero_()
        fc.bias[answer] = 5.0
    return teacher


def _configured(**distill) -> Config:
    """The committed params.yaml (its label smoothing and alpha), with distillation on."""
    cfg = load_config(ROOT / "params.yaml").to_dict()
    cfg["distill"].update(enabled=True, **distill)
    return Config.model_validate(cfg)


def test_hard_distillation_loss_equals_deits_formula_by_hand(tmp_path):
    from iformer.distill import HardDistillationLoss
    from pipeline.classify.worker import build_components

    torch.save(constant_teacher("resnet10t", 3, answer=2).state_dict(), tmp_path / "teacher.pt")
    cfg = _configured(teacher="resnet10t", teacher_checkpoint=str(tmp_path / "teacher.pt"))
    eps, alpha = cfg.aug.label_smoothing, cfg.distill.alpha
    assert eps > 0 and 0 < alpha < 1, "the committed recipe smooths labels and mixes both terms"
    c = build_components(cfg, 3, torch.device("cpu"), steps_per_epoch=1, teacher_path=str(tmp_path / "teacher.pt"))
    assert isinstance(c.distill, HardDistillationLoss)

    cls = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [3.0, -2.0, 1.0]]
    dist = [[0.0, 1.0, 2.0], [1.2, -0.3, 0.4], [0.7, 0.7, -1.1], [-1.0, 0.0, 2.5]]
    labels = [0, 2, 1, 1]
    outputs = (torch.tensor(cls), torch.tensor(dist))

    # The configured loss with the loaded teacher (a real resnet10t that always answers 2).
    images = torch.randn(4, 3, 32, 32)
    got = c.distill(images, outputs, torch.tensor(labels)).item()
    assert got == pytest.approx(_hand_loss(cls, dist, labels, [2, 2, 2, 2], eps, alpha), rel=1e-5)

    # A teacher whose answer differs per image: the distillation term follows each argmax.
    teacher_logits = [[0.0, 0.0, 9.0], [5.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.2, 0.1, 0.0]]
    loss = HardDistillationLoss(c.criterion, LookupTeacher(3), alpha)
    got = loss(torch.tensor(teacher_logits), outputs, torch.tensor(labels)).item()
    want = _hand_loss(cls, dist, labels, [2, 0, 1, 0], eps, alpha)
    assert got == pytest.approx(want, rel=1e-5)
    # Not the smoothed CE on the teacher's labels, nor the unsmoothed one on ours (the two easy slips).
    assert abs(got - _hand_loss(cls, dist, labels, [2, 0, 1, 0], 0.0, alpha)) > 1e-3
    assert abs(got - ((1 - alpha) * sum(_ce(z, y, eps) for z, y in zip(cls, labels)) / 4
                      + alpha * sum(_ce(z, t, eps) for z, t in zip(dist, [2, 0, 1, 0])) / 4)) > 1e-3


# -- a teacher changes what the student learns --------------------------------------
def _head_predictions(repo) -> dict:
    """Each head's predicted class on the prepared validation images, and their labels."""
    from torch.utils.data import DataLoader

    from pipeline.classify.datasets import ImageListDataset, Prepared, build_transforms

    weights = checkpoint.load_weights(repo.path / "artifacts/pretrain/model.pt", expect_variant="iformer_t")
    assert weights["distillation"]
    model = checkpoint.build_from_weights(weights)
    seen = {"cls": [], "dist": []}
    model.head.head.register_forward_hook(lambda m, i, o: seen["cls"].append(o.argmax(1)))
    model.head.head_dist.register_forward_hook(lambda m, i, o: seen["dist"].append(o.argmax(1)))
    cfg = load_config(repo.path / "params.yaml")
    data = ImageListDataset(Prepared.load(repo.path / "artifacts/prepare"), "val", build_transforms(cfg, False))
    labels = []
    with torch.no_grad():
        for images, y in DataLoader(data, batch_size=128):
            model(images)
            labels.append(y)
    return {k: torch.cat(v) for k, v in seen.items()} | {"labels": torch.cat(labels)}


@pytest.mark.slow
def test_a_teacher_that_always_answers_k_pulls_the_distillation_head_to_k(tmp_path):
    """The real pretrain stage on digits, twice, with teachers that always answer 3 and 7."""
    # Four epochs at 32 px: the class head reaches ~0.98 val top-1 (two leave its eval-mode answers at chance).
    params = deep_update(copy.deepcopy(TINY), {"train": {"epochs": 4},
                                                "distill": {"enabled": True, "teacher": "resnet10t"}})
    repo = make_repo(tmp_path / "repo", params)
    repo.stage("prepare")
    found = {}
    for k in (3, 7):
        torch.save(constant_teacher("resnet10t", 10, answer=k).state_dict(), repo.path / f"teachers/always_{k}.pt")
        repo.set_params({"distill": {"teacher_checkpoint": f"teachers/always_{k}.pt"}})
        repo.stage("pretrain")
        found[k] = _head_predictions(repo)
    shares = {}
    for k, pred in found.items():
        n = len(pred["labels"])
        shares[k] = {head: {c: (pred[head] == c).sum().item() / n for c in (3, 7)} for head in ("cls", "dist")}
        truth = {c: (pred["labels"] == c).sum().item() / n for c in (3, 7)}
        print(f"\nteacher always {k}: share of 3 / 7 among predictions: distillation head "
              f"{shares[k]['dist'][3]:.2f} / {shares[k]['dist'][7]:.2f}, class head {shares[k]['cls'][3]:.2f} / "
              f"{shares[k]['cls'][7]:.2f}, labels {truth[3]:.2f} / {truth[7]:.2f}; class head top-1 "
              f"{(pred['cls'] == pred['labels']).float().mean():.2f}")
        assert truth[k] < 0.15, "the digits are balanced: k is one class in ten"
        assert shares[k]["dist"][k] >= 0.9, shares  # the distillation head answers as its teacher
        assert shares[k]["cls"][k] <= 0.3, shares   # the class head, trained on the labels, does not
    # The control: the same data and recipe with the other teacher pulls the same head elsewhere.
    assert shares[3]["dist"][7] <= 0.1 and shares[7]["dist"][3] <= 0.1, shares
