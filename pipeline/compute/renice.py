"""Keeping the local Ray's daemons out of the training workers' way on a small machine."""
from __future__ import annotations

#: Ray's process titles for the training workers; everything else of a local
#: Ray (gcs, raylet, dashboard, agents, the Train controller) is a daemon.
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"


class Renicer:
    """Lowers the CPU priority of the local Ray's daemons while training runs.

    gcs, dashboard, agents, monitors and the Train controller wake up every
    second or so; at equal priority each wake-up stalls the training threads,
    which on a 2-core machine hold both cores. Training workers, idle workers
    (which become training workers) and the raylet (whose niceness the workers
    it forks would inherit) keep theirs. Re-scanned every 2 s, since actors
    start after `ray.init`.
    """

    def __init__(self, niceness: int):
        import threading

        self.niceness = niceness
        self.done = threading.Event()
        self.thread = None
        if niceness > 0:
            self.scan()
            self.thread = threading.Thread(target=self.loop, name="ray-renicer", daemon=True)
            self.thread.start()

    def loop(self) -> None:
        while not self.done.wait(2.0):
            self.scan()

    def scan(self) -> None:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                if self.is_daemon(proc.cmdline(), proc.name()):
                    self.lower(proc)
            except (psutil.Error, OSError):
                continue  # gone, or not ours to change

    def lower(self, proc) -> None:
        """Every thread of `proc`: on Linux a niceness belongs to one thread, and setting a
        process's (`setpriority` on its pid) changes only its main thread's, while a daemon's
        gRPC pollers and event loops run in the others. Threads it starts later inherit the
        niceness of the thread that starts them, so the next scan catches those. Elsewhere
        (macOS) a niceness is the process's, and its thread ids are no process ids."""
        import os
        import sys

        if not sys.platform.startswith("linux"):
            if proc.nice() < self.niceness:
                proc.nice(self.niceness)
            return
        for thread in proc.threads():
            try:
                if os.getpriority(os.PRIO_PROCESS, thread.id) < self.niceness:
                    os.setpriority(os.PRIO_PROCESS, thread.id, self.niceness)
            except OSError:
                continue  # ended since the listing

    @staticmethod
    def is_daemon(cmdline: list[str], name: str) -> bool:
        if is_unassigned_worker(cmdline, name):  # it may become a training worker
            return False
        title = cmdline[0] if cmdline else name
        if title.startswith("ray::"):  # an actor or task process, titled by Ray
            return not title.startswith(TRAIN_WORKER_TITLE)
        return name != "raylet"

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def is_unassigned_worker(cmdline: list[str], name: str) -> bool:
    """A Ray Python worker running no actor or task yet: titled `ray::IDLE`, or still starting up
    (running `default_worker.py`; the raylet's own arguments name that script much further on)."""
    title = cmdline[0] if cmdline else name
    if title.startswith("ray::"):
        return title.startswith("ray::IDLE")
    return any("default_worker.py" in part for part in cmdline[:3])
