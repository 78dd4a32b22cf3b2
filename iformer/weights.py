"""Classifier weights from files: official iFormer releases and timm state dicts, read safely.

:func:`read_checkpoint` loads a `.pth` with `torch.load(weights_only=True)`,
lending (for that load only) the few globals the official v0.9 releases carry
besides tensors: their training arguments (`argparse.Namespace`) and numpy
scalars with their dtypes (`numpy.core.multiarray.scalar` as numpy 1 wrote
them, `numpy._core...` as numpy 2 does). Anything else a pickle asks for is
refused by torch. A `.safetensors` file (timm's hub format) holds tensors only.

:func:`classifier_state_dict` turns what a file holds into timm's parameter
names with timm's own `checkpoint_filter_fn`, and says which naming it found:
`official` (the release's `downsample_layers.*`, `stages.<i>.<j>.block.*`,
`classifier.*`) or `timm`. :func:`starting_state` fits such weights to a
network whose head may differ (another class count: the head starts afresh).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from timm.models.iformer import checkpoint_filter_fn

from .distill import state_dict_mismatch
from .models import build_model, default_layer_scale, has_layer_scale

OFFICIAL = "official"
TIMM = "timm"
#: The classifier heads of timm's IFormer (`RepVitClassifier`): the class head and DeiT's distillation head.
HEADS = ("head.head.", "head.head_dist.")
_OFFICIAL_KEY = re.compile(r"^(downsample_layers\.|classifier\.|stages\.\d+\.\d+\.)")


class WeightsError(ValueError):
    """A file that holds no iFormer classifier weights of the expected network."""


def release_globals() -> list:
    """The non-tensor globals of an official release: its argparse arguments and numpy scalars."""
    numpy_core = np._core if hasattr(np, "_core") else np.core
    scalar = numpy_core.multiarray.scalar
    return [argparse.Namespace, np.dtype, type(np.dtype("float64")), scalar,
            (scalar, "numpy.core.multiarray.scalar")]


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, loaded without running code from it (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # The context manager removes its globals on exit, even ones allowed before it
    # (e.g. numpy.dtype for mmengine checkpoints): only lend the missing ones.
    allowed = set(torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals([g for g in release_globals() if g not in allowed]):
        return torch.load(path, map_location="cpu", weights_only=True)


def classifier_state_dict(obj) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors of a classifier checkpoint in timm's names, the naming found: OFFICIAL or TIMM).

    Takes the dict a release holds (`model` inside), `{"state_dict": ...}` or a
    bare state dict; other entries (arguments, epoch, optimizer) are ignored.
    """
    if not isinstance(obj, dict):
        raise WeightsError(f"holds a {type(obj).__name__}, not a state dict")
    inner = obj
    for key in ("model", "state_dict"):
        if isinstance(inner.get(key), dict):
            inner = inner[key]
    tensors = {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError("holds no weights (no tensors at the top, under model or under state_dict)")
    naming = OFFICIAL if any(_OFFICIAL_KEY.match(k) for k in tensors) else TIMM
    return checkpoint_filter_fn(tensors, None), naming


def head_classes(state: dict) -> int | None:
    """The class count of a state dict's head (None: it has none)."""
    weight = state.get("head.head.l.weight")
    return None if weight is None else int(weight.shape[0])


def is_distilled(state: dict) -> bool:
    return any(k.startswith("head.head_dist.") for k in state)


def _is_head(key: str) -> bool:
    return key.startswith(HEADS)


def starting_state(model_state: dict, weights: dict) -> tuple[dict, list[str]]:
    """`model_state` with `weights` in it; returns it and the heads that keep the model's own values.

    Every tensor outside the heads must be in `weights` with its shape (else
    WeightsError). A head whose tensors `weights` lacks or has in another shape
    (another class count) keeps the model's fresh initialisation; heads the
    model does not have (a distillation head) are left out.
    """
    body = {k: v for k, v in weights.items() if not _is_head(k)}
    mismatch = state_dict_mismatch({k: v for k, v in model_state.items() if not _is_head(k)}, body)
    if mismatch:
        raise WeightsError(mismatch)
    state = {**model_state, **body}
    fresh = []
    for head in HEADS:
        own = {k: v for k, v in model_state.items() if k.startswith(head)}
        if not own:
            continue
        if all(k in weights and tuple(weights[k].shape) == tuple(v.shape) for k, v in own.items()):
            state.update({k: weights[k] for k in own})
        else:
            fresh.append(head.rstrip("."))
    return state, fresh


def variants_fitting(state: dict, variants) -> list[str]:
    """Which of `variants` have exactly this state dict's tensors outside the heads (shapes only)."""
    fits = []
    for variant in variants:
        with torch.device("meta"):
            model = build_model(variant, 1, layer_scale=default_layer_scale("iformer_h") if has_layer_scale(state)
                                else 0.0)
        try:
            starting_state(model.state_dict(), state)
        except WeightsError:
            continue
        fits.append(variant)
    return fits
