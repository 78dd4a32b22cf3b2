"""Who is running: the `dvc` invocation, its DVC experiment, a process's owner tag, the commit.

A stage process belongs to one pipeline invocation: the `dvc repro` / `dvc exp
run` process above it (its pid and start time, plus the experiment name), or
`IFORMER_PIPELINE_RUN` when set (jobs, tests). Owner tags (`host:pid:start`)
let a later run tell whether the process that opened a run is still alive.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from ..core import lifecycle


def dvc_experiment() -> str:
    """The DVC experiment this process runs in ('' outside `dvc exp run`)."""
    return os.environ.get("DVC_EXP_NAME", "")


def started_ms(pid: int) -> int | None:
    import psutil

    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except (psutil.Error, OSError):
        return None


def owner(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{started_ms(pid)}"


def invocation_key() -> str:
    explicit = os.environ.get("IFORMER_PIPELINE_RUN")
    if explicit:
        return explicit
    proc = lifecycle.dvc_process()
    if proc is not None:
        return f"dvc:{proc.pid}:{started_ms(proc.pid)}:{dvc_experiment()}"
    return f"standalone:{os.getpid()}:{int(time.time() * 1000)}"


def owner_alive(tag: str) -> bool:
    host, pid, started = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # another machine's process: not ours to judge
    return pid.isdigit() and str(started_ms(int(pid))) == started


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
