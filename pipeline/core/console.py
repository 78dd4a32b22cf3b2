"""What a stage shows on the terminal, and where library chatter goes instead.

Our lines are short, start with `[<stage>] ` and carry a number. Everything
Ray prints (its driver-side loggers, the controller's and workers' forwarded
stdout/stderr, C++ warnings) is written to a log file in the run's directory;
only lines our own training workers print with the stage's prefix are passed
through, without Ray's coloured `(RayTrainWorker pid=…)` prefix. No ANSI codes
are written anywhere. `to_log` does the same for libraries that print from C
(coremltools' progress bars, torch.onnx's steps): everything written to the
process's stdout and stderr inside the block goes to a file.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data")


def prefix(stage: str) -> str:
    return f"[{stage}] "


def say(stage: str, message: str, file=None) -> None:
    """One line of ours on stderr, or `file` (also from inside a Ray worker, whose stderr Ray forwards)."""
    print(prefix(stage) + message, file=file or sys.stderr, flush=True)


class _RayLog:
    """Sink for Ray's forwarded worker output: our lines to stderr, the rest to a file.

    Of the autoscaler monitor's log, which Ray forwards whole, only its events are kept, as Ray's
    own printer keeps them: its status table every 5 s made up 95 % of a stage's log file."""

    def __init__(self, stage: str, path: Path):
        self.mark = prefix(stage)
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or "ray"
        lines = data.get("lines") or []
        if data.get("pid") == "autoscaler":
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        ours = [line for line in lines if line.startswith(self.mark)]
        with self.lock:
            with open(self.path, "a") as f:
                for line in lines:
                    f.write(f"({who} pid={data.get('pid')}) {line}\n")
            for line in ours:
                print(line, file=sys.stderr, flush=True)


@contextmanager
def ray_output(stage: str, log_file: Path) -> Iterator[None]:
    """Send Ray's driver-side Python logging to `log_file` for the duration of the block."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage} ===\n")
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate, lg.level)
        lg.handlers[:] = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for name, (handlers, propagate, level) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)
        handler.close()


def attach(stage: str, log_file: Path) -> None:
    """After `ray.init`: replace Ray's printer of worker output with ours."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("iformer_console", _RayLog(stage, log_file))


def detach() -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("iformer_console")


@contextmanager
def to_log(path: Path) -> Iterator[None]:
    """Everything written to stdout/stderr inside the block (from Python or C) goes to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log, warnings.catch_warnings():
        warnings.simplefilter("default")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
