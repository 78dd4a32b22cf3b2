"""The environment every command sets for the tools it drives: no telemetry, quiet logs, state kept local."""
from __future__ import annotations

import os


def configure_environment() -> None:
    """Keep MLflow, DVC and Git quiet and their state local (defaults only: the caller's settings win)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # MLflow's INFO lines ("Creating initial MLflow database tables", ...) are not ours to show.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
