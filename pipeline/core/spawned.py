"""Work spread over spawned processes of this machine, for single-threaded Python work a stage would
otherwise do on one of its cores (`export.processes`).

`pool(n)` gives a `ProcessPoolExecutor` whose processes
- are spawned, not forked (a stage process has threads: its watchdog, torch's pool);
- ignore Ctrl-C: a stop signal is the stage's to act on; when the block fails or is stopped it kills
  and reaps them, and after success each exits on its own;
- die with the stage however it dies (Linux: `PR_SET_PDEATHSIG`), so none goes on writing into a
  rerun's outputs;
- share the CPUs the stage may use (torch's threads: usable CPUs / n).
A process that dies (a crash in a library, the OOM killer) fails its work: `outcome` gives `DIED`,
where a `multiprocessing.Pool` would wait on it for ever.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Iterator

from .cpus import usable_cpus

#: What `outcome` gives for work whose process died before it answered.
DIED = "died"


@contextmanager
def pool(n: int) -> Iterator[ProcessPoolExecutor]:
    before = set(multiprocessing.active_children())
    executor = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_started,
                                   initargs=(max(1, usable_cpus() // n), os.getpid()))
    try:
        yield executor
    except BaseException:
        ours = set(multiprocessing.active_children()) - before
        for proc in ours:
            proc.kill()  # a failure or a stop signal leaves none of them running, and waits on no work
        for proc in ours:
            proc.join(timeout=5)
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)  # each exits on its own, cleanly
    gc.collect()  # its queues' locks, unreferenced now: their finalizers run before a stage's quick exit


def outcome(future: Future):
    """The work's result, or `DIED` when its process died first."""
    try:
        return future.result()
    except BrokenProcessPool:
        return DIED


def _started(threads: int, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # gone before that took effect
            os._exit(1)
    import torch

    torch.set_num_threads(threads)
    # tqdm (coremltools' progress bars) guards its bars with a multiprocessing lock by default: a
    # semaphore that Python's resource tracker reports as leaked when a stop kills this process.
    import threading

    import tqdm

    tqdm.tqdm.set_lock(threading.RLock())
