"""Faults on the 2-node loopback cluster: killed training workers, an interrupted driver, a lost node.

Prints the measured restart cost per failure (seconds from the kill to
training resumed from the checkpoint) and how long an interrupted driver's
workers outlive it; not timed asserts.
"""
import json
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import psutil
import pytest

from cluster_fixture import TRAIN_WORKERS, cluster_repo, ray_query, wait_for
from conftest import latest_checkpoint
from pipeline.tracking import runs

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


@contextmanager
def pretrain_stage(repo):
    """The pretrain stage in a process of its own, with its stderr lines; killed if still running after."""
    stage = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=repo.path, env=repo.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = Lines(stage)
    try:
        yield stage, lines
    finally:
        if stage.poll() is None:
            stage.kill()
        lines.thread.join(timeout=10)


def started(lines: Lines, after: float) -> tuple[float, int, str]:
    """When rank 0 of a worker group started after `after`: (time, epoch it starts at, from what)."""
    t, line = wait_for(lambda: lines.first("starting at epoch ", after), 600, "a worker group to start")
    match = re.search(r"starting at epoch (\d+) from (.*)$", line)
    return t, int(match[1]), match[2]


def pretrain_runs(cluster, repo) -> list:
    """This repo's pretrain runs on the tracking server."""
    client = cluster.mlflow.client()
    exp = client.get_experiment_by_name(repo.params()["mlflow"]["experiment"])
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{runs.TAG_STAGE}` = 'pretrain' and tags.`{runs.TAG_REPO}` = '{repo.path.resolve()}'"))


def assert_one_value_per_epoch(client, run_id: str, epochs: int) -> None:
    """Every per-epoch metric holds epochs 1..n once each, logged in epoch order (none interleaved)."""
    for key in ("train_loss", "val_top1", "val_top5", "val_loss", "lr", "img_per_sec", "epoch_seconds"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
        assert [m.step for m in history] == list(range(1, epochs + 1)), (key, [m.step for m in history])


def test_three_killed_workers_each_resume_from_the_latest_checkpoint_and_mlflow_keeps_one_value_per_step(
        tmp_path, cluster):
    epochs, failures = 6, 3
    storage = cluster.storage / "worker-kills"
    repo = cluster_repo(tmp_path / "repo", cluster, {"train": {"epochs": epochs}, "ray": {
        "max_failures": failures, "storage_path": str(storage)}})
    repo.stage("prepare")
    seen = {pid for pid, _, _ in ray_query(cluster, TRAIN_WORKERS)}
    restarts = []  # per failure: (seconds kill -> resumed, checkpoint at the kill, epoch resumed at, latest then)
    with pretrain_stage(repo) as (stage, lines):
        _, start_epoch, origin = started(lines, 0.0)
        assert start_epoch == 0 and origin == "scratch", origin
        for failure in range(failures):
            group = [w for w in ray_query(cluster, TRAIN_WORKERS) if w[2] == "ALIVE" and w[0] not in seen]
            assert len(group) == 2 and len({node for _, node, _ in group}) == 2, group  # one per node
            seen |= {pid for pid, _, _ in group}
            # A checkpoint this group wrote, then the kill, mid-way through the next epoch.
            wait_for(lambda: latest_checkpoint(storage) > start_epoch, 600, "a new checkpoint")
            at_kill = latest_checkpoint(storage)
            killed_at = time.time()
            psutil.Process(group[failure % 2][0]).kill()
            resumed_at, start_epoch, origin = started(lines, killed_at)
            restarts.append((resumed_at - killed_at, at_kill, start_epoch, latest_checkpoint(storage)))
            assert origin.startswith("ray checkpoint") and f"epoch-{start_epoch:04d}" in origin, origin
            assert start_epoch < epochs, "killed before the run could finish"
        stage.wait(timeout=900)
    err = lines.text()
    assert stage.returncode == 0, err[-4000:]
    finished = lines.lines[-1][0]
    for i, (cost, at_kill, resumed, latest) in enumerate(restarts, 1):
        print(f"\nfailure {i}: killed with epoch {at_kill} checkpointed; resumed at epoch {resumed} "
              f"{cost:.1f} s after the kill")
        assert resumed == latest, "resumed from the latest checkpoint"
        # At most the epoch in progress is redone: none that had a checkpoint when the worker died.
        assert at_kill <= resumed <= at_kill + 1, restarts
    print(f"run finished {finished - killed_at:.1f} s after the last kill")

    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["epochs"] == epochs
    history = (repo.path / "artifacts/pretrain/history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == [str(e) for e in range(1, epochs + 1)]
    client = cluster.mlflow.client()
    [run] = pretrain_runs(cluster, repo)
    assert run.info.run_id == manifest["mlflow_run_id"] and run.info.status == "FINISHED"
    assert_one_value_per_epoch(client, run.info.run_id, epochs)


def test_an_interrupted_driver_leaves_no_workers_and_a_rerun_continues_the_same_ray_and_mlflow_run(
        tmp_path, cluster):
    epochs = 5
    storage = cluster.storage / "driver-interrupts"
    repo = cluster_repo(tmp_path / "repo", cluster, {"train": {"epochs": epochs}, "ray": {"storage_path": str(storage)}})
    repo.stage("prepare")
    attempts = []  # per interruption: the MLflow run, the Ray run dir resumed from
    for sig in (signal.SIGTERM, signal.SIGINT):
        with pretrain_stage(repo) as (stage, lines):
            _, start_epoch, origin = started(lines, 0.0)
            wait_for(lambda: latest_checkpoint(storage) > start_epoch, 600, "a new checkpoint")
            stopped_at = time.time()
            stage.send_signal(sig)  # SIGTERM as a job scheduler sends; SIGINT as Ctrl-C
            stage.wait(timeout=120)
        err = lines.text()
        assert stage.returncode == 128 + sig, err[-4000:]
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: pretrain: interrupted ({sig.name}); nothing was recorded as finished, and a rerun picks up "
            "from the last checkpoint"], err[-4000:]
        assert "Traceback" not in err
        wait_for(lambda: not any(state == "ALIVE" for _, _, state in ray_query(cluster, TRAIN_WORKERS)), 120,
                 "the training workers to end")
        print(f"\n{sig.name}: no training worker left on the cluster {time.time() - stopped_at:.1f} s after it")
        [run] = pretrain_runs(cluster, repo)
        assert run.info.status == "KILLED"
        attempts.append((run, origin))
        assert not (repo.path / "artifacts/pretrain/manifest.json").exists()

    again = repo.stage("pretrain")
    resumed = re.search(r"starting at epoch (\d+) from ray checkpoint (\S+)", again.stderr)
    assert resumed and 2 <= int(resumed[1]) < epochs, again.stderr[-3000:]
    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["ray_storage_path"] == str(storage)
    assert [p.name for p in storage.glob("pretrain-*")] == [manifest["ray_run_name"]], "one Ray run, resumed"
    assert resumed[2].startswith(str(storage / manifest["ray_run_name"]))
    assert attempts[1][1].startswith(f"ray checkpoint {storage / manifest['ray_run_name']}")

    [run] = pretrain_runs(cluster, repo)
    assert run.info.run_id == manifest["mlflow_run_id"] == attempts[0][0].info.run_id == attempts[1][0].info.run_id
    assert run.info.status == "FINISHED" and run.data.tags[runs.TAG_ATTEMPTS] == "3"
    assert run.data.tags[runs.TAG_PARENT] == manifest["mlflow_parent_run_id"]
    client = cluster.mlflow.client()
    assert client.get_run(manifest["mlflow_parent_run_id"]).info.status == "FINISHED"
    assert client.get_run(attempts[0][0].data.tags[runs.TAG_PARENT]).info.status == "KILLED"
    assert_one_value_per_epoch(client, run.info.run_id, epochs)


def test_a_lost_node_ends_the_run_in_one_error_line_and_a_rerun_resumes(tmp_path, cluster):
    storage = cluster.storage / "node-loss"
    repo = cluster_repo(tmp_path / "repo", cluster, {"train": {"epochs": 3}, "ray": {"storage_path": str(storage)}})
    repo.stage("prepare")
    with pretrain_stage(repo) as (stage, lines):
        wait_for(lambda: latest_checkpoint(storage) >= 1, 600, "the first checkpoint")
        lost = cluster.nodes[-1]
        lost.stop(grace=0)  # every process of the second node, SIGKILL by PID: a crashed machine
        stage.wait(timeout=600)
    err = lines.text()
    assert stage.returncode == 2, err[-4000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: ray: ") and "resume" in errors[0], err[-4000:]
    assert "Traceback" not in err
    print(f"\nnode lost: {errors[0]}")

    cluster._start(f"node{len(cluster.nodes)}", head=False)  # the node comes back
    wait_for(lambda: cluster._alive_nodes() >= 2, 120, "the replacement node")
    [failed] = pretrain_runs(cluster, repo)
    assert failed.info.status == "FAILED"
    again = repo.stage("pretrain")
    assert "from ray checkpoint" in again.stderr, again.stderr[-3000:]
    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["epochs"] == 3
    [run] = pretrain_runs(cluster, repo)  # the failed attempt's run, continued
    assert run.info.run_id == failed.info.run_id == manifest["mlflow_run_id"] and run.info.status == "FINISHED"
    assert_one_value_per_epoch(cluster.mlflow.client(), run.info.run_id, 3)
