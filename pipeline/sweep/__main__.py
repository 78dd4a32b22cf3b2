"""`python -m pipeline.sweep [--params FILE]`: a Ray Tune (ASHA) search over the pretrain loop, in MLflow.

Each trial trains the values it draws for params.yaml's `sweep.space` fields
and is a child run of the sweep's MLflow parent run; weak trials stop early on
`sweep.metric`. The best trial's values go to `artifacts/sweep/best.yaml` (a
params fragment). Needs the prepare stage's output (`pipeline.sweep`).
"""
from __future__ import annotations

import sys

from ..stage import entry
from .search import STAGE, check, run


def main(argv: list[str] | None = None) -> int:
    return entry("python -m pipeline.sweep", STAGE, lambda cfg, root: run(cfg, root, check(cfg, root)), argv,
                 interrupted_hint=lambda: "the sweep's parent run is marked KILLED", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
