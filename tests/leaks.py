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

RAY_NAMES = ("ray::", "raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py")


def environ(p: psutil.Process) -> dict[str, str]:
    """A process's environment, read past what a changed process title wiped.

    Ray's agents set their title (`ray::DashboardAgent`) over the memory that also holds the
    start of their environment: /proc/PID/environ then begins with NUL bytes, and psutil's
    `environ()` reads it as empty. The variables after the wiped part are still there.
    """
    try:
        return parse_environ(Path(f"/proc/{p.pid}/environ").read_bytes())
    except OSError:
        return {}


def open_paths(p: psutil.Process) -> list[str]:
    """What the process holds open, by path (deleted files too): a Ray agent whose title wiped
    all of its environment still holds its logs under its node's temp dir."""
    fds = Path(f"/proc/{p.pid}/fd")
    try:
        return [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:
        return []


def parse_environ(raw: bytes) -> dict[str, str]:
    """NUL-separated NAME=value entries; empty and cut entries without '=' are skipped."""
    pairs = (chunk.decode(errors="replace").partition("=") for chunk in raw.split(b"\0") if b"=" in chunk)
    return {k: v for k, _, v in pairs}


def orphans(base: str) -> list[psutil.Process]:
    """Ray processes whose parent is gone (re-parented to init), of a repo under `base`: its
    IFORMER_ROOT in their environment, or files under it held open."""
    found = []
    for p in psutil.process_iter(["ppid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["ppid"] != 1 or not any(n in cmd for n in RAY_NAMES):
                continue
            if (environ(p).get("IFORMER_ROOT", "").startswith(base)
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
    end(left, grace=0)


def end(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM (SIGKILL when `grace` is 0), then SIGKILL whatever is still there after `grace` s."""
    for p in procs:
        try:
            p.terminate() if grace > 0 else p.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=max(grace, 1.0))
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
