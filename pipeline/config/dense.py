"""The `detection` and `segmentation` sections (pipeline/dense): Mask R-CNN and Semantic FPN."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import (MAX_BATCH, MAX_CHANNELS, MAX_COUNT, MAX_EPOCHS, MAX_IMAGE_SIDE, MAX_ITERS, MAX_THREADS,
                   MAX_WORKERS, DenseAmp, IntPair, LaxPath, Pair, Section, ordered_pair)

class DenseBackboneConfig(Section):
    # The pretrain stage's weights, or an official iFormer release (.pth) read through
    # timm's key filter; either way of model.variant. A DVC dependency of the stage.
    checkpoint: LaxPath = Path("artifacts/pretrain/model.pt")
    window_size: int = Field(16, ge=0, le=MAX_IMAGE_SIDE)  # hybrid window SHMA in stage 3 (App. F); 0: global only
    window_chunks: int = Field(16, gt=0, le=MAX_CHANNELS)  # channel chunks for window partition/reverse
    # official: windows as detection/iformer.py (M: all attention blocks, L/L2: all but the last);
    # paper: App. F's text (all but the last attention block, the last CPE still per window)
    window_layout: Literal["official", "paper"] = "official"
    # zeros: padding takes part in attention and CPE (official); masked: padded keys masked out
    window_padding: Literal["zeros", "masked"] = "zeros"
    norm_eval: bool = True                # keep the backbone's BatchNorm statistics frozen
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)


class DenseRayConfig(Section):
    # Where and how the fine-tuning runs; address, GPUs, backend and storage come from `ray`.
    num_workers: int = Field(1, gt=0, le=MAX_WORKERS)
    # Torch threads per worker (and the CPUs Ray reserves for it): the cores the stage is given,
    # as pretrain's `ray.cpus_per_worker`. On a quiet 2-core machine two threads train Semantic
    # FPN 1.15x faster than one; on a machine busy with other work, OpenMP threads wait on
    # each other and one thread is steadier (set 1). Never more threads than the CPUs the worker
    # may run on (a cpuset, `taskset`): `compute.trainer.compute_threads`.
    cpus_per_worker: float = Field(2.0, gt=0.0, le=MAX_THREADS)


def _positive_pair(v: tuple) -> tuple:
    if min(v) <= 0 or max(v) > MAX_IMAGE_SIDE:
        raise ValueError(f"must be two positive sizes up to {MAX_IMAGE_SIDE} (long, short edge bound), got {list(v)}")
    return v


class DetectionDataConfig(Section):
    # digits: scenes composed from scikit-learn's digits (written by prepare_dense);
    # coco: COCO 2017 layout under `root` (annotations/instances_{train,val}2017.json, {train,val}2017/).
    source: Literal["digits", "coco"] = "digits"
    root: Optional[LaxPath] = None
    # decode: every image fully decoded (a truncated JPEG is refused); header: PIL verify() (cheap); none.
    verify: Literal["none", "header", "decode"] = "decode"
    train_scenes: int = Field(256, gt=0, le=MAX_COUNT)        # digits only, from here to `seed`
    val_scenes: int = Field(64, gt=0, le=MAX_COUNT)
    scene_size: int = Field(128, ge=32, le=2048)
    digits_per_scene: IntPair = (1, 3)
    # about the 64 px the digits had in pretraining: deep features carry their identity there
    digit_size: IntPair = (40, 64)
    seed: int = 0

    @field_validator("digits_per_scene", "digit_size")
    @classmethod
    def _pairs(cls, v):
        return ordered_pair(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.source == "coco" and self.root is None:
            raise ValueError("detection.data.root is required when detection.data.source is 'coco'")
        if self.digits_per_scene[1] > 1000:
            raise ValueError(f"detection.data.digits_per_scene {list(self.digits_per_scene)}: at most 1000 per scene")
        if self.digit_size[1] > self.scene_size:
            raise ValueError(f"detection.data.digit_size {list(self.digit_size)} exceeds scene_size {self.scene_size}")
        return self


class DetectionModelConfig(Section):
    neck_channels: int = Field(64, gt=0, le=MAX_CHANNELS)        # FPN, RPN, RoI heads (paper: 256)
    fc_channels: int = Field(256, gt=0, le=MAX_CHANNELS)         # box head FCs (mmdet default: 1024)
    rpn_train_proposals: int = Field(300, gt=0, le=MAX_COUNT)  # kept after NMS per image (mmdet default: 1000)
    rpn_test_proposals: int = Field(100, gt=0, le=MAX_COUNT)  # (mmdet default: 1000)
    roi_samples: int = Field(64, gt=0, le=MAX_COUNT)         # RoIs sampled per image for the heads (mmdet default: 512)
    max_per_image: int = Field(100, gt=0, le=MAX_COUNT)


class DetectionTrainConfig(Section):
    epochs: int = Field(5, gt=0, le=MAX_EPOCHS)  # 3 gave box AP 0.25, 5 gave 0.63 on the digit scenes
    batch_size: int = Field(4, gt=0, le=MAX_BATCH)            # global; split over detection.ray.num_workers
    image_scale: IntPair = (128, 128)   # Resize keep-ratio bound (paper: 1333x800)
    flip: float = Field(0.0, ge=0.0, le=1.0)    # digits are not mirror-symmetric (paper: 0.5)
    lr: float = Field(1e-3, gt=0.0)             # AdamW
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_iters: int = Field(50, ge=0, le=MAX_ITERS)         # linear from 0.001 x lr
    milestones: list[int] = [4]                 # epochs where lr drops 10x (paper: [8, 11])
    checkpoint_interval: int = Field(1, gt=0, le=MAX_EPOCHS)   # epochs
    log_interval: int = Field(5, gt=0, le=MAX_ITERS)          # iterations between logged losses
    seed: int = 0
    channels_last: bool = True                  # NHWC network (12 % faster steps here); false: NCHW
    fused_optimizer: bool = True                # torch's fused AdamW kernel; false: its per-tensor loop
    flush_denormal: bool = True                 # CPU: subnormal floats as zero (x86 DAZ/FTZ); false: IEEE
    amp: DenseAmp = "auto"                      # training forward passes: auto (bf16 if native) | none | bf16 | fp16

    @field_validator("image_scale")
    @classmethod
    def _scale(cls, v):
        return _positive_pair(v)

    @model_validator(mode="after")
    def _milestones(self):
        if sorted(self.milestones) != self.milestones or any(m <= 0 or m >= self.epochs for m in self.milestones):
            raise ValueError(f"detection.train.milestones {self.milestones} must increase within 1..epochs-1 ({self.epochs - 1})")
        return self


class DetectionConfig(Section):
    data: DetectionDataConfig = DetectionDataConfig()
    backbone: DenseBackboneConfig = DenseBackboneConfig()
    model: DetectionModelConfig = DetectionModelConfig()
    train: DetectionTrainConfig = DetectionTrainConfig()
    ray: DenseRayConfig = DenseRayConfig()
    samples: int = Field(4, ge=0, le=1000)               # validation images drawn with predictions (MLflow artifacts)


class SegmentationDataConfig(Section):
    # digits: the detection scenes as ADE20K-layout label maps (written by prepare_dense);
    # ade20k: ADE20K layout under `root` (images/{training,validation}/*.jpg, annotations/.../*.png).
    source: Literal["digits", "ade20k"] = "digits"
    root: Optional[LaxPath] = None
    verify: Literal["none", "header", "decode"] = "decode"  # as detection.data.verify

    @model_validator(mode="after")
    def _root(self):
        if self.source == "ade20k" and self.root is None:
            raise ValueError("segmentation.data.root is required when segmentation.data.source is 'ade20k'")
        return self


class SegmentationModelConfig(Section):
    neck_channels: int = Field(64, gt=0, le=MAX_CHANNELS)   # FPN (paper: 256)
    head_channels: int = Field(64, gt=0, le=MAX_CHANNELS)   # FPNHead (paper: 128)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class SegmentationTrainConfig(Section):
    iters: int = Field(400, gt=0, le=MAX_ITERS)               # paper: 40k
    batch_size: int = Field(16, gt=0, le=MAX_BATCH)           # global (paper: 32)
    crop_size: int = Field(64, gt=0, le=MAX_IMAGE_SIDE)            # paper: 512
    image_scale: IntPair = (512, 128)   # RandomResize base scale (paper: 2048x512)
    ratio_range: Pair = (0.75, 1.5)  # paper: 0.5-2.0
    flip: float = Field(0.0, ge=0.0, le=1.0)    # paper: 0.5
    lr: float = Field(1e-3, gt=0.0)             # AdamW, poly decay
    weight_decay: float = Field(1e-4, ge=0.0)
    power: float = Field(0.9, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_iters: int = Field(0, ge=0, le=MAX_ITERS)
    checkpoint_interval: int = Field(200, gt=0, le=MAX_ITERS)  # iterations
    log_interval: int = Field(10, gt=0, le=MAX_ITERS)
    seed: int = 0
    channels_last: bool = True                  # NHWC network (about 35 % faster steps here); false: NCHW
    fused_optimizer: bool = True                # torch's fused AdamW kernel; false: its per-tensor loop
    flush_denormal: bool = True                 # CPU: subnormals as zero (2.6x faster training here); false: IEEE
    amp: DenseAmp = "auto"                      # training forward passes: auto (bf16 if native) | none | bf16 | fp16

    @field_validator("ratio_range")
    @classmethod
    def _ratio(cls, v):
        return ordered_pair(v)

    @field_validator("image_scale")
    @classmethod
    def _scale(cls, v):
        return _positive_pair(v)


class SegmentationConfig(Section):
    data: SegmentationDataConfig = SegmentationDataConfig()
    backbone: DenseBackboneConfig = DenseBackboneConfig()
    model: SegmentationModelConfig = SegmentationModelConfig()
    train: SegmentationTrainConfig = SegmentationTrainConfig()
    ray: DenseRayConfig = DenseRayConfig()
    samples: int = Field(4, ge=0, le=1000)
