"""No Ray daemon outlives the test module that started it.

A Ray agent whose raylet died is re-parented to init and keeps running (the dashboard agent
ignores SIGTERM); on two cores it slows every later test and makes timing-bound tests fail
depending on their order. After each module this plugin looks for orphaned Ray processes
started from this session's repos (their environment names a repo under pytest's temp dir),
names them and the module in a warning, and ends them.
"""
from __future__ import annotations

import warnings

import psutil
import pytest

RAY_NAMES = ("ray::", "raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py")


def orphans(base: str) -> list[psutil.Process]:
    """Ray processes whose parent is gone (re-parented to init) and whose IFORMER_ROOT is under `base`."""
    found = []
    for p in psutil.process_iter(["ppid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["ppid"] != 1 or not any(n in cmd for n in RAY_NAMES):
                continue
            if p.environ().get("IFORMER_ROOT", "").startswith(base):
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
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
