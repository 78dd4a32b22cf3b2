"""What one stage hands another is what the producer recorded: sha256 checks and finite numbers.

A producing stage records the sha256 of each file a later stage reads in its
manifest (pretrain's `checkpoint_sha256`, export's `onnx_sha256` /
`coreml_sha256` per model, prepare's `listing_sha256` (and `images_sha256`
for the images it wrote itself), prepare_dense's `sha256` per COCO annotation
file); the consumer calls :func:`verify` before it uses the
file, so bytes changed in DVC's cache or in the workspace are one `error:` line
naming the file, never a number. :func:`finite` refuses a NaN or infinite
metric before it is written as a result.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

from ..errors import PipelineError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(folder: Path) -> str:
    """One sha256 over a folder's files: their relative paths and bytes, in sorted order."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(folder).as_posix()}\0{sha256(file)}\n".encode())
    return h.hexdigest()


def verify(path: Path, recorded: str | None, producer: str) -> None:
    """`path` must still hash to what `producer`'s manifest recorded (nothing recorded: nothing to check)."""
    if not recorded:
        return
    actual = tree_sha256(path) if Path(path).is_dir() else sha256(path)
    if actual != recorded:
        raise PipelineError(f"{path}: sha256 {actual[:12]} is not the {recorded[:12]} the {producer} stage recorded "
                            f"in its manifest: the file was corrupted or changed outside the pipeline; "
                            f"restore it with `dvc checkout {producer}` or rerun `dvc repro --force {producer}`")


def finite(values, stage: str, prefix: str = "") -> None:
    """Every number in `values` (nested dicts and lists) is finite; else one error naming the metric."""
    if isinstance(values, dict):
        for key, value in values.items():
            finite(value, stage, f"{prefix}{key}.")
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            finite(value, stage, f"{prefix}{i}.")
    elif isinstance(values, float) and not math.isfinite(values):
        raise PipelineError(f"{stage}: metric {prefix.rstrip('.')} is {values}: a diverged or corrupted run, "
                            "not a result; nothing was recorded as finished")
