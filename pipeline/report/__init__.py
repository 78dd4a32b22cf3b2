"""The `report` stage: this pipeline run, every other run in the MLflow experiment, and the paper.

`check` reads this run's local outputs (`sections.check`); `run`
(`write.run`) adds every pipeline parent run of the experiment (`history`), the
cross-run tables and accuracy-vs-latency Pareto plots per latency backend
(`compare`, `figures`), and writes `artifacts/report/`: `report.md`, a
self-contained `report.html` (`page`: figures inlined, no CDN), `report.json`
and the PNG figures, also logged to the parent run. Units: accuracy, AP and
mIoU in percent, latency in ms. Beside it, `experiments` is the experiment table
`python -m pipeline.exps` prints from `dvc exp show`.
"""
from .sections import Inputs, build, check, dense_section, latency_section
from .write import run

__all__ = ["Inputs", "build", "check", "dense_section", "latency_section", "run"]
