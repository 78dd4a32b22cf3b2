"""The recorded baseline: the committed `params.yaml` at git HEAD.

`dvc exp run -S` and hand edits change the workspace's params; the parent
MLflow run and the report state every param that differs from the committed
ones, so a run's identity is visible without diffing configs by hand; the
parent run is named after them (`run_name`) when no DVC experiment names it.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from ..config import Config, parse_config
from ..errors import PipelineError


def committed_config(root: Path) -> Config | None:
    """HEAD's params.yaml, validated; None outside git or when HEAD's file no longer validates."""
    try:
        out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        return parse_config(yaml.safe_load(out.stdout), "HEAD:params.yaml")
    except (PipelineError, yaml.YAMLError, TypeError):
        return None


def differing(cfg: Config, root: Path) -> dict[str, dict]:
    """`{dotted.param: {"baseline": committed value, "value": this run's}}` for every changed param."""
    base = committed_config(root)
    if base is None:
        return {}
    old, new = base.flat(), cfg.flat()
    return {k: {"baseline": old.get(k), "value": new.get(k)} for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def describe(diff: dict[str, dict]) -> str:
    """`optim.base_lr=0.004, train.epochs=3` ('baseline' when nothing differs)."""
    return ", ".join(f"{k}={v['value']}" for k, v in diff.items()) or "baseline"


def run_name(exp_name: str | None, diff: dict[str, dict], commit: str) -> str:
    """A pipeline run's name in the runs table: its DVC experiment, else what it changed, else `baseline <commit>`."""
    if exp_name:
        return exp_name
    if diff:
        text = describe(diff)
        return text if len(text) <= 60 else text[:59] + "…"
    return f"baseline {commit[:7]}" if commit and commit != "unknown" else "baseline"
