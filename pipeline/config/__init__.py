"""The typed schema of `params.yaml`, the single source of every knob.

Every stage calls :func:`load_config` first. An unknown key, a wrong type or an
out-of-range value raises :class:`PipelineError` naming the dotted field path and
the bad value, before any work, MLflow run or Ray start-up happens.

The schema's defaults are the embedded default (the digits data set, a few
minutes on 2 CPU cores); the paper's ImageNet recipes live in
`config.recipes` (the dense presets in `config.presets`), `config.apply` builds
one, and `python -m pipeline.recipes NAME` writes it into `params.yaml`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import PipelineError
from .base import (MAX_BATCH, MAX_COUNT, MAX_EPOCHS, MAX_GPUS, MAX_ITERS, MAX_THREADS, MAX_WORKERS, Amp, LaxPath,
                   Location, Pair, Section, check_multiple_of_32, ordered_pair)
from .dense import DetectionConfig, SegmentationConfig
from .deploy import LATENCY_BACKENDS, CoreMLExportConfig, ExportConfig, FieldConfig, LatencyConfig, OnnxExportConfig
from .recipes import RECIPES
from .sweep import SweepConfig

__all__ = ["VARIANTS", "LATENCY_BACKENDS", "Config", "CoreMLExportConfig", "DetectionConfig", "ExportConfig",
           "LatencyConfig", "OnnxExportConfig", "SegmentationConfig", "SweepConfig", "dump_config", "load_config",
           "parse_config"]

#: timm's registered iFormer classifiers (a test checks them against timm's registry).
#: The sections that decide what pretraining computes: its Ray run is named by their hash.
TRAINING_SECTIONS = ("model", "data", "aug", "optim", "schedule", "train", "distill")
VARIANTS = ("iformer_t", "iformer_s", "iformer_m", "iformer_l", "iformer_l2", "iformer_h")


class ModelConfig(Section):
    variant: Literal[VARIANTS] = "iformer_t"  # type: ignore[valid-type]
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    # Layer-scale init value; 0 builds no layer scale. null: the official
    # configuration's (1e-6 for H, none for T/S/M/L/L2; Table 15).
    layer_scale: Optional[float] = Field(None, ge=0.0, le=1.0)
    # Start from released weights: a file under weights/ (an official iFormer
    # .pth, a timm state dict or .safetensors, or a pretrain model.pt), fine-tuned
    # for train.epochs or, with train.epochs 0, passed through unchanged. null:
    # random initialisation.
    weights: Optional[LaxPath] = None


class DataConfig(Section):
    # digits: ImageFolder made from scikit-learn's bundled handwritten digits.
    # imagefolder: ImageNet layout under `root` (train/<class>/*, val/<class>/*).
    source: Literal["digits", "imagefolder"] = "digits"
    root: Optional[LaxPath] = None
    image_size: int = Field(64, ge=32, le=1024)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # digits only
    split_seed: int = 0
    # header: PIL verify() (cheap); decode: full decode of every image; none: trust the files.
    verify: Literal["none", "header", "decode"] = "decode"
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    loader_workers: int = Field(0, ge=0, le=64)

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        return check_multiple_of_32(v)

    @model_validator(mode="after")
    def _root_for_imagefolder(self):
        if self.source == "imagefolder" and self.root is None:
            raise ValueError("data.root is required when data.source is 'imagefolder'")
        return self


class AugConfig(Section):
    rand_augment: Optional[str] = None  # timm auto_augment string, e.g. rand-m9-mstd0.5-inc1
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    # Brightness/contrast/saturation factor (timm's default); only without rand_augment. 0: off.
    color_jitter: float = Field(0.4, ge=0.0)
    scale: Pair = (0.7, 1.0)
    ratio: Pair = (0.75, 4.0 / 3.0)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    re_prob: float = Field(0.0, ge=0.0, le=1.0)
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    crop_pct: float = Field(1.0, gt=0.0, le=1.0)

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        return ordered_pair(v)

    @field_validator("rand_augment")
    @classmethod
    def _rand_augment_form(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("rand-"):
            raise ValueError(f"must be a timm RandAugment string starting 'rand-', got {v!r}")
        return v


class OptimConfig(Section):
    name: Literal["adamw"] = "adamw"
    # lr = base_lr * train.batch_size / base_batch_size (linear scaling rule).
    base_lr: float = Field(2e-3, gt=0.0, le=10.0)
    base_batch_size: int = Field(64, gt=0, le=MAX_BATCH)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: Pair = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    clip_grad: Optional[float] = Field(None, gt=0.0)
    # torch's fused AdamW kernel (CPU, CUDA): one pass over every weight a step; false: the
    # per-tensor loop torch picks on a CPU by default (timm's train.py: --opt-kwargs fused=True).
    fused: bool = True


class ScheduleConfig(Section):
    name: Literal["cosine"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0, le=MAX_EPOCHS)
    warmup_lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(1e-6, ge=0.0)


class TrainConfig(Section):
    epochs: int = Field(6, ge=0, le=MAX_EPOCHS)  # 0: no training, model.weights passed through as they are
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)  # global: split evenly over ray.num_workers
    seed: int = 0
    # Same seed, machine and thread count => same weights: deterministic algorithms (warning where
    # an op has none), and on GPU cuDNN picks its algorithms deterministically (slower than benchmark).
    deterministic: bool = True
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0)
    amp: Amp = "none"
    # NHWC activations and weights: oneDNN's faster convolutions on CPUs (the default run's
    # pretraining went from ~205 to ~233 img/s on a 2-core AMD EPYC), tensor cores on GPUs.
    channels_last: bool = True
    # torch.compile of the training forward (timm's --torchcompile): a one-off compile for a
    # faster step; it pays only when the run is long enough (`make bench` P7 measures both).
    compile: bool = False
    log_every_batches: int = Field(10, gt=0, le=MAX_ITERS)
    checkpoints_to_keep: int = Field(2, gt=0, le=MAX_COUNT)
    # BatchNorm normalises with its running statistics and does not update them
    # (its scale and shift still train): results then do not depend on how the
    # global batch is split over workers. For fine-tuning from model.weights.
    freeze_bn: bool = False
    # Continue this training state: a Ray Train checkpoint dir or its state.pt
    # (weights to start from are model.weights). Runs interrupted with the same
    # config resume from ray.storage_path by themselves.
    resume_from: Optional[LaxPath] = None


class DistillConfig(Section):
    enabled: bool = False
    teacher: str = "regnety_160"
    # A file with the teacher's state dict, inside the repo's `teachers/`
    # folder (a link there is fine), which is a DVC dependency of `pretrain`.
    # when distillation is off.
    teacher_checkpoint: LaxPath = Path("teachers/regnety_160.pth")
    kind: Literal["hard"] = "hard"
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the distillation term


class RayConfig(Section):
    # null: RAY_ADDRESS if set, else a local Ray started in-process.
    address: Optional[str] = None
    num_workers: int = Field(1, gt=0, le=MAX_WORKERS)
    use_gpu: bool = False
    cpus_per_worker: float = Field(2.0, gt=0.0, le=MAX_THREADS)
    gpus_per_worker: float = Field(1.0, ge=0.0, le=MAX_GPUS)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Relative: inside the repo (a local Ray only). A cluster needs storage every
    # node reaches: an absolute path on a shared mount, or a URI (s3://, gs://, ...).
    storage_path: Location = Field("ray_results", min_length=1)
    max_failures: int = Field(0, ge=-1, le=1000)
    # Local Ray only: cap on CPUs it may use (null: all of this machine's).
    local_num_cpus: Optional[int] = Field(None, gt=0, le=MAX_WORKERS * MAX_THREADS)
    # Give up on a cluster that does not answer within this many seconds
    # (checked before any run is opened; also bounds Ray's own reconnect loop).
    connect_timeout_s: float = Field(15.0, gt=0.0, le=600.0)
    # Local Ray only: CPU niceness of its daemons (gcs, dashboard, agents, the
    # Train controller) so they yield to the training workers; 0 leaves them be.
    local_daemon_niceness: int = Field(10, ge=0, le=19)
    # How often Ray Train's controller polls its workers (Ray's default: 2 s). A
    # finished run is noticed up to this late, in every Ray stage; each poll is a
    # call into every worker, and at 0.25 s they cost 2-thread pretraining ~11 %
    # of its steps here (0.5 s: no cost measurable against run-to-run noise).
    poll_interval_s: float = Field(0.5, ge=0.05, le=60.0)
    # After a stage succeeds, delete its Ray checkpoints (they only serve resuming an
    # interrupted run; the weights are the stage's artifact). false keeps them.
    prune_checkpoints: bool = True


class EvaluateConfig(Section):
    batch_size: int = Field(128, gt=0, le=MAX_BATCH)


class MlflowConfig(Section):
    # null: MLFLOW_TRACKING_URI if set, else sqlite file `mlflow/mlflow.db` in the repo.
    tracking_uri: Optional[str] = None
    experiment: str = Field("iformer", min_length=1)
    log_model: bool = True
    # A sqlite store another process holds locked: wait this many seconds (saying so), then stop
    # before any run opens.
    lock_wait_s: float = Field(60.0, ge=0.0, le=3600.0)
    # Which pretrain runs register a model version: every run, only runs with the committed params, none.
    register_model: Literal["always", "baseline", "never"] = "baseline"


class Config(Section):
    recipe: str = "digits"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    aug: AugConfig = AugConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    ray: RayConfig = RayConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    latency: LatencyConfig = LatencyConfig()
    field: FieldConfig = FieldConfig()
    detection: DetectionConfig = DetectionConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    sweep: SweepConfig = SweepConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        if v not in RECIPES and v != "custom":
            raise ValueError(f"unknown recipe {v!r}; known: {', '.join(sorted(RECIPES))}, custom")
        return v

    @model_validator(mode="after")
    def _cross_field(self):
        if self.train.epochs == 0:
            if self.model.weights is None:
                raise ValueError("train.epochs = 0 trains nothing: it passes model.weights through unchanged, and "
                                 "model.weights is null")
            for field, value in (("distill.enabled", self.distill.enabled), ("train.resume_from", self.train.resume_from)):
                if value:
                    raise ValueError(f"{field} = {value!r}: train.epochs = 0 passes model.weights through without "
                                     "training (a distilled release keeps its distillation head by itself)")
        if self.train.batch_size % self.ray.num_workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be divisible by "
                f"ray.num_workers ({self.ray.num_workers})"
            )
        for name in ("detection", "segmentation"):
            section = getattr(self, name)
            if section.train.batch_size % section.ray.num_workers:
                raise ValueError(f"{name}.train.batch_size ({section.train.batch_size}) must be divisible by "
                                 f"{name}.ray.num_workers ({section.ray.num_workers})")
        return self

    # -- derived values -------------------------------------------------
    @property
    def lr(self) -> float:
        """Peak learning rate after the linear scaling rule."""
        return self.optim.base_lr * self.train.batch_size / self.optim.base_batch_size

    @property
    def layer_scale(self) -> float:
        """`model.layer_scale`, or the official value of `model.variant` when null."""
        from iformer.models import default_layer_scale

        ls = self.model.layer_scale
        return default_layer_scale(self.model.variant) if ls is None else ls

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.ray.num_workers

    def to_dict(self) -> dict:
        return json.loads(self.model_dump_json())

    def params_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, object]:
        """Dotted-key view, for MLflow params."""
        out: dict[str, object] = {}

        def walk(prefix: str, node: object) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        bad = e.get("input")
        shown = "" if isinstance(bad, dict) else f" = {bad!r}"
        lines.append(f"{source}: {loc or '<root>'}{shown}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "params.yaml") -> Config:
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise PipelineError(_format_errors(err, source)) from None


def load_config(path: str | Path = "params.yaml") -> Config:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        # An empty file would silently mean "every built-in default"; the
        # pipeline's settings live in this file, so say so instead.
        raise PipelineError(f"{path}: is empty; restore it with `git checkout -- {path.name}`")
    return parse_config(data, str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
