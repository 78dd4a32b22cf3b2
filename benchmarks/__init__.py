"""Benchmarks (`python -m benchmarks.run`, `make bench`); what several of them share lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_result(repo, marker: str, *args: str, env: dict | None = None):
    """Run `python -m benchmarks.run *args` in `repo` with this checkout's code first on the path,
    and return the JSON the child printed after `marker` at the start of a line."""
    out = repo.run(sys.executable, "-m", "benchmarks.run", *args, timeout=3600,
                   env={"PYTHONPATH": str(ROOT), **(env or {})})
    prefix = f"{marker} "
    return json.loads(next(ln[len(prefix):] for ln in out.stdout.splitlines() if ln.startswith(prefix)))
