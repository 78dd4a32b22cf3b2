"""How a stage process lives and dies.

- SIGINT, SIGTERM and SIGHUP raise `Interrupted`, a KeyboardInterrupt, in the
  main thread, so every `finally` runs: the MLflow runs are marked
  KILLED, the local Ray is shut down with its workers, no manifest is written.
  (A KeyboardInterrupt because Ray's blocking calls turn exactly that, and no
  other exception from a signal handler, into an interruption.)
- A watchdog thread notices when the process that started the stage (`dvc`,
  and any shell DVC put in between) is gone — `kill -9` of `dvc repro`, or
  SIGTERM, which DVC does not forward — and interrupts the stage within about
  a second: no trainer outlives its pipeline.
  (DVC ignores a SIGINT sent to its PID alone while a stage runs; Ctrl-C in a
  terminal reaches the whole process group and stops the stage.)
- `reaper(...)` starts a tiny watcher process that, once this process is gone
  however it died (even SIGKILL, when no handler runs), kills every process
  it saw descend from it and whatever still carries a marker in its
  environment (the local Ray's processes), and removes the marker's folder.
- `held()` keeps stop signals waiting while a stage swaps its outputs in.
- `exclusive(path)` takes an `flock` on a lock file that names its holder, so a
  second trainer on the same Ray run fails at once with the PID that has it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from ..errors import PipelineError

_HELD: dict[str, int] = {}
#: The last stop signal this process received (Ray re-raises a plain KeyboardInterrupt).
received: int = signal.SIGINT


class Interrupted(KeyboardInterrupt):
    """The stage was told to stop (a signal, or its parent is gone)."""


#: Set by the first stop signal: the stage is shutting down (marking its runs
#: KILLED, stopping Ray), and neither the watchdog nor a further SIGTERM/SIGHUP
#: may interrupt that. (Ctrl-C keeps its meaning: a second one stops at once.)
stopping: bool = False


#: While set (`held`), a stop signal is remembered here and raised when the block ends.
_held: list[int] | None = None


def _raise(signum, _frame):
    global received, stopping
    if _held is not None:
        _held.append(signum)
        return
    if stopping and signum != signal.SIGINT:
        return
    received, stopping = signum, True
    raise Interrupted(signal.Signals(signum).name)


def raise_if_stopping() -> None:
    """Raise `Interrupted` if a stop signal arrived whose exception a library swallowed (a bare `except:`)."""
    if stopping:
        raise Interrupted(signal.Signals(received).name)


@contextmanager
def held():
    """Stop signals wait until the block is done (a few renames that must not stop half-way)."""
    global _held
    outer, _held = _held, []
    try:
        yield
    finally:
        pending, _held = _held, outer
        if pending:
            _raise(pending[0], None)


def handle_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted`, a KeyboardInterrupt (main thread only).

    Called again after `ray.init`, whose C++ core installs its own SIGTERM
    handler that aborts the process.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    # A stage started in the background of a script inherits SIGINT ignored: leave it so.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _raise)


def _is_dvc(proc) -> bool:
    cmd = proc.cmdline()
    return any(os.path.basename(a) == "dvc" for a in cmd[:3]) or cmd[1:3] == ["-m", "dvc"]


def dvc_process():
    """The `dvc` process this stage runs under, if any (psutil.Process)."""
    try:
        import psutil

        return next((proc for proc in psutil.Process().parents() if _is_dvc(proc)), None)
    except Exception:  # psutil may be denied on some systems: fall back to standalone
        return None


def _ancestors() -> list:
    """The processes whose death ends this stage: every ancestor up to `dvc`, or the parent.

    DVC runs a stage through `$SHELL -c` (or `/bin/sh -c` when SHELL is unset);
    bash execs the command, dash keeps a shell in between that outlives a
    killed `dvc`, so watching the direct parent alone is not enough.
    """
    import psutil

    parents = psutil.Process().parents()
    for i, proc in enumerate(parents):
        if _is_dvc(proc):
            return parents[: i + 1]
    return parents[:1]


def _gone(proc) -> bool:
    import psutil

    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def install() -> None:
    """Signal handlers and the parent watchdog for this stage process (main thread only)."""
    handle_signals()
    parent = os.getppid()
    try:
        watched = _ancestors()
    except Exception:  # psutil denied: the re-parenting check alone
        watched = []

    def watch() -> None:
        ev = threading.Event()
        while not ev.wait(1.0):
            if stopping:  # already shutting down: let it finish
                return
            # re-parented, or an ancestor up to `dvc` is gone (or a zombie): whoever started us is gone
            if os.getppid() != parent or any(_gone(p) for p in watched):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


#: Whether this process must end with the interpreter's full teardown (see `keep_teardown`).
_full_exit = False


def keep_teardown() -> None:
    """This process started something (a local Ray) whose own ending `exit_now` must not cut short.

    With the teardown skipped, a local Ray's dashboard left its multiprocessing
    forkserver running in 3 of 7 test runs (0 of 4 with it): a process that
    started Ray exits as Python would.
    """
    global _full_exit
    _full_exit = True


def exit_now(code: int) -> NoReturn:
    """End the process with `code` as Python would, less the teardown of its modules.

    What an exit owes the world still happens, in Python's order: `threading`'s
    exit hooks and the joins of non-daemon threads, then every `atexit` handler
    (MLflow's queued logging, logging's flush, temporary folders), then the
    standard streams are flushed. Skipped is only the interpreter's freeing of
    its modules and objects, which took 1-2 s per stage process with torch,
    timm and MLflow loaded (measured here, 2 cores), time DVC waited for. A
    process that started Ray (`keep_teardown`) exits the ordinary way.
    """
    import atexit

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None or _full_exit:  # no CPython hook, or a Ray to see out: the ordinary exit
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
            pass
    os._exit(code)


def stop_reason() -> tuple[str, int]:
    """The signal's name and the shell's exit status for death by it (128 + number)."""
    return signal.Signals(received).name, 128 + received


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


def reaper(env_key: str, marker: str) -> None:
    """Clean up after this process whenever it ends: see `reap`. A process that needs a reaper has
    daemons to see out, and ends with the interpreter's full teardown (`keep_teardown`)."""
    keep_teardown()
    subprocess.Popen([sys.executable, "-m", "pipeline.core.lifecycle", str(os.getpid()), env_key, marker],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


def reap(pid: int, env_key: str, marker: str) -> None:
    """Wait for `pid` to end, then stop what it left behind and remove the marker's folder.

    What it left: every process seen below it while it ran (Ray re-titles its
    agents, which hides their environment), and every process whose `env_key`
    is `marker` (workers started in its last second).
    """
    import psutil

    seen: dict[int, psutil.Process] = {}
    try:
        watched = psutil.Process(pid)
        while watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE:
            for proc in watched.children(recursive=True):
                seen.setdefault(proc.pid, proc)
            time.sleep(1.0)
    except psutil.Error:
        pass
    victims = [p for p in seen.values() if p.pid != os.getpid() and p.is_running()]  # is_running checks pid reuse
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.pid not in seen and proc.environ().get(env_key) == marker:
                victims.append(proc)
        except psutil.Error:
            continue
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(Path(marker).parent, ignore_errors=True)


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2], sys.argv[3])
