"""Checkpoint formats.

Two kinds, both plain dicts of tensors and Python scalars, loadable with
`torch.load(..., weights_only=True)`:

- training state (`state.pt` inside each Ray Train checkpoint directory): model,
  optimizer, scheduler, grad scaler, EMA, epoch, step and metric history. An
  interrupted `pretrain` resumes from the newest one.
- final weights (`artifacts/pretrain/model.pt`, a DVC output): the model's (or
  its EMA's) state dict with what is needed to rebuild it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import PipelineError

FORMAT = "iformer-pipeline/weights/v1"
STATE_FILE = "state.pt"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_any(path: Path, what: str) -> dict:
    """A checkpoint dict of either kind (or a foreign one), loaded safely; errors name `what`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what}: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors of many types
        first = next((line for line in str(err).splitlines() if line.strip()), "")[:200]
        raise PipelineError(f"{what}: {path} is not a loadable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{what}: {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def save_weights(path: Path, state_dict: dict, *, variant: str, num_classes: int, distillation: bool,
                 classes: list[str], image_size: int, mean, std, extra: dict | None = None) -> str:
    """Write final weights atomically; returns their sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": FORMAT,
        "variant": variant,
        "num_classes": int(num_classes),
        "distillation": bool(distillation),
        "classes": list(classes),
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(body, tmp)
    tmp.replace(path)
    return sha256(path)


def load_weights(path: Path, what: str = "checkpoint", expect_variant: str | None = None) -> dict:
    obj = load_any(path, what)
    if obj.get("format") != FORMAT:
        raise PipelineError(f"{what}: {path} is not a pretrain weights file (format {obj.get('format')!r})")
    if expect_variant and obj["variant"] != expect_variant:
        raise PipelineError(f"{what}: {path} holds {obj['variant']}, but model.variant is {expect_variant}")
    return obj


def build_from_weights(obj: dict):
    """Rebuild the model of a weights file and load it strictly."""
    from iformer.models import build_model

    model = build_model(obj["variant"], obj["num_classes"], distillation=obj["distillation"])
    model.load_state_dict(obj["state_dict"], strict=True)
    return model.eval()


def load_training_state(path: Path, what: str = "resume checkpoint") -> dict:
    obj = load_any(path, what)
    if "model" not in obj or "epoch" not in obj:
        raise PipelineError(f"{what}: {path} is not a training state (no model/epoch)")
    return obj


def check_compatible(meta: dict, *, variant: str, num_classes: int, distillation: bool, what: str, path) -> None:
    """A checkpoint to resume or start from must be of the configured network."""
    got = (meta.get("variant"), meta.get("num_classes"), bool(meta.get("distillation")))
    want = (variant, num_classes, distillation)
    if got != want:
        raise PipelineError(
            f"{what}: {path} is for variant={got[0]} num_classes={got[1]} distillation={got[2]}, "
            f"but the config asks for variant={want[0]} num_classes={want[1]} distillation={want[2]}"
        )
