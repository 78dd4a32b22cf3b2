"""The pipeline on a real 2-node Ray cluster (loopback, token auth) with a real MLflow tracking server.

One cluster and one tracking server serve the whole module: a head and a
second node with one CPU each, so two training workers with one CPU each can
only run one per node.
"""
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from cluster_fixture import ALIVE_NODES, TRAIN_WORKERS, cluster_repo, ray_query
from pipeline.compute import cluster as cluster_module
from pipeline.tracking import runs
from pipeline.config import Config
from pipeline.errors import PipelineError

pytestmark = pytest.mark.slow


def test_a_cluster_run_refuses_a_local_tracking_store(tmp_path, cluster):
    repo = cluster_repo(tmp_path / "repo", cluster, {"mlflow": {"tracking_uri": None}})
    repo.stage("prepare")
    out = repo.stage_error("pretrain", "mlflow.tracking_uri")
    assert "sqlite:///" in out.stderr and "cannot log to" in out.stderr
    assert not (repo.path / "mlflow").exists() or repo.runs("tags.`iformer.stage` = 'pretrain'") == []


def test_pretrain_runs_its_two_workers_on_two_nodes_and_logs_to_the_tracking_server(tmp_path, cluster):
    repo = cluster_repo(tmp_path / "repo", cluster, {"ray": {"prune_checkpoints": False}})
    repo.stage("prepare")
    before = {pid for pid, _, _ in ray_query(cluster, TRAIN_WORKERS)}
    out = repo.stage("pretrain")
    assert "rank 0/2" in out.stderr, out.stderr[-3000:]

    workers = [w for w in ray_query(cluster, TRAIN_WORKERS) if w[0] not in before]
    nodes = ray_query(cluster, ALIVE_NODES)
    assert len(workers) == 2 and len(nodes) == 2, (workers, nodes)
    assert sorted(node for _, node, _ in workers) == nodes, "one worker on each node"

    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["ray_storage_path"] == str(cluster.storage)
    assert list((cluster.storage / manifest["ray_run_name"]).rglob("state.pt")), "checkpoints in the shared storage"
    client = cluster.mlflow.client()
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[runs.TAG_STAGE] == "pretrain"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert steps == [1, 2], steps
    assert client.get_run(manifest["mlflow_parent_run_id"]).info.status == "FINISHED"
    assert not (repo.path / "mlflow").exists(), "nothing went to a local store"


def test_a_cluster_run_refuses_storage_inside_the_repo_and_takes_shared_paths_and_uris(tmp_path, cluster):
    repo = cluster_repo(tmp_path / "repo", cluster, {"ray": {"storage_path": "ray_results"}})
    repo.stage("prepare")
    out = repo.stage_error("pretrain", "ray.storage_path: 'ray_results' is a directory inside this repo")
    assert "every node reaches" in out.stderr and "s3://" in out.stderr
    assert not (repo.path / "ray_results").exists(), "refused before Ray started"
    client = cluster.mlflow.client()
    exp = client.get_experiment_by_name(repo.params()["mlflow"]["experiment"])
    assert client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{runs.TAG_STAGE}` = 'pretrain' and tags.`{runs.TAG_REPO}` = '{repo.path.resolve()}'")) == []

    params = repo.params()

    def with_storage(sp: str, address: str | None = cluster.address) -> Config:
        return Config.model_validate({**params, "ray": {**params["ray"], "address": address, "storage_path": sp}})

    for sp in ("s3://bucket/ray", "gs://bucket/ray", "abfs://container@account.dfs.core.windows.net/ray",
               str(cluster.storage)):
        cfg = with_storage(sp)
        cluster_module.check(cfg)  # every node can reach it
        assert cluster_module.storage_path(cfg, repo.path) == sp, "a URI keeps its //"
    for sp in ("ray_results", "./ckpt", "runs/ray"):
        with pytest.raises(PipelineError, match=r"^ray\.storage_path: .* every node reaches"):
            cluster_module.check(with_storage(sp))
    cluster_module.check(with_storage("ray_results", address=None))  # a local Ray keeps checkpoints in the repo


def _http(url: str, token: str | None, data: bytes | None = None) -> tuple[int, str]:
    """Status and body of a request to the cluster's dashboard, with `token` as Ray's bearer header."""
    headers = {"Content-Type": "application/json"} if data else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _submissions(jobs_url: str, token: str) -> list[str]:
    """The entrypoints of the jobs submitted to the job server (drivers of ray.init are listed too: left out)."""
    status, body = _http(jobs_url, token)
    assert status == 200, body
    return [j["entrypoint"] for j in json.loads(body) if j.get("type") == "SUBMISSION"]


def _client(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_clients_and_job_submissions_without_the_token_are_refused(cluster):
    token = cluster.token_path.read_text().strip()
    others = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    no_token, wrong_token = others, {**others, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}

    # A driver (ray.init), as a stage or anyone with the GCS address would connect.
    driver = f"import ray; ray.init(address={cluster.address!r}); print('CONNECTED', len(ray.nodes()))"
    for env in (no_token, wrong_token):
        out = _client(driver, env)
        assert out.returncode != 0 and "CONNECTED" not in out.stdout, out.stdout + out.stderr[-2000:]
        said = (out.stdout + out.stderr).lower()
        assert "token" in said or "authenticat" in said, out.stderr[-2000:]
    out = _client(driver, cluster.env)
    assert out.returncode == 0 and "CONNECTED 2" in out.stdout, out.stderr[-2000:]

    # The dashboard's HTTP APIs: the job server and the state API.
    jobs, nodes = f"{cluster.dashboard_url}/api/jobs/", f"{cluster.dashboard_url}/api/v0/nodes"
    submission = json.dumps({"entrypoint": "echo refused"}).encode()
    for url, data in ((jobs, None), (nodes, None), (jobs, submission)):
        assert _http(url, None, data)[0] == 401, url
        assert _http(url, "0" * 64, data)[0] == 403, url
    assert _submissions(jobs, token) == [], "the refused submissions created no job"
    assert _http(nodes, token)[0] == 200

    # Ray's Job SDK, as `pipeline.submit` uses it.
    submit = ("from ray.job_submission import JobSubmissionClient\n"
              f"client = JobSubmissionClient({cluster.dashboard_url!r})\n"
              "print('SUBMITTED', client.submit_job(entrypoint='echo submitted'))")
    for env in (no_token, wrong_token):
        out = _client(submit, env)
        assert out.returncode != 0 and "SUBMITTED" not in out.stdout, out.stdout + out.stderr[-2000:]
    out = _client(submit, cluster.env)
    assert out.returncode == 0 and "SUBMITTED" in out.stdout, out.stderr[-2000:]
    assert _submissions(jobs, token) == ["echo submitted"]
