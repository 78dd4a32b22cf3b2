"""The default MLflow store (`mlflow/mlflow.db` + `mlflow/artifacts/`) follows the repo when it moves.

MLflow records absolute `file://` artifact locations (per experiment, run,
logged model and model version). When the repo has been moved or copied, the
next stage (or `python -m pipeline.store`) rewrites the old
`file://<old repo>/mlflow/artifacts` prefix to the current one in the store's
own sqlite file, so every artifact link works again. Stores named by
`mlflow.tracking_uri` / `MLFLOW_TRACKING_URI` are left alone.
"""
from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from . import layout

SUFFIX = "/mlflow/artifacts"
#: (table, column) pairs that hold artifact locations in MLflow 3's schema.
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
           ("model_versions", "storage_location"), ("model_versions", "source"))


def default_db(root: Path) -> Path:
    return layout.state_root(root) / "mlflow" / "mlflow.db"


def relocate(root: Path, db: Path | None = None) -> str | None:
    """Rewrite a moved repo's artifact prefix; returns the old prefix when it did."""
    db = db or default_db(root)
    if not db.is_file():
        return None
    new = (layout.state_root(root) / "mlflow" / "artifacts").as_uri()
    with sqlite3.connect(db) as con:
        have = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        if "experiments" not in have:
            return None
        olds = {r[0][: r[0].index(SUFFIX) + len(SUFFIX)] for r in
                con.execute("select artifact_location from experiments where artifact_location like ?",
                            (f"file://%{SUFFIX}%",))}
        olds.discard(new)
        for old in olds:
            for table, col in COLUMNS:
                if table in have:
                    con.execute(f"update {table} set {col} = ? || substr({col}, ?) where {col} like ?",
                                (new, len(old) + 1, old + "%"))
    return ", ".join(sorted(olds)) or None


def main() -> int:
    root = layout.repo_root()
    old = relocate(root)
    print(f"{default_db(root)}: artifact links moved from {old} to this repo" if old else
          f"{default_db(root)}: artifact links already point into this repo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
