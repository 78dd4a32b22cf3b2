"""The typed schema of `params.yaml`, the single source of every knob.

Every stage calls :func:`load_config` first. An unknown key, a wrong type or an
out-of-range value raises :class:`PipelineError` naming the dotted field path and
the bad value, before any work, MLflow run or Ray start-up happens.

The schema's defaults are the embedded default (the digits data set, a few
minutes on 2 CPU cores); the paper's ImageNet recipes live in
:mod:`pipeline.recipes` and are written into `params.yaml` by
`python -m pipeline.recipes NAME`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PipelineError

#: timm's registered iFormer classifiers (a test checks them against timm's registry).
VARIANTS = ("iformer_t", "iformer_s", "iformer_m", "iformer_l", "iformer_l2", "iformer_h")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    variant: Literal[VARIANTS] = "iformer_t"  # type: ignore[valid-type]
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    # 0 disables layer scale (paper: None for T/S/M/L, 1e-6 for H).
    layer_scale: float = Field(0.0, ge=0.0, le=1.0)


class DataConfig(_Section):
    # digits: ImageFolder made from scikit-learn's bundled handwritten digits.
    # imagefolder: ImageNet layout under `root` (train/<class>/*, val/<class>/*).
    source: Literal["digits", "imagefolder"] = "digits"
    root: Optional[Path] = None
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
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (the network downsamples 32x), got {v}")
        return v

    @model_validator(mode="after")
    def _root_for_imagefolder(self):
        if self.source == "imagefolder" and self.root is None:
            raise ValueError("data.root is required when data.source is 'imagefolder'")
        return self


class AugConfig(_Section):
    rand_augment: Optional[str] = None  # timm auto_augment string, e.g. rand-m9-mstd0.5-inc1
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    re_prob: float = Field(0.0, ge=0.0, le=1.0)
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    crop_pct: float = Field(1.0, gt=0.0, le=1.0)

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"must be two positive numbers, low <= high, got {list(v)}")
        return v

    @field_validator("rand_augment")
    @classmethod
    def _rand_augment_form(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("rand-"):
            raise ValueError(f"must be a timm RandAugment string starting 'rand-', got {v!r}")
        return v


class OptimConfig(_Section):
    name: Literal["adamw"] = "adamw"
    # lr = base_lr * train.batch_size / base_batch_size (linear scaling rule).
    base_lr: float = Field(2e-3, gt=0.0, le=10.0)
    base_batch_size: int = Field(64, gt=0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    clip_grad: Optional[float] = Field(None, gt=0.0)


class ScheduleConfig(_Section):
    name: Literal["cosine"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    warmup_lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(1e-6, ge=0.0)


class TrainConfig(_Section):
    epochs: int = Field(6, gt=0)
    batch_size: int = Field(64, gt=0)  # global: split evenly over ray.num_workers
    seed: int = 0
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0)
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    log_every_batches: int = Field(10, gt=0)
    checkpoints_to_keep: int = Field(2, gt=0)
    # Start from this checkpoint: a Ray Train checkpoint dir / state.pt (full
    # training state) or a pretrain model.pt (weights only). Runs interrupted
    # with the same config resume from ray.storage_path by themselves.
    resume_from: Optional[Path] = None


class DistillConfig(_Section):
    enabled: bool = False
    teacher: str = "regnety_160"
    # A local file with the teacher's state dict; a DVC dependency of `pretrain`.
    # The default names the committed `teachers/` folder so the dependency exists
    # when distillation is off.
    teacher_checkpoint: Path = Path("teachers")
    kind: Literal["hard"] = "hard"
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the distillation term


class RayConfig(_Section):
    # null: RAY_ADDRESS if set, else a local Ray started in-process.
    address: Optional[str] = None
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(2.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    storage_path: Path = Path("ray_results")
    max_failures: int = Field(0, ge=-1)
    # Local Ray only: cap on CPUs it may use (null: all of this machine's).
    local_num_cpus: Optional[int] = Field(None, gt=0)


class EvaluateConfig(_Section):
    batch_size: int = Field(128, gt=0)


class DenseBackboneConfig(_Section):
    # The pretrain stage's weights, or an official iFormer release (.pth) read through
    # timm's key filter; either way of model.variant. A DVC dependency of the stage.
    checkpoint: Path = Path("artifacts/pretrain/model.pt")
    window_size: int = Field(16, ge=0)    # hybrid window SHMA in stage 3 (App. F); 0: global only
    window_chunks: int = Field(16, gt=0)  # channel chunks for window partition/reverse
    norm_eval: bool = True                # keep the backbone's BatchNorm statistics frozen
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)


class DenseRayConfig(_Section):
    # Where and how the fine-tuning runs; address, GPUs, backend and storage come from `ray`.
    num_workers: int = Field(1, gt=0)
    # Torch threads per worker. One by default: the small mmdet/mmseg kernels gain
    # little from a second OpenMP thread, and on a busy 2-core machine two threads
    # waited on each other (measured 3.4x slower per iteration than one).
    cpus_per_worker: float = Field(1.0, gt=0.0)


def _ordered_pair(v: tuple, what: str = "low <= high") -> tuple:
    if not (0 < v[0] <= v[1]):
        raise ValueError(f"must be two positive numbers, {what}, got {list(v)}")
    return v


def _positive_pair(v: tuple) -> tuple:
    if min(v) <= 0:
        raise ValueError(f"must be two positive sizes (long, short edge bound), got {list(v)}")
    return v


class DetectionDataConfig(_Section):
    # digits: scenes composed from scikit-learn's digits (written by prepare_dense);
    # coco: COCO 2017 layout under `root` (annotations/instances_{train,val}2017.json, {train,val}2017/).
    source: Literal["digits", "coco"] = "digits"
    root: Optional[Path] = None
    train_scenes: int = Field(256, gt=0)        # digits only, from here to `seed`
    val_scenes: int = Field(64, gt=0)
    scene_size: int = Field(128, ge=32, le=2048)
    digits_per_scene: tuple[int, int] = (1, 3)
    # about the 64 px the digits had in pretraining: deep features carry their identity there
    digit_size: tuple[int, int] = (40, 64)
    seed: int = 0

    @field_validator("digits_per_scene", "digit_size")
    @classmethod
    def _pairs(cls, v):
        return _ordered_pair(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.source == "coco" and self.root is None:
            raise ValueError("detection.data.root is required when detection.data.source is 'coco'")
        if self.digit_size[1] > self.scene_size:
            raise ValueError(f"detection.data.digit_size {list(self.digit_size)} exceeds scene_size {self.scene_size}")
        return self


class DetectionModelConfig(_Section):
    neck_channels: int = Field(64, gt=0)        # FPN, RPN, RoI heads (paper: 256)
    fc_channels: int = Field(256, gt=0)         # box head FCs (mmdet default: 1024)
    rpn_train_proposals: int = Field(300, gt=0)  # kept after NMS per image (mmdet default: 1000)
    rpn_test_proposals: int = Field(100, gt=0)  # (mmdet default: 1000)
    roi_samples: int = Field(64, gt=0)         # RoIs sampled per image for the heads (mmdet default: 512)
    max_per_image: int = Field(100, gt=0)


class DetectionTrainConfig(_Section):
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(4, gt=0)            # global; split over detection.ray.num_workers
    image_scale: tuple[int, int] = (128, 128)   # Resize keep-ratio bound (paper: 1333x800)
    flip: float = Field(0.0, ge=0.0, le=1.0)    # digits are not mirror-symmetric (paper: 0.5)
    lr: float = Field(1e-3, gt=0.0)             # AdamW
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_iters: int = Field(50, ge=0)         # linear from 0.001 x lr
    milestones: list[int] = [2]                 # epochs where lr drops 10x (paper: [8, 11])
    checkpoint_interval: int = Field(1, gt=0)   # epochs
    log_interval: int = Field(5, gt=0)          # iterations between logged losses
    seed: int = 0

    @field_validator("image_scale")
    @classmethod
    def _scale(cls, v):
        return _positive_pair(v)

    @model_validator(mode="after")
    def _milestones(self):
        if sorted(self.milestones) != self.milestones or any(m <= 0 or m >= self.epochs for m in self.milestones):
            raise ValueError(f"detection.train.milestones {self.milestones} must increase within 1..epochs-1 ({self.epochs - 1})")
        return self


class DetectionConfig(_Section):
    data: DetectionDataConfig = DetectionDataConfig()
    backbone: DenseBackboneConfig = DenseBackboneConfig()
    model: DetectionModelConfig = DetectionModelConfig()
    train: DetectionTrainConfig = DetectionTrainConfig()
    ray: DenseRayConfig = DenseRayConfig()
    samples: int = Field(4, ge=0)               # validation images drawn with predictions (MLflow artifacts)


class SegmentationDataConfig(_Section):
    # digits: the detection scenes as ADE20K-layout label maps (written by prepare_dense);
    # ade20k: ADE20K layout under `root` (images/{training,validation}/*.jpg, annotations/.../*.png).
    source: Literal["digits", "ade20k"] = "digits"
    root: Optional[Path] = None

    @model_validator(mode="after")
    def _root(self):
        if self.source == "ade20k" and self.root is None:
            raise ValueError("segmentation.data.root is required when segmentation.data.source is 'ade20k'")
        return self


class SegmentationModelConfig(_Section):
    neck_channels: int = Field(64, gt=0)   # FPN (paper: 256)
    head_channels: int = Field(64, gt=0)   # FPNHead (paper: 128)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class SegmentationTrainConfig(_Section):
    iters: int = Field(400, gt=0)               # paper: 40k
    batch_size: int = Field(16, gt=0)           # global (paper: 32)
    crop_size: int = Field(64, gt=0)            # paper: 512
    image_scale: tuple[int, int] = (512, 128)   # RandomResize base scale (paper: 2048x512)
    ratio_range: tuple[float, float] = (0.75, 1.5)  # paper: 0.5-2.0
    flip: float = Field(0.0, ge=0.0, le=1.0)    # paper: 0.5
    lr: float = Field(1e-3, gt=0.0)             # AdamW, poly decay
    weight_decay: float = Field(1e-4, ge=0.0)
    power: float = Field(0.9, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    checkpoint_interval: int = Field(200, gt=0)  # iterations
    log_interval: int = Field(10, gt=0)
    seed: int = 0

    @field_validator("ratio_range")
    @classmethod
    def _ratio(cls, v):
        return _ordered_pair(v)

    @field_validator("image_scale")
    @classmethod
    def _scale(cls, v):
        return _positive_pair(v)


class SegmentationConfig(_Section):
    data: SegmentationDataConfig = SegmentationDataConfig()
    backbone: DenseBackboneConfig = DenseBackboneConfig()
    model: SegmentationModelConfig = SegmentationModelConfig()
    train: SegmentationTrainConfig = SegmentationTrainConfig()
    ray: DenseRayConfig = DenseRayConfig()
    samples: int = Field(4, ge=0)


class MlflowConfig(_Section):
    # null: MLFLOW_TRACKING_URI if set, else sqlite file `mlflow/mlflow.db` in the repo.
    tracking_uri: Optional[str] = None
    experiment: str = Field("iformer", min_length=1)
    log_model: bool = True


class Config(_Section):
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
    detection: DetectionConfig = DetectionConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        from .recipes import RECIPES

        if v not in RECIPES and v != "custom":
            raise ValueError(f"unknown recipe {v!r}; known: {', '.join(sorted(RECIPES))}, custom")
        return v

    @model_validator(mode="after")
    def _cross_field(self):
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    return parse_config(data, str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
