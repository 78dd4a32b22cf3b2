"""The pipeline on a real 2-node Ray cluster (loopback, token auth) with a real MLflow tracking server.

One cluster and one tracking server serve the whole module: a head and a
second node with one CPU each, so two training workers with one CPU each can
only run one per node.
"""
import json

import pytest

from cluster_fixture import ALIVE_NODES, TRAIN_WORKERS, cluster, cluster_repo, ray_query  # noqa: F401 (fixture)
from pipeline import cluster as cluster_module
from pipeline import tracking
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
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STAGE] == "pretrain"
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
        f"tags.`{tracking.TAG_STAGE}` = 'pretrain' and tags.`{tracking.TAG_REPO}` = '{repo.path.resolve()}'")) == []

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
