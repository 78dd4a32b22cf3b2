"""Every pipeline run in the MLflow experiment, as rows for the cross-run tables and plots.

A row is one parent run (tag `iformer.kind = pipeline`): its identity (DVC
experiment, commit, params changed from the baseline) and the headline metrics
the stages logged on it, in the report's units (percent, ms, M, GMACs).
"""
from __future__ import annotations

from ..tracking.runs import TAG_KIND


def _pct(v):
    return None if v is None else 100 * v


def _first(m: dict, pct_name: str, *fractions: str):
    """A percent headline: the parent's `*_pct` metric, else an older run's fraction (0..1) scaled."""
    if pct_name in m:
        return m[pct_name]
    return _pct(next((m[k] for k in fractions if k in m), None))


def row(run) -> dict:
    m, t = run.data.metrics, run.data.tags
    latency: dict[str, dict[str, float]] = {}
    for k, v in m.items():
        if k.startswith("latency_ms."):
            _, backend, model = k.split(".", 2)
            latency.setdefault(backend, {})[model] = v
    return {
        "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
        "start_time": run.info.start_time, "experiment": t.get("iformer.dvc_experiment", ""),
        "commit": t.get("iformer.git_commit", ""), "variant": t.get("iformer.variant", ""),
        "params_changed": t.get("iformer.params_changed", ""), "data": t.get("iformer.data", ""),
        # Percent since issue 14; fractions before, and before issue 9 as val_top1/val_top5.
        "top1": _first(m, "top1_pct", "top1", "val_top1"), "top5": _first(m, "top5_pct", "top5", "val_top5"),
        "params_m": m.get("params_m"), "gmacs_224": m.get("gmacs_224"), "latency_ms": latency,
        "latency_host": {k.removeprefix("latency_host."): v for k, v in t.items() if k.startswith("latency_host.")},
        "ap_box": _first(m, "box_ap_pct", "bbox_ap", "finetune_coco.bbox_ap"),
        "ap_mask": _first(m, "mask_ap_pct", "segm_ap", "finetune_coco.segm_ap"),
        "miou": m.get("miou_pct", m.get("miou", m.get("finetune_ade20k.miou"))),
        "wall_s": m.get("wall_s"), "img_per_sec": m.get("img_per_sec"),
        "census_ops": census(m, "ops_without_const"),
        # Before issue 12 the parent run carried only the total, as `census.<model>.ops`.
        "census_ops_total": {**census(m, "ops"), **census(m, "ops_total")},
    }


def census(metrics: dict, count: str) -> dict[str, float]:
    """{model: value} of the parent run's `census.<model>.<count>` metrics."""
    return {k.split(".")[1]: v for k, v in metrics.items() if k.startswith("census.") and k.endswith(f".{count}")}


def pipeline_runs(client, experiment_id: str) -> list[dict]:
    """Oldest first; runs that failed or were killed are left out."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'pipeline'",
                              max_results=1000, order_by=["attributes.start_time ASC"])
    return [row(r) for r in runs if r.info.status in ("FINISHED", "RUNNING")]


def classifier_latency(r: dict, backend: str) -> float | None:
    """The run's classifier latency on `backend` (224 px when it was measured, else the one size)."""
    models = r["latency_ms"].get(backend, {})
    if "classifier_224" in models:
        return models["classifier_224"]
    found = sorted(k for k in models if k.startswith("classifier_"))
    return models[found[0]] if found else None


def backbone_latency(r: dict, backend: str) -> float | None:
    models = r["latency_ms"].get(backend, {})
    found = sorted(k for k in models if k.startswith("backbone_"))
    return models.get("backbone_512", models[found[0]] if found else None)


def backends(rows: list[dict]) -> list[str]:
    return sorted({b for r in rows for b in r["latency_ms"]})
