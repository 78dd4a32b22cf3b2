"""The experiment's headline view in the MLflow UI: its runs table opens on the answer.

MLflow 3.17 has no per-experiment default columns; what it has is saved views:
an experiment tag `mlflow.sharedViewState.<id>` holding `{"name", "createdAt",
"updatedAt", "state"}` (`state`: the page's state as JSON), listed under the runs
page's *Views* menu and opened by `#/experiments/<id>/runs?viewStateShareKey=<id>`
(what the UI's *Save as new view* writes). `update` keeps one such view, `headline`:
the parent runs' headline metrics (`metrics.HEADLINE_COLUMNS` in percent, the
`latency_ms.*` medians in ms) and the params each run changed, newest run first.
Each stage that logs a headline the view lacks adds it (`StageRun.log_headline`).
`pipeline.store --url` (and `make mlflow-ui`) print the address.
"""
from __future__ import annotations

import json
import time

from .metrics import HEADLINE_COLUMNS

KEY = "headline"
TAG = f"mlflow.sharedViewState.{KEY}"
NAME = "Headline metrics"
#: The UI's column key of a run's changed params (`iformer.params_changed` tag) and of its DVC experiment.
TAG_COLUMNS = ("tags.`iformer.params_changed`", "tags.`iformer.dvc_experiment`")


def column(metric: str) -> str:
    """A metric's column key as the runs table spells it."""
    return f"metrics.`{metric}`"


def metric_order(keys) -> list[str]:
    """Top-1 and top-5 first, then the latency medians, then the other headlines; non-headline keys dropped."""
    keys = set(keys)
    accuracy = [k for k in ("top1_pct", "top5_pct") if k in keys]
    latency = sorted(k for k in keys if k.startswith("latency_ms."))
    return accuracy + latency + [k for k in HEADLINE_COLUMNS if k in keys and k not in accuracy]


def state(metrics: list[str]) -> dict:
    """The page state MLflow's UI restores: its default UI state with our columns, newest runs first."""
    return {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": [*TAG_COLUMNS, *map(column, metrics)], "columnOrder": [], "columnWidths": {},
        "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
        "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
        "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {}, "autoRefreshEnabled": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def envelope(metrics: list[str], created_ms: int, updated_ms: int) -> str:
    """The tag's value: a saved view named `NAME` (its state as plain JSON, which the UI reads as it reads
    its own deflated one)."""
    return json.dumps({"name": NAME, "createdAt": created_ms, "updatedAt": updated_ms,
                       "state": json.dumps(state(metrics))})


def _read(client, exp_id: str) -> tuple[list[str], int | None]:
    """(the metrics the view shows, when it was created), ([], None) without one."""
    tag = client.get_experiment(exp_id).tags.get(TAG)
    if not tag:
        return [], None
    saved = json.loads(tag)
    prefix = "metrics.`"
    columns = json.loads(saved["state"])["selectedColumns"]
    return [c[len(prefix):-1] for c in columns if c.startswith(prefix)], saved.get("createdAt")


def shown(client, exp_id: str) -> list[str]:
    """The metrics the headline view shows now ([] without one)."""
    return _read(client, exp_id)[0]


def update(client, exp_id: str, metrics) -> None:
    """Add the headline ones among `metrics` to the experiment's view (written only when one is new)."""
    have, created = _read(client, exp_id)
    wanted = metric_order([*have, *metrics])
    if wanted != have and wanted:
        now = int(time.time() * 1000)
        client.set_experiment_tag(exp_id, TAG, envelope(wanted, created or now, now))
