"""Metrics into MLflow: stamped batches, the parent run's headline names, per-epoch rows logged once."""
from __future__ import annotations

import time


def metric_batch(values: dict, step: int = 0) -> list:
    """MLflow Metric entities for `log_batch`, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


#: A stage's headline metric -> (the parent run's name for it, scale, decimals). The parent shows one
#: unit per kind: accuracy, AP and mIoU in percent (mmseg's mIoU already is), latency in ms.
PARENT_NAMES = {
    "top1": ("top1_pct", 100, 2), "top5": ("top5_pct", 100, 2),
    "bbox_ap": ("box_ap_pct", 100, 1), "segm_ap": ("mask_ap_pct", 100, 1), "miou": ("miou_pct", 1, 1),
    "params_m": ("params_m", 1, 2), "gmacs_224": ("gmacs_224", 1, 2),
    "img_per_sec": ("img_per_sec", 1, 0), "train_s": ("train_s", 1, 0), "train_loss": ("train_loss", 1, 4),
    "wall_s": ("wall_s", 1, 0),
}
#: The headline columns of the runs table, in order (`latency_ms.<backend>.<model>` follow top-5).
HEADLINE_COLUMNS = ("top1_pct", "top5_pct", "params_m", "gmacs_224", "box_ap_pct", "mask_ap_pct", "miou_pct",
                    "img_per_sec", "wall_s")


def parent_headline(values: dict) -> dict[str, float]:
    """Stage headline values as the parent run logs them: renamed, scaled and rounded (latency to 0.01 ms)."""
    out = {}
    for key, v in values.items():
        name, scale, digits = PARENT_NAMES.get(key, (key, 1, 2 if key.startswith("latency_ms.") else None))
        out[name] = float(v) * scale if digits is None else round(float(v) * scale, digits)
    return out


class MetricLogger:
    """Per-epoch metrics from rank 0 into the stage's MLflow run, each epoch once.

    A worker group Ray restarted (`ray.max_failures`) or a rerun resumes in the
    same MLflow run: epochs the run already holds are not logged again.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        self.run_id = run_id
        self.logged: set[int] = set()
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
            self.logged = {m.step for m in self.client.get_metric_history(run_id, "train_loss")}

    def log(self, row: dict) -> None:
        if self.client is None or int(row["epoch"]) + 1 in self.logged:
            return
        values = {k: v for k, v in row.items() if k != "epoch"}
        # Step = the 1-based epoch the console and history.csv show (rows count from 0).
        step = int(row["epoch"]) + 1
        self.client.log_batch(self.run_id, metrics=metric_batch(values, step))
        self.logged.add(step)
