"""A stage's start-up and end as seen from outside: its lines and the Ray processes it starts.

P2 splits the pretrain stage's fixed cost into phases with it, without instrumenting the
stage: each line of its output gets the time it arrived, and a watcher polls the stage's
process tree (10 times a second) for the first process of each kind Ray starts for it.
"""
from __future__ import annotations

import subprocess
import threading
import time

#: A process of the stage's tree, by what its command line (Ray's process title) contains.
PROCESSES = {"ray": "gcs_server", "controller": "ray::TrainController", "worker": "RayTrainWorker"}
#: A line of the stage's output, by what it contains.
LINES = {"ready": "] rank 0/", "logging": "logging the model to MLflow",
         "logged": "] model logged in "}
#: The phases, in order: (label, the mark that starts it, the mark that ends it).
PHASES = (
    ("before Ray (imports, checks, the MLflow runs opened)", "start", "ray"),
    ("Ray's start (`ray.init`: daemons, dashboard) and Train's set-up, to the controller's process",
     "ray", "controller"),
    ("controller to worker (its process start and imports, the worker group)", "controller", "worker"),
    ("worker to its loop (process start, torch/timm/MLflow imports, data, model)", "worker", "ready"),
    ("beyond the epochs' steps and validation (each checkpoint and report, the weights file)", "ready", "logging"),
    ("model logging (`torch.export`, `mlflow.pytorch.log_model`)", "logging", "logged"),
    ("the end (registration, pruning, Ray's shutdown, exit)", "logged", "end"),
)


def phases(marks: dict, epochs: float) -> list:
    """(label, seconds) per phase from `marks` (seconds since the stage started); a phase whose
    marks are missing is None. The training phase has the epochs' own time taken out."""
    out = []
    for label, begin, end in PHASES:
        if begin in marks and end in marks:
            seconds = marks[end] - marks[begin] - (epochs if end == "logging" else 0.0)
            out.append((label, seconds))
        else:
            out.append((label, None))
    return out


def run(cmd: list, cwd, env: dict, timeout: float = 900) -> tuple:
    """Run `cmd`; its exit status, output and marks (seconds since its start, `end` at its exit)."""
    import psutil

    marks: dict = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    done = threading.Event()

    def watch() -> None:
        try:
            root = psutil.Process(proc.pid)
            # Processes' start times count from the boot time, which Linux gives in whole seconds:
            # only differences between them are exact (to a clock tick), so all count from the stage's.
            born = root.create_time()
        except psutil.Error:
            return
        while not done.is_set() and len([k for k in PROCESSES if k in marks]) < len(PROCESSES):
            try:
                children = root.children(recursive=True)
            except psutil.Error:
                return
            for child in children:
                try:
                    line = " ".join(child.cmdline())
                    created = child.create_time() - born
                except psutil.Error:
                    continue
                for key, needle in PROCESSES.items():
                    if needle in line:
                        marks[key] = min(marks.get(key, created), created)
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    killer = threading.Timer(timeout, proc.kill)
    watcher.start()
    killer.start()
    marks["start"] = 0.0
    output = []
    for line in proc.stdout:
        now = time.perf_counter() - start
        output.append(line)
        for key, needle in LINES.items():
            if needle in line and key not in marks:
                marks[key] = now
    code = proc.wait()
    marks["end"] = time.perf_counter() - start
    killer.cancel()
    done.set()
    watcher.join()
    return code, "".join(output), marks
