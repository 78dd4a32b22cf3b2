"""No Ray daemon outlives the test module that started it.

A Ray agent whose raylet died is re-parented to init and keeps running (the dashboard agent
ignores SIGTERM); on two cores it slows every later test and makes timing-bound tests fail
depending on their order. After each module this plugin looks for orphaned Ray processes
started from this session's repos (their environment names a repo under pytest's temp dir),
names them and the module in a warning, and ends them.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import psutil
import pytest

from pipeline.core import lifecycle

RAY_NAMES = ("ray::", "raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py")


def open_paths(p: psutil.Process) -> list[str]:
    """What the process holds open, by path (deleted files too): a Ray agent whose title wiped
    all of its environment still holds its logs under its node's temp dir."""
    fds = Path(f"/proc/{p.pid}/fd")
    try:
        return [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:
        return []


def orphans(base: str) -> list[psutil.Process]:
    """Ray processes whose parent is gone (re-parented to init), of a repo under `base`: its
    IFORMER_ROOT in their environment, or files under it held open."""
    found = []
    for p in psutil.process_iter(["ppid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["ppid"] != 1 or not any(n in cmd for n in RAY_NAMES):
                continue
            if (lifecycle.environ(p.pid).get("IFORMER_ROOT", "").startswith(base)
                    or any(f.startswith(base) for f in open_paths(p))):  # its logs, if the title wiped the rest
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind(request, tmp_path_factory):
    yield
    left = orphans(str(tmp_path_factory.getbasetemp()))
    if not left:
        return
    names = ", ".join(sorted({" ".join(p.cmdline()[:1])[:40] for p in left if p.is_running()}))
    warnings.warn(f"{request.module.__name__} left {len(left)} Ray process(es) running: {names}; ended them")
    lifecycle.end(left, grace=0)
