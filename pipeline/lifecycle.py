"""How a stage process lives and dies.

- SIGTERM and SIGHUP raise `Interrupted` in the main thread, as Ctrl-C raises
  KeyboardInterrupt, so every `finally` runs: the MLflow runs are marked
  KILLED, the local Ray is shut down with its workers, no manifest is written.
- A watchdog thread notices when the process that started the stage (`dvc`) is
  gone — `kill -9` of `dvc repro`, or SIGTERM, which DVC does not forward — and
  interrupts the stage within about a second: no trainer outlives its pipeline.
  (DVC ignores a SIGINT sent to its PID alone while a stage runs; Ctrl-C in a
  terminal reaches the whole process group and stops the stage.)
- `exclusive(path)` takes an `flock` on a lock file that names its holder, so a
  second trainer on the same Ray run fails at once with the PID that has it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import threading
from pathlib import Path

from .errors import PipelineError

_HELD: dict[str, int] = {}


class Interrupted(BaseException):
    """The stage was told to stop (a signal, or its parent is gone).

    A BaseException, like KeyboardInterrupt, so library code that catches
    Exception does not swallow it.
    """

    def __init__(self, reason: str, signum: int):
        super().__init__(reason)
        self.reason = reason
        self.signum = signum


def _raise(signum, _frame):
    raise Interrupted(signal.Signals(signum).name, signum)


def install() -> None:
    """Signal handlers and the parent watchdog for this stage process (main thread only)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    parent = os.getppid()

    def watch() -> None:
        ev = threading.Event()
        while not ev.wait(1.0):
            if os.getppid() != parent:  # re-parented: whoever started us is gone
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def exit_status(err: BaseException) -> int:
    """The shell's convention for death by signal: 128 + signal number."""
    if isinstance(err, Interrupted):
        return 128 + err.signum
    return 128 + signal.SIGINT


def exclusive(path: Path, what: str) -> None:
    """Hold an exclusive lock on `path` until this process exits; fail at once if taken.

    The file holds `host pid` of its holder. flock is released by the kernel
    when the holder dies, so a killed run never leaves a stale lock.
    """
    path = Path(path)
    if str(path) in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise PipelineError(f"{path}: cannot lock ({err.strerror})") from None
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise PipelineError(f"{what}: {path.parent} is in use by {holder}; "
                            "wait for it to finish or stop that process") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    _HELD[str(path)] = fd  # kept open (and locked) for the life of the process
