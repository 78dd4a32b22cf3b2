"""The MLflow spine on a real sqlite store: parent/child ownership and linking."""
import json
import socket

import pytest
from conftest import dvc_record, stub_project

from pipeline.core import layout, outputs
from pipeline.tracking import runs as tracking
from pipeline.tracking.store import check_reachable
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
    store = stub_project(store / "repo", cfg.to_dict())
    with tracking.stage_run(cfg, "prepare", store) as prep:
        mlflow.log_metric("train_images", 42)
        outputs.write_manifest("prepare", store, prep, source="digits")
    with tracking.stage_run(cfg, "pretrain", store) as pre:
        outputs.write_manifest("pretrain", store, pre)
    assert pre.parent_run_id == prep.parent_run_id
    dvc_record(store, "prepare")

    # A new invocation in which DVC skipped `prepare` (up to date): only pretrain runs.
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

    # prepare's output changed since DVC recorded it: not linked, named stale, and pretrain's figures stay off.
    (store / "artifacts/prepare/manifest.json").write_text("{}")
    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "test-invocation-3")
    with tracking.stage_run(cfg, "pretrain", store) as pre3:
        pre3.log_headline({"img_per_sec": 100.0})
    assert pre3.stale == {"prepare": "prepare: output artifacts/prepare modified"}
    assert pre3.stale_upstream == pre3.stale["prepare"]
    kids = client.search_runs([pre3.experiment_id], f"tags.`{tracking.TAG_PARENT}` = '{pre3.parent_run_id}'")
    assert [k.data.tags[tracking.TAG_STAGE] for k in kids] == ["pretrain"]
    parent = client.get_run(pre3.parent_run_id)
    assert "img_per_sec" not in parent.data.metrics
    assert parent.data.tags[tracking.TAG_STALE] == "prepare, pretrain (output artifacts/prepare modified)"


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
        check_reachable(f"http://127.0.0.1:{port}")
    with pytest.raises(PipelineError, match="is not a tracking URI"):
        check_reachable("mlruns.db")


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking.tracking_uri(Config(), tmp_path) == "http://server:5000"
    cfg = Config.model_validate({"mlflow": {"tracking_uri": "sqlite:////x/y.db"}})
    assert tracking.tracking_uri(cfg, tmp_path) == "sqlite:////x/y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(Config(), tmp_path) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"


def test_manifest_is_written_atomically(store):
    srun = tracking.StageRun("r", "p", "sqlite:///x", "0")
    path = outputs.write_manifest("report", store, srun, top1=0.5)
    assert json.loads(path.read_text())["top1"] == 0.5
    assert not list(path.parent.glob("*.tmp"))


def test_an_interrupted_stage_run_is_reopened_under_the_new_parent_with_its_metrics(store, monkeypatch):
    import mlflow

    from pipeline.tracking.metrics import MetricLogger

    cfg = Config()
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run(cfg, "pretrain", store) as first:
            MetricLogger(first.tracking_uri, first.run_id).log({"epoch": 0, "train_loss": 2.0})
            raise KeyboardInterrupt  # Ctrl-C after epoch 1
    client, _ = _runs(store, cfg)
    assert client.get_run(first.run_id).info.status == "KILLED"

    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "test-invocation-2")  # the rerun: a new pipeline run
    changed = Config.model_validate({"ray": {"max_failures": 2}})  # not part of the training config
    with tracking.stage_run(changed, "pretrain", store, reopen=first.run_id) as again:
        assert mlflow.active_run().info.run_id == first.run_id
        logger = MetricLogger(again.tracking_uri, again.run_id)
        for epoch, loss in enumerate([2.0, 1.5]):  # the resumed loop offers its whole history
            logger.log({"epoch": epoch, "train_loss": loss})
    assert again.run_id == first.run_id and again.parent_run_id != first.parent_run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_PARENT] == again.parent_run_id
    assert run.data.tags[tracking.TAG_ATTEMPTS] == "2"
    assert run.data.tags["iformer.previous_parent_run_id"] == first.parent_run_id
    assert json.loads(run.data.tags["iformer.params_changed_on_reopen"]) == {"ray.max_failures": ["0", "2"]}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [(1, 2.0), (2, 1.5)]

    # Finished, unknown or another stage's runs are not reopened: a new child run opens.
    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "test-invocation-3")
    for other in (first.run_id, "0" * 32):
        with tracking.stage_run(cfg, "pretrain", store, reopen=other) as fresh:
            assert fresh.run_id not in (first.run_id, other)
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "evaluate", store) as failed:
            raise RuntimeError("boom")
    with tracking.stage_run(cfg, "pretrain", store, reopen=failed.run_id) as fresh:
        assert fresh.run_id != failed.run_id


def test_a_stepped_wall_clock_changes_neither_the_invocation_nor_an_owner(monkeypatch):
    """psutil's create_time is the boot time plus the ticks since boot, and Linux derives the boot
    time from the wall clock, so a clock step (NTP, a resumed VM) moves every process's start: in
    CI one `dvc repro` saw its start move by 5 s, then 20 s, and its stages opened three parents.
    Here each read of a start is 20 s later than the one before."""
    import itertools
    import os

    import psutil

    from pipeline.core import lifecycle
    from pipeline.tracking import invocation

    monkeypatch.delenv("IFORMER_PIPELINE_RUN", raising=False)
    dvc = psutil.Process(os.getppid())  # stands in for the `dvc` process above a stage
    monkeypatch.setattr(lifecycle, "dvc_process", lambda: dvc)
    real, steps = psutil.Process.create_time, itertools.count()
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 20.0 * next(steps))

    assert invocation.started_ms(dvc.pid) != invocation.started_ms(dvc.pid)  # the clock did move
    assert len({invocation.invocation_key() for _ in range(3)}) == 1, "one dvc repro, one parent run"
    tag = invocation.owner()
    assert invocation.owner_alive(tag) and invocation.owner() == tag
    assert invocation.owner(dvc.pid) != tag  # another process, another owner
    host, pid, _ = tag.rsplit(":", 2)
    assert not invocation.owner_alive(f"{host}:{pid}:0+0")  # the same pid, started another time: gone
