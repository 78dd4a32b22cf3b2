"""What every params.yaml section is built from: strict sections, lax paths and pairs."""
from __future__ import annotations

from pathlib import Path
from os import PathLike
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict

# Strict: YAML already gives real numbers and booleans, so `"6"`, `true` for a
# number or `"yes"` for a flag is a mistake to report, not a value to coerce.
# Paths and pairs come from YAML as strings and lists, so those two containers
# stay lax while their elements stay strict.
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


LaxPath = Annotated[Path, Strict(False)]
Pair = Annotated[tuple[Annotated[float, Strict()], Annotated[float, Strict()]], Strict(False)]
IntPair = Annotated[tuple[Annotated[int, Strict()], Annotated[int, Strict()]], Strict(False)]
# A local path or a URI (s3://bucket/dir): kept as text, since a Path would
# collapse the URI's `//` (s3:/bucket/dir).
Location = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, PathLike) else v)]
# Mixed precision of a training step's forward pass (pretraining's `train.amp`); the dense stages'
# also take `auto`: bf16 where the hardware computes it natively, float32 elsewhere (pipeline/dense/configs.py).
Amp = Literal["none", "bf16", "fp16"]
DenseAmp = Literal["auto", "none", "bf16", "fp16"]


# Upper bounds on counts, sizes and durations: a value past one of these is a slip (a zero too
# many), not an experiment, and would run for days or exhaust the machine. Checked with the rest
# of params.yaml, before any run opens. The paper's recipes sit well inside them (ImageNet: 300
# or 450 epochs, batch 8192; ADE20K: 40k iterations; COCO: 12 epochs, 1333x800).
MAX_WORKERS = 1024        # Ray workers
MAX_THREADS = 256         # threads or CPUs of one process or worker
MAX_GPUS = 16             # GPUs of one worker
MAX_EPOCHS = 10_000
MAX_ITERS = 10_000_000    # iterations and intervals counted in them
MAX_BATCH = 65_536        # images in a global batch
MAX_IMAGE_SIDE = 8192     # pixels
MAX_CHANNELS = 16_384
MAX_COUNT = 100_000       # trials, timed runs, proposals, scenes, drawn samples, kept checkpoints


def check_multiple_of_32(v: int) -> int:
    if v % 32:
        raise ValueError(f"must be a multiple of 32 (the network downsamples 32x), got {v}")
    return v


def ordered_pair(v: tuple) -> tuple:
    if not (0 < v[0] <= v[1]):
        raise ValueError(f"must be two positive numbers, low <= high, got {list(v)}")
    return v
