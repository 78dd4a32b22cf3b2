"""The `export`, `latency` and `field` sections (pipeline/deploy, the field stage)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import MAX_THREADS, Section, check_multiple_of_32

class CoreMLExportConfig(Section):
    target: Literal["iOS15", "iOS16", "iOS17", "iOS18"] = "iOS16"  # minimum deployment target (ML Program)
    precision: Literal["fp16", "fp32"] = "fp16"  # compute precision; inputs and outputs stay float32
    # tensor: float32 NCHW, normalised by the caller; image: RGB 0-255 with the normalisation baked in.
    input: Literal["tensor", "image"] = "tensor"
    class_labels: bool = False  # classifiers as Core ML classifiers (class label + probabilities)
    # macOS only: max |Core ML - torch| relative to max |torch|.
    tolerance: float = Field(0.05, gt=0.0)


class OnnxExportConfig(Section):
    opset: int = Field(18, ge=17)
    tolerance: float = Field(1e-4, gt=0.0)  # max |ONNX Runtime - torch| / max(1, max |torch|), FP32


class ExecuTorchExportConfig(Section):
    # Also write `<name>.pte` (ExecuTorch, XNNPACK delegate) and check it against torch.
    enabled: bool = False
    tolerance: float = Field(1e-4, gt=0.0)  # max |ExecuTorch - torch| / max(1, max |torch|), FP32, every output


class ExportConfig(Section):
    # The classifier is exported at its training resolution and at each of these.
    classifier_sizes: list[int] = [224]
    # The dense-prediction backbone (four feature maps); null: not exported.
    backbone_size: Optional[int] = Field(512, ge=32, le=2048)
    coreml: CoreMLExportConfig = CoreMLExportConfig()
    onnx: OnnxExportConfig = OnnxExportConfig()
    executorch: ExecuTorchExportConfig = ExecuTorchExportConfig()
    # Models converted at once, each in a process of its own (conversion is single-threaded Python);
    # auto: one per CPU this process may use, at most one per model. 1: one after another, in-process.
    processes: Union[int, str] = "auto"

    @field_validator("classifier_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        for size in v:
            if not 32 <= size <= 2048:
                raise ValueError(f"sizes must be in [32, 2048], got {size}")
            check_multiple_of_32(size)
        return v

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, v):
        if v == "auto" or (type(v) is int and 1 <= v <= MAX_THREADS):
            return v
        raise ValueError(f"must be auto or a number of processes from 1 to {MAX_THREADS}")

    @field_validator("backbone_size")
    @classmethod
    def _backbone_size(cls, v: Optional[int]) -> Optional[int]:
        return v if v is None else check_multiple_of_32(v)


#: Where latency can be measured (pipeline/deploy/backends.py).
LATENCY_BACKENDS = ("iphone", "mac", "onnxruntime", "torch", "executorch")
Backend = Literal[LATENCY_BACKENDS]  # type: ignore[valid-type]
#: Timed unless `latency.backends` says otherwise (executorch needs `export.executorch.enabled`).
DEFAULT_BACKENDS = ("iphone", "mac", "onnxruntime", "torch")


class LatencyConfig(Section):
    backends: list[Backend] = Field(list(DEFAULT_BACKENDS), min_length=1)
    # Backends that must run: a skip (not macOS, no device, no signing team) becomes an error.
    require: list[Backend] = []
    # Exported models to time (names from the export stage's manifest).
    models: list[str] = Field(["classifier_224", "backbone_512"], min_length=1)
    runs: int = Field(30, gt=0, le=10_000)  # timed runs per model and backend, after warm-up
    warmup: int = Field(5, ge=0, le=1000)
    # torch and ONNX Runtime intra-op threads. 1 by default: on a shared or busy CPU, more
    # threads make eager torch wait at every parallel region (seconds instead of ms).
    threads: int = Field(1, gt=0, le=MAX_THREADS)  # and no more than this machine's CPUs
    compute_units: Literal["all", "cpu_and_ne", "cpu_and_gpu", "cpu_only"] = "all"  # Core ML (mac, iphone)
    # iphone: the device's name or UDID; null: the only connected iPhone. The signing
    # team comes from the environment (IFORMER_SIGNING_TEAM), never from this file.
    device: Optional[str] = None

    @model_validator(mode="after")
    def _require_listed(self):
        for field in ("backends", "require", "models"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise ValueError(f"latency.{field} lists a name twice: {values}")
        missing = [b for b in self.require if b not in self.backends]
        if missing:
            raise ValueError(f"latency.require names {missing}, which latency.backends does not list")
        return self


#: What the field times by default (ExecuTorch: the XNNPACK CPU runtime of Android and iOS apps).
FIELD_BACKENDS = ("onnxruntime", "torch", "executorch")


class FieldConfig(Section):
    """The measured field (`dvc repro field/dvc.yaml`): the paper's networks timed here, no training."""

    # timm names, each at the paper's resolution where the paper lists it; []: every Table 3 row
    # timm has (iformer.reference) and iFormer T/S/M/L.
    networks: list[str] = []
    backends: list[Backend] = Field(list(FIELD_BACKENDS), min_length=1)
    runs: int = Field(20, gt=0, le=10_000)  # timed runs per network and backend, after warm-up
    warmup: int = Field(5, ge=0, le=1000)
    threads: int = Field(1, gt=0, le=MAX_THREADS)  # and no more than this machine's CPUs
    compute_units: Literal["all", "cpu_and_ne", "cpu_and_gpu", "cpu_only"] = "all"  # Core ML (mac, iphone)
    device: Optional[str] = None  # iphone: name or UDID, as latency.device

    @field_validator("networks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v
