"""The MLflow spine on a real sqlite store: parent/child ownership and linking."""
import json
import socket

import pytest

from pipeline import layout, tracking
from pipeline.config import Config
from pipeline.errors import PipelineError


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "test-invocation-1")
    return tmp_path


def _runs(root, cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri(cfg, root))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_stages_share_one_parent_and_cached_stages_are_linked(store, monkeypatch):
    import mlflow

    cfg = Config()
    with tracking.stage_run(cfg, "prepare", store) as prep:
        mlflow.log_metric("train_images", 42)
        tracking.write_manifest("prepare", store, prep, source="digits")
    with tracking.stage_run(cfg, "pretrain", store) as pre:
        tracking.write_manifest("pretrain", store, pre)
    assert pre.parent_run_id == prep.parent_run_id

    # A new invocation in which DVC restored `prepare` from cache: only pretrain runs.
    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "test-invocation-2")
    with tracking.stage_run(cfg, "pretrain", store) as pre2:
        pass
    assert pre2.parent_run_id != prep.parent_run_id
    client, runs = _runs(store, cfg)
    kids = [r for r in runs if r.data.tags.get(tracking.TAG_PARENT) == pre2.parent_run_id]
    by_stage = {r.data.tags[tracking.TAG_STAGE]: r for r in kids}
    assert set(by_stage) == {"prepare", "pretrain"}
    linked = by_stage["prepare"]
    assert linked.data.tags[tracking.TAG_LINKED_FROM] == prep.run_id
    assert linked.data.metrics["train_images"] == 42 and linked.info.status == "FINISHED"
    assert linked.data.params["train.epochs"] == str(cfg.train.epochs)
    parent = client.get_run(pre2.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["iformer.params_hash"] == cfg.params_hash()
    assert parent.data.params["model.variant"] == "iformer_t"


def test_failed_stage_marks_runs_failed(store):
    cfg = Config()
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "prepare", store) as srun:
            raise RuntimeError("boom")
    client, _ = _runs(store, cfg)
    assert client.get_run(srun.run_id).info.status == "FAILED"
    assert client.get_run(srun.parent_run_id).info.status == "FAILED"
    assert not layout.manifest_path("prepare", store).exists()


def test_unreachable_server_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    with pytest.raises(PipelineError, match=f"tracking server http://127.0.0.1:{port} is unreachable"):
        tracking.check_reachable(f"http://127.0.0.1:{port}")
    with pytest.raises(PipelineError, match="is not a tracking URI"):
        tracking.check_reachable("mlruns.db")


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking.tracking_uri(Config(), tmp_path) == "http://server:5000"
    cfg = Config.model_validate({"mlflow": {"tracking_uri": "sqlite:////x/y.db"}})
    assert tracking.tracking_uri(cfg, tmp_path) == "sqlite:////x/y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(Config(), tmp_path) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"


def test_manifest_is_written_atomically(store):
    srun = tracking.StageRun("r", "p", "sqlite:///x", "0")
    path = tracking.write_manifest("report", store, srun, top1=0.5)
    assert json.loads(path.read_text())["top1"] == 0.5
    assert not list(path.parent.glob("*.tmp"))
