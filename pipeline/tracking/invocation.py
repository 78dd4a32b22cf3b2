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
    """When `pid` started, on the wall clock (ms since the epoch): a run's start time, never its identity."""
    import psutil

    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except (psutil.Error, OSError):
        return None


def start_stamp(pid: int) -> str | None:
    """Which start of `pid` this is, in a form no change of the wall clock alters.

    psutil's `create_time` is the boot time plus the clock ticks since boot, and Linux derives
    the boot time from the wall clock: when that clock is stepped (NTP, a virtual machine
    resumed), every process's `create_time` moves with it. One `dvc repro` in CI saw its own
    start move by 5 s and then by 20 s, and its stages opened three parent runs. On Linux the
    stamp is this boot's id and the ticks since boot at which `pid` started (/proc/PID/stat,
    field 22); elsewhere it falls back to the wall-clock start."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[19]  # after the command name, field 22 is the 20th
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
        return f"{boot}+{ticks}"
    except (OSError, IndexError):
        ms = started_ms(pid)
        return None if ms is None else str(ms)


def owner(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{start_stamp(pid)}"


def invocation_key() -> str:
    explicit = os.environ.get("IFORMER_PIPELINE_RUN")
    if explicit:
        return explicit
    proc = lifecycle.dvc_process()
    if proc is not None:
        return f"dvc:{proc.pid}:{start_stamp(proc.pid)}:{dvc_experiment()}"
    return f"standalone:{os.getpid()}:{int(time.time() * 1000)}"


def owner_alive(tag: str) -> bool:
    host, pid, started = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # another machine's process: not ours to judge
    return pid.isdigit() and str(start_stamp(int(pid))) == started


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
