"""Checkpoint formats.

Two kinds, both plain dicts of tensors and Python scalars, loadable with
`torch.load(..., weights_only=True)`:

- training state (`state.pt` inside each Ray Train checkpoint directory): model,
  optimizer, scheduler, grad scaler, EMA, epoch, step and metric history. An
  interrupted `pretrain` resumes from the newest one.
- final weights (`artifacts/pretrain/model.pt`, a DVC output): the model's (or
  its EMA's) state dict with what is needed to rebuild it: variant, classes,
  distillation head, layer scale (part of the architecture: H has a `gamma`
  per residual branch), input size and normalisation. Weights that started
  from a release (below) record it as `source` (path, sha256, format, mode).

Pretraining can also start from released weights (`model.weights`, a file
under `weights/`): an official iFormer release (`{"model": state dict in the
official names, "args": Namespace, ...}`, distilled ones with a
`classifier_dist` head), a timm state dict (`.pth` or `.safetensors`) or a
final weights file of ours. They are read without running code from the file
(`iformer.weights`) and either fine-tuned or passed through unchanged
(`train.epochs: 0`); :func:`check_release` validates them against the config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PipelineError
from . import layout
from .integrity import sha256  # noqa: F401 (the stages' name for it)

FORMAT = "iformer-pipeline/weights/v1"
STATE_FILE = "state.pt"


def load_any(path: Path, what: str) -> dict:
    """A checkpoint dict of either kind (or a foreign one), loaded safely; errors name `what`."""
    import torch  # here, not at the top: the report reads `describe_source` without torch

    path = Path(path)
    missing(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors of many types
        first = next((line for line in str(err).splitlines() if line.strip()), "")[:200]
        raise PipelineError(f"{what}: {path} is not a loadable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{what}: {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def save_weights(path: Path, state_dict: dict, *, variant: str, num_classes: int, distillation: bool,
                 classes: list[str], image_size: int, mean, std, layer_scale: float | None = None,
                 extra: dict | None = None) -> str:
    """Write final weights atomically; returns their sha256.

    `layer_scale` None records what the state dict holds (the official 1e-6
    when it has `gamma` parameters, else 0).
    """
    import torch

    from iformer.models import layer_scale_from

    layer_scale = layer_scale_from(state_dict, layer_scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": FORMAT,
        "variant": variant,
        "num_classes": int(num_classes),
        "distillation": bool(distillation),
        "layer_scale": float(layer_scale),
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


def missing(path: Path, what: str) -> None:
    """One error when `path` is not a file: a directory is called one, not said to be missing."""
    if Path(path).is_dir():
        raise PipelineError(f"{what}: {path} is a directory, not a checkpoint file")
    if not Path(path).is_file():
        raise PipelineError(f"{what}: {path} does not exist")


def load_weights(path: Path, what: str = "checkpoint", expect_variant: str | None = None) -> dict:
    obj = load_any(path, what)
    if obj.get("format") != FORMAT:
        raise PipelineError(f"{what}: {path} is not a pretrain weights file (format {obj.get('format')!r})")
    if expect_variant and obj["variant"] != expect_variant:
        raise PipelineError(f"{what}: {path} holds {obj['variant']}, but model.variant is {expect_variant}")
    return obj


def pretrain_weights(root: Path, expect_variant: str | None = None,
                     classes: list[str] | None = None) -> tuple[Path, dict]:
    """The pretrain stage's `model.pt` and its contents, for the stages after it.

    One error naming the file when it is missing, not a pretrain weights file,
    of another variant than `expect_variant`, or trained on other `classes`
    than the prepare stage lists, or whose bytes are not those the pretrain
    manifest records (`checkpoint_sha256`).
    """
    path = layout.stage_dir("pretrain", root) / "model.pt"
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run the pretrain stage first (dvc repro pretrain)")
    verify_pretrain(path, root)
    weights = load_weights(path, "pretrain weights", expect_variant=expect_variant)
    if classes is not None and weights["classes"] != list(classes):
        raise PipelineError(f"{path}: holds {weights['num_classes']} classes, but the prepare stage lists "
                            f"{len(classes)} (or other names); rerun pretrain")
    return path, weights


def verify_pretrain(path: Path, root: Path) -> None:
    """The pretrain stage's `model.pt` must hash to the `checkpoint_sha256` its manifest records."""
    from .integrity import verify
    from .outputs import read_stage_manifest

    verify(path, (read_stage_manifest("pretrain", root) or {}).get("checkpoint_sha256"), "pretrain")


def layer_scale_of(obj: dict) -> float:
    """The layer scale a weights file was built with (files written before it was recorded: from its keys)."""
    from iformer.models import layer_scale_from

    return layer_scale_from(obj["state_dict"], obj.get("layer_scale"))


def build_from_weights(obj: dict):
    """Rebuild the model of a weights file (its architecture as recorded) and load it strictly."""
    from iformer.models import build_model

    model = build_model(obj["variant"], obj["num_classes"], distillation=obj["distillation"],
                        layer_scale=layer_scale_of(obj))
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


# -- released weights (model.weights) ------------------------------------------------
#: How each format is named in logs, manifests and MLflow tags.
FORMAT_NAMES = {"official": "official iFormer release", "timm": "timm state dict", "pipeline": "pipeline weights"}


@dataclass
class Release:
    """Released weights checked against the config: where pretraining starts."""

    path: Path
    shown: str              # as model.weights names it
    sha256: str
    format: str             # a FORMAT_NAMES key
    num_classes: int | None  # its head's (None: no head)
    distillation: bool      # it has a distillation head
    state: dict | None      # timm's names; kept only when passed through

    def source(self, mode: str) -> dict:
        """What a weights file made from it records as `source` (`mode`: passed through / fine-tuned)."""
        return {"path": self.shown, "sha256": self.sha256, "format": self.format, "mode": mode}


def describe_source(source: dict | None) -> str:
    """Where weights came from, in a phrase: `weights/iFormer_m.pth (official iFormer release, sha256 1a2b3c4d, passed through)`."""
    if not source:
        return "trained by the pretrain stage from random initialisation"
    return (f"{source['path']} ({FORMAT_NAMES.get(source['format'], source['format'])}, "
            f"sha256 {source['sha256'][:8]}, {source['mode']})")


def source_tags(source: dict | None) -> dict[str, str]:
    """MLflow tags naming the released weights a model came from (none for one trained from scratch)."""
    return {f"iformer.weights_source.{k}": str(v) for k, v in (source or {}).items()}


def read_file(path: Path, what: str):
    """What a weights file or training state holds, loaded safely (a release's globals allowed)."""
    from iformer.weights import read_checkpoint

    missing(path, what)
    try:
        return read_checkpoint(path)
    except Exception as err:  # pickle, zip, safetensors and weights_only errors of many types
        text = str(err)
        refused = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
        if refused:
            raise PipelineError(f"{what}: {path} is refused: it asks for the Python global "
                                f"{refused.group(1) or refused.group(2)}, which no known weights format needs "
                                "(loaded with weights_only=True)") from None
        first = next((line for line in text.splitlines() if line.strip()), "")[:200]
        raise PipelineError(f"{what}: {path} is not a loadable checkpoint ({type(err).__name__}: {first})") from None


def read_release(path: Path, what: str) -> tuple[dict, str, dict]:
    """(state dict in timm's names, format, the file's own metadata) of a weights file, loaded safely."""
    from iformer.weights import WeightsError, classifier_state_dict

    obj = read_file(path, what)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"], "pipeline", obj
    try:
        state, naming = classifier_state_dict(obj)
    except WeightsError as err:
        raise PipelineError(f"{what}: {path} {err}") from None
    return state, naming, {}


def check_release(path: Path, shown: str, *, variant: str, layer_scale: float, num_classes: int,
                  classes: list[str], pass_through: bool, what: str = "model.weights") -> Release:
    """Released weights that start `variant` (strictly, head aside), or pass through unchanged.

    Passed through they must be the whole network, head included, for the
    `num_classes` prepared classes; fine-tuned, a head of another class count
    starts afresh. Errors name `what` and the file.
    """
    import torch
    from iformer.distill import state_dict_mismatch
    from iformer.models import build_model, has_layer_scale
    from iformer.weights import WeightsError, head_classes, is_distilled, starting_state, variants_fitting

    state, fmt, meta = read_release(path, what)
    if meta and meta["variant"] != variant:
        raise PipelineError(f"{what}: {path} holds {meta['variant']}, but model.variant is {variant}")
    if has_layer_scale(state) != (layer_scale > 0):
        has = "has layer scale (a gamma per residual branch)" if has_layer_scale(state) else "has no layer scale"
        raise PipelineError(f"{what}: {path} {has}, but model.layer_scale builds {variant} with "
                            f"{layer_scale:g}; set model.layer_scale to {1e-6 if has_layer_scale(state) else 0}")
    with torch.device("meta"):  # shapes only: nothing allocated
        model = build_model(variant, num_classes, layer_scale=layer_scale)
    try:
        starting_state(model.state_dict(), state)
    except WeightsError as err:
        from ..config import VARIANTS

        fits = variants_fitting(state, [v for v in VARIANTS if v != variant])
        hint = f" (its shapes fit {' / '.join(fits)})" if fits else ""
        raise PipelineError(f"{what}: {path} is not an {variant} checkpoint{hint}: {err}") from None
    heads = head_classes(state)
    if pass_through:
        if heads != num_classes:
            has = "has no classifier head" if heads is None else f"has a {heads}-class head"
            raise PipelineError(f"{what}: {path} {has}, but the prepared data has {num_classes} classes; passing "
                                "weights through (train.epochs: 0) needs the same classes (train at least one "
                                "epoch to fit a new head)")
        if meta and meta["classes"] != classes:
            raise PipelineError(f"{what}: {path} was trained on other classes than the prepared data's; passing "
                                "it through (train.epochs: 0) needs the same classes")
        with torch.device("meta"):  # the very network model.pt will record, heads included
            whole = build_model(variant, num_classes, distillation=is_distilled(state), layer_scale=layer_scale)
        mismatch = state_dict_mismatch(whole.state_dict(), state)
        if mismatch:
            raise PipelineError(f"{what}: {path} does not load into {variant} as it is: {mismatch}")
    return Release(path, shown, sha256(path), fmt, heads, is_distilled(state), state if pass_through else None)


def load_resume_state(path: Path, what: str = "train.resume_from") -> dict:
    """A training state of ours to continue; a weights file is pointed to model.weights."""
    from iformer.weights import WeightsError, classifier_state_dict

    path = path / STATE_FILE if path.is_dir() else path
    obj = read_file(path, what)
    if isinstance(obj, dict) and {"variant", "epoch", "model"} <= set(obj):
        return obj
    fmt = "pipeline" if isinstance(obj, dict) and obj.get("format") == FORMAT else None
    try:
        fmt = fmt or classifier_state_dict(obj)[1]
    except WeightsError:
        raise PipelineError(f"{what}: {path} is not a training state (a Ray checkpoint dir or its "
                            f"{STATE_FILE})") from None
    raise PipelineError(f"{what}: {path} holds weights ({FORMAT_NAMES[fmt]}), not a training state; to start "
                        "from weights, put the file in weights/ and set model.weights")


def load_release_into(model, path: Path) -> list[str]:
    """Load released weights into `model` (head aside, strictly); returns the heads left fresh."""
    from iformer.weights import starting_state

    state, _, _ = read_release(path, "model.weights")
    full, fresh = starting_state(model.state_dict(), state)
    model.load_state_dict(full, strict=True)
    return fresh
