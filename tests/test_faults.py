"""Faults on the 2-node loopback cluster: a training worker killed mid-run, Ray restarts the group.

Prints the measured restart cost (seconds from the kill to training resumed
from the checkpoint, and to the run's end); not a timed assert.
"""
import json
import subprocess
import sys
import threading
import time

import psutil
import pytest

from cluster_fixture import TRAIN_WORKERS, cluster, cluster_repo, ray_query, wait_for  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


class Lines:
    """A process's stderr lines with the time each arrived."""

    def __init__(self, proc):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc):
        for line in proc.stderr:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first(self, needle: str, after: float = 0.0):
        return next(((t, line) for t, line in self.lines if t >= after and needle in line), None)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def checkpointed_epochs(storage, run_name_prefix: str = "pretrain-") -> int:
    snaps = list(storage.glob(f"{run_name_prefix}*/checkpoint_manager_snapshot.json"))
    return max((text.count("epoch-0") for text in (p.read_text() for p in snaps)), default=0)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_and_mlflow_keeps_one_value_per_step(
        tmp_path, cluster):
    cluster.storage.mkdir(parents=True, exist_ok=True)
    storage = cluster.storage / "faults"
    repo = cluster_repo(tmp_path / "repo", cluster, {"train": {"epochs": 3}, "ray": {
        "max_failures": 1, "storage_path": str(storage)}})
    repo.stage("prepare")
    before = {pid for pid, _, _ in ray_query(cluster, TRAIN_WORKERS)}
    stage = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=repo.path, env=repo.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = Lines(stage)
    try:
        wait_for(lambda: storage.is_dir() and checkpointed_epochs(storage) >= 1, 600, "the first checkpoint")
        alive = [w for w in ray_query(cluster, TRAIN_WORKERS) if w[2] == "ALIVE" and w[0] not in before]
        assert len(alive) == 2, alive
        victim = alive[-1][0]
        killed_at = time.time()
        psutil.Process(victim).kill()
        stage.wait(timeout=900)
    finally:
        if stage.poll() is None:
            stage.kill()
    lines.thread.join(timeout=10)
    err = lines.text()
    assert stage.returncode == 0, err[-4000:]
    resumed = lines.first("from ray checkpoint", after=killed_at)
    assert resumed is not None, err[-4000:]
    start_epoch = int(resumed[1].split("starting at epoch ")[1].split()[0])
    assert 1 <= start_epoch < 3, resumed[1]
    finished = lines.lines[-1][0]
    print(f"\nrestart cost: training resumed {resumed[0] - killed_at:.1f} s after the kill "
          f"(from epoch {start_epoch + 1}), run finished {finished - killed_at:.1f} s after it")

    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["epochs"] == 3
    history = (repo.path / "artifacts/pretrain/history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2", "3"]
    client = cluster.mlflow.client()
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_top1", "val_loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)  # 1-based epochs, each once


def test_a_lost_node_ends_the_run_in_one_error_line_and_a_rerun_resumes(tmp_path, cluster):
    storage = cluster.storage / "node-loss"
    repo = cluster_repo(tmp_path / "repo", cluster, {"train": {"epochs": 3}, "ray": {"storage_path": str(storage)}})
    repo.stage("prepare")
    stage = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=repo.path, env=repo.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = Lines(stage)
    try:
        wait_for(lambda: storage.is_dir() and checkpointed_epochs(storage) >= 1, 600, "the first checkpoint")
        lost = cluster.nodes[-1]
        lost.stop(grace=0)  # every process of the second node, SIGKILL by PID: a crashed machine
        stage.wait(timeout=600)
    finally:
        if stage.poll() is None:
            stage.kill()
    lines.thread.join(timeout=10)
    err = lines.text()
    assert stage.returncode == 2, err[-4000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: ray: ") and "resume" in errors[0], err[-4000:]
    assert "Traceback" not in err
    print(f"\nnode lost: {errors[0]}")

    cluster._start(f"node{len(cluster.nodes)}", head=False)  # the node comes back
    wait_for(lambda: cluster._alive_nodes() >= 2, 120, "the replacement node")
    again = repo.stage("pretrain")
    assert "from ray checkpoint" in again.stderr, again.stderr[-3000:]
    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["epochs"] == 3
