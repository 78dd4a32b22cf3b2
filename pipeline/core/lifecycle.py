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


def exit_now(code: int) -> NoReturn:
    """End the process with `code` as Python would, less the teardown of its modules.

    What an exit owes the world still happens, in Python's order: `threading`'s
    exit hooks and the joins of non-daemon threads, then every `atexit` handler
    (MLflow's queued logging, logging's flush, temporary folders), then the
    standard streams are flushed. Skipped is only the interpreter's freeing of
    its modules and objects, which took 1-2 s per stage process with torch,
    timm and MLflow loaded (measured here, 2 cores), time DVC waited for. A
    process that started a local Ray has already seen all of it out
    (`end_marked`, when its session closed).
    """
    import atexit

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # no CPython hook: the ordinary exit
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
    """Clean up after this process whenever it ends: see `reap`."""
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
    end([*victims, *(p for p in marked(env_key, marker) if p.pid not in seen)], grace=5.0)
    shutil.rmtree(Path(marker).parent, ignore_errors=True)


def environ(pid: int) -> dict[str, str]:
    """A process's environment, read past what a changed process title wiped.

    Ray's agents set their title (`ray::DashboardAgent`) over the memory that also holds the
    start of their environment: /proc/PID/environ then begins with NUL bytes (psutil reads it as
    empty), while the variables after the wiped part are still there.
    """
    try:
        return parse_environ(Path(f"/proc/{pid}/environ").read_bytes())
    except OSError:  # gone, or not ours to read
        return {}


def parse_environ(raw: bytes) -> dict[str, str]:
    """NUL-separated NAME=value entries; empty and cut entries without '=' are skipped."""
    pairs = (chunk.decode(errors="replace").partition("=") for chunk in raw.split(b"\0") if b"=" in chunk)
    return {k: v for k, _, v in pairs}


def marked(env_key: str, marker: str) -> list:
    """Every other process whose environment has `env_key` set to `marker`."""
    import psutil

    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me and environ(p.pid).get(env_key) == marker]


def end_marked(env_key: str, marker: str, grace: float = 0.5) -> int:
    """End what is left of a local Ray once it is shut down: its processes carry `marker` in
    `env_key`. Ray's shutdown stops the daemons it started, but not what they started in turn
    (the dashboard's multiprocessing forkserver outlived it in 3 of 7 test runs), which would
    otherwise run on until the reaper came by. Returns how many were still there."""
    left = marked(env_key, marker)
    end(left, grace)
    return len(left)


def end(procs: list, grace: float) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `grace` s (at once when 0)."""
    import psutil

    for proc in procs:
        try:
            proc.terminate() if grace > 0 else proc.kill()
        except psutil.Error:
            pass
    for proc in _running(procs, grace):
        try:
            proc.kill()
        except psutil.Error:
            pass
    _running(procs, 5.0)


def _running(procs: list, timeout: float) -> list:
    """Those of `procs` still running after up to `timeout` s. A zombie has ended: an orphan's waits
    for init to reap it, which took a second here (psutil's `wait_procs` counts it as alive)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:  # gone
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)
        procs = alive


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2], sys.argv[3])
