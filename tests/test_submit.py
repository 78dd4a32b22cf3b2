"""`python -m pipeline.submit -- CMD`: the pipeline as a Ray job on the 2-node loopback cluster."""
import json
import signal
import subprocess
import sys

import pytest

from cluster_fixture import TRAIN_WORKERS, cluster_repo, ray_query, wait_for

pytestmark = pytest.mark.slow


def submit_env(repo, cluster) -> dict:
    return {**repo.env, "RAY_API_SERVER_ADDRESS": cluster.dashboard_url}


def job_status(cluster, job_id: str) -> str:
    return ray_query(cluster, "from ray.job_submission import JobSubmissionClient\n"
                     f"print(json.dumps(str(JobSubmissionClient('{cluster.dashboard_url}').get_job_status('{job_id}').value)))")


def job_id_of(stderr: str) -> str:
    return next(line.split()[2] for line in stderr.splitlines() if line.startswith("[submit] job "))


def test_a_submitted_repro_succeeds_and_its_results_come_back(tmp_path, cluster):
    repo = cluster_repo(tmp_path / "repo", cluster)
    (repo.path / "stray.bin").write_bytes(b"x" * 1000)
    (repo.path / ".dvcignore").write_text("stray.bin\n")
    out = repo.run(sys.executable, "-m", "pipeline.submit", "--", "dvc", "repro", "pretrain",
                   env=submit_env(repo, cluster), timeout=900)
    assert "rank 0/2" in out.stdout, "the job's log was streamed"
    assert "SUCCEEDED" in out.stderr
    assert job_status(cluster, job_id_of(out.stderr)) == "SUCCEEDED"
    for rel in ("dvc.lock", "metrics/pretrain.json", "artifacts/pretrain/model.pt", "artifacts/pretrain/history.csv",
                "artifacts/pretrain/manifest.json", "artifacts/prepare/manifest.json"):
        assert (repo.path / rel).is_file(), rel
    status = repo.run("dvc", "status", "pretrain", "--json")
    # Not "modified": what came back is what dvc.lock records (DVC's cache here has not seen it).
    assert json.loads(status.stdout) == {"pretrain": [{"changed outs": {"artifacts/pretrain": "not in cache"}}]}
    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    run = cluster.mlflow.client().get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert not (repo.path / "mlflow").exists()


def test_a_failing_job_exits_non_zero(tmp_path, cluster):
    # Valid params (the batch is within the schema's bound, checked before submission) that the stage
    # refuses on the cluster: a batch larger than the 1,437 training images it prepares there.
    repo = cluster_repo(tmp_path / "repo", cluster, {"train": {"batch_size": 4096}})
    out = repo.run(sys.executable, "-m", "pipeline.submit", "--", "dvc", "repro", "pretrain",
                   env=submit_env(repo, cluster), check=False, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: train.batch_size" in out.stdout, "the stage's own error line, from the job's log"
    assert "FAILED" in out.stderr
    assert job_status(cluster, job_id_of(out.stderr)) == "FAILED"
    assert not (repo.path / "dvc.lock").exists()


def test_ctrl_c_stops_the_remote_job(tmp_path, cluster):
    repo = cluster_repo(tmp_path / "repo", cluster, {"train": {"epochs": 20}})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.submit", "--", "dvc", "repro", "pretrain"],
                            cwd=repo.path, env=submit_env(repo, cluster), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        before = {pid for pid, _, state in ray_query(cluster, TRAIN_WORKERS)}
        wait_for(lambda: any(state == "ALIVE" and pid not in before
                             for pid, _, state in ray_query(cluster, TRAIN_WORKERS)), 600, "training workers")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert job_status(cluster, job_id_of(err)) == "STOPPED"
    wait_for(lambda: not any(state == "ALIVE" for _, _, state in ray_query(cluster, TRAIN_WORKERS)), 120,
             "the training workers to end")
    assert not (repo.path / "dvc.lock").exists()
