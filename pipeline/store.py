"""`python -m pipeline.store`: relocate the default MLflow store after a move, or print where its UI opens.

The default store is `mlflow/mlflow.db`. Without options: point its artifact
links into this repo after the repo was moved or copied
(`pipeline.tracking.store.relocate`; every stage does this too). `--url`:
print the address on which `make mlflow-ui` (an `mlflow ui` on this store)
shows the experiment's runs table, and change nothing.
"""
from __future__ import annotations

import argparse
import sys

from .config import load_config
from .core import layout
from .errors import PipelineError, report
from .tracking import store, view


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="store_true",
                    help="print the MLflow UI address of the experiment's runs table (mlflow.experiment in "
                         "params.yaml) instead of relocating")
    ap.add_argument("--port", type=int, default=5000, help="the UI's port, for --url (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        root = layout.repo_root()
        db = store.default_db(root)
        if args.url:
            name = load_config(root / "params.yaml").mlflow.experiment
            exp_id = store.experiment_id(db, name)
            where = db.relative_to(root) if db.is_relative_to(root) else db
            shared = view.KEY if exp_id and store.has_view(db, exp_id, view.TAG) else None
            print(f"MLflow UI: {store.ui_url(exp_id, args.port, shared)}" + (
                f" (experiment {name}, runs table)" if exp_id else
                f" (no experiment {name!r} in {where} yet: `make pipeline` or `dvc repro` records one)"))
            return 0
        old = store.relocate(root)
    except PipelineError as err:
        return report(err)
    print(f"{db}: artifact links moved from {old} to this repo" if old else
          f"{db}: artifact links already point into this repo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
