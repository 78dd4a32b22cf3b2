"""Benchmarks (`python -m benchmarks.run`, `make bench`); what several of them share lives here."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The libraries a process of each role imports before its own work starts. Their import in a
#: fresh interpreter is the part of a stage's fixed cost that no change in this repository removes.
IMPORTS = {
    "every stage (its MLflow run)": "mlflow",
    "evaluate (the network, built before its run opens)": "torch, timm, mlflow",
    "pretrain's driver": "torch, mlflow, ray.train",
    "a pretrain worker (the network: timm)": "torch, timm, mlflow, ray.train",
}


def child_result(repo, marker: str, *args: str, env: dict | None = None):
    """Run `python -m benchmarks.run *args` in `repo` with this checkout's code first on the path,
    and return the JSON the child printed after `marker` at the start of a line."""
    out = repo.run(sys.executable, "-m", "benchmarks.run", *args, timeout=3600,
                   env={"PYTHONPATH": str(ROOT), **(env or {})})
    prefix = f"{marker} "
    return json.loads(next(ln[len(prefix):] for ln in out.stdout.splitlines() if ln.startswith(prefix)))


def import_seconds(modules: str, reps: int = 3) -> float:
    """Median wall time of `python -c "import <modules>"`: an interpreter's start and the imports."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", f"import {modules}"], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"benchmarks: `import {modules}` failed: {last}")
    return statistics.median(times)


def import_floor(*roles: str, together: bool = False, reps: int = 3) -> str:
    """One line: each role's import time (IMPORTS), and their sum when the processes run one after another."""
    seconds = {role: import_seconds(IMPORTS[role], reps) for role in roles}
    parts = ", ".join(f"{role} ({IMPORTS[role]}) {s:.1f} s" for role, s in seconds.items())
    total = f"; one after the other {sum(seconds.values()):.1f} s" if together else ""
    return f"the libraries' import in a fresh interpreter, median of {reps}: {parts}{total}"
