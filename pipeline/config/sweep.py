"""The `sweep` section: a Ray Tune search over the pretrain loop (`python -m pipeline.sweep`)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import MAX_BATCH, MAX_COUNT, MAX_EPOCHS, Pair, Section, ordered_pair

#: Search-space key -> the params.yaml field a trial sets.
SPACE_FIELDS = {"base_lr": "optim.base_lr", "weight_decay": "optim.weight_decay", "drop_path": "model.drop_path",
                "batch_size": "train.batch_size", "variant": "model.variant"}


class SearchSpace(Section):
    # [low, high] ranges (null: keep params.yaml's value); lr and weight decay log-uniform.
    base_lr: Optional[Pair] = (5e-4, 5e-3)
    weight_decay: Optional[Pair] = (0.01, 0.1)
    drop_path: Optional[Pair] = None          # uniform; low may be 0
    # choices ([]: keep params.yaml's value)
    batch_size: list[Annotated[int, Field(gt=0, le=MAX_BATCH)]] = []
    variant: list[str] = []

    @field_validator("base_lr", "weight_decay")
    @classmethod
    def _positive_range(cls, v):
        return v if v is None else ordered_pair(v)

    @field_validator("drop_path")
    @classmethod
    def _drop_path_range(cls, v):
        if v is not None and not (0 <= v[0] <= v[1] < 1):
            raise ValueError(f"must be 0 <= low <= high < 1, got {list(v)}")
        return v


class SweepLatency(Section):
    # Time every variant the sweep may try (fused, batch 1, CPU; runs/warmup/threads from the
    # `latency` section) before training. null: accuracy only.
    backend: Optional[Literal["torch", "onnxruntime"]] = None
    size: int = Field(224, ge=32, le=2048)                 # input size timed (the paper's latency is at 224)
    budget_ms: Optional[float] = Field(None, gt=0)  # variants slower than this are left out of the search


class SweepConfig(Section):
    space: SearchSpace = SearchSpace()
    latency: SweepLatency = SweepLatency()
    num_samples: int = Field(4, gt=0, le=MAX_COUNT)            # trials
    max_concurrent_trials: int = Field(2, gt=0, le=1024)
    epochs: Optional[int] = Field(None, gt=0, le=MAX_EPOCHS)    # per trial (null: train.epochs)
    metric: Literal["val_top1"] = "val_top1"     # maximised; ASHA stops trials early on it
    grace_period: int = Field(1, gt=0, le=MAX_EPOCHS)           # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = Field(2, gt=1, le=100)       # ASHA: keep the top 1/reduction_factor at each rung
    seed: int = 0                                # of the random search

    @model_validator(mode="after")
    def _budget_needs_backend(self):
        if self.latency.budget_ms is not None and self.latency.backend is None:
            raise ValueError("sweep.latency.budget_ms needs sweep.latency.backend (torch or onnxruntime)")
        return self
