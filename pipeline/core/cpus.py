"""The CPUs this process may run on: what thread counts are capped at and checked against."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs the scheduler lets this process use: a cpuset, `taskset` or a batch scheduler's
    allocation narrows them below the machine's count, and child processes (Ray's workers
    included) inherit that. The machine's count where the platform cannot say."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
