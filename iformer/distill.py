"""DeiT-style hard distillation (Touvron et al., 2021), as the paper trains it.

The student is timm's IFormer built with `distillation=True` (a second,
distillation head); in training it returns `(cls_logits, dist_logits)`, in eval
the average of both heads. The loss is
`(1 - alpha) * base(cls_logits, targets) + alpha * CE(dist_logits, argmax teacher(x))`
with alpha = 0.5 in the paper.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .models import layer_scale_from

IFORMER_VARIANTS = frozenset(timm.list_models("iformer_*"))


class TeacherError(ValueError):
    """The teacher checkpoint does not fit the configured teacher network."""


def load_teacher(arch: str, checkpoint: Path, num_classes: int) -> nn.Module:
    """timm `arch` with weights from a local file (no hub download), frozen, eval mode."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise TeacherError(f"{checkpoint} does not exist or is not a file")
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TeacherError(f"{checkpoint} is not a loadable checkpoint ({type(err).__name__})") from None
    state = obj
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise TeacherError(f"{checkpoint} holds no state dict")
    # An iFormer teacher's layer scale is part of its architecture: as its weights have it.
    extra = {"layer_scale_init_value": layer_scale_from(state)} if arch in IFORMER_VARIANTS else {}
    try:
        teacher = timm.create_model(arch, pretrained=False, num_classes=num_classes, **extra)
    except RuntimeError as err:  # unknown model name
        raise TeacherError(f"unknown teacher architecture {arch!r}: {err}") from None
    mismatch = state_dict_mismatch(teacher.state_dict(), state)
    if mismatch:
        raise TeacherError(f"{checkpoint} is not a {arch} with {num_classes} classes: {mismatch}")
    teacher.load_state_dict(state, strict=True)
    teacher.requires_grad_(False)
    return teacher.eval()


def state_dict_mismatch(expected: dict, got: dict, shown: int = 3) -> str:
    """'' if `got` loads strictly into a model with `expected`, else a short summary with counts.

    torch's own message lists every key, tens of kilobytes for a foreign network.
    """
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(v.shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            more = f", +{len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} keys {label} ({', '.join(keys[:shown])}{more})")
    return "; ".join(parts)


class HardDistillationLoss(nn.Module):
    def __init__(self, base: nn.Module, teacher: nn.Module, alpha: float = 0.5):
        super().__init__()
        self.base = base
        self.teacher = teacher
        self.alpha = alpha

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = outputs
        base_loss = self.base(cls_logits, targets)
        with torch.no_grad():
            teacher_labels = self.teacher(inputs).argmax(dim=1)
        dist_loss = F.cross_entropy(dist_logits, teacher_labels)
        return (1.0 - self.alpha) * base_loss + self.alpha * dist_loss
