"""A deployed file's outputs against torch's, judged relative to each output's scale.

An output is judged against `tolerance` scaled by its magnitude (max |torch|, at
least 1): deep feature maps of a trained network reach tens, where FP32 kernels
that sum in another order differ by more than 1e-4 in absolute terms. ONNX
Runtime and ExecuTorch are both checked this way (`onnx`, `executorch`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PipelineError


def max_abs_diff(path: Path, runtime: str, knob: str, names: list[str], got: list, reference: list,
                 tolerance: float) -> dict[str, float]:
    """{output name: largest |got - torch|}; above `tolerance` of the output's scale (or a missing output) is an
    error naming `path`, the `runtime` and the tolerance's param `knob`."""
    got = [np.asarray(g) for g in got]
    diffs = {n: float(np.abs(g - r.numpy()).max()) for n, g, r in zip(names, got, reference)}
    scale = {n: max(1.0, float(np.abs(r.numpy()).max())) for n, r in zip(names, reference)}
    worst = max(diffs[n] / scale[n] for n in diffs) if len(got) == len(reference) else float("inf")
    if worst > tolerance or not np.isfinite(worst):
        raise PipelineError(f"{path.name}: {runtime} differs from torch by {worst:.3g} of the output's scale "
                            f"({knob} {tolerance}): {diffs}")
    return diffs
