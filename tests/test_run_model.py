"""The MLflow run model on a real sqlite store: parent identity, linked children, relocation."""
import shutil
import subprocess
import time

import pytest
import yaml
from conftest import dvc_record, stub_project

from pipeline.core import layout, outputs
from pipeline.tracking import store, runs
from pipeline.config import Config, parse_config


def _git_repo(path, params: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", *cmd], cwd=path, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    return path


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "inv-1")
    return _git_repo(tmp_path / "repo", Config().to_dict())


def _client(cfg, root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(runs.tracking_uri(cfg, root))


def test_parent_carries_identity_changed_params_and_whole_duration(repo):
    import mlflow

    cfg = parse_config({**Config().to_dict(), "optim": {**Config().to_dict()["optim"], "base_lr": 0.004}}, "t")
    with runs.stage_run(cfg, "prepare", repo) as a:
        time.sleep(0.3)
        outputs.write_manifest("prepare", repo, a)
    with runs.stage_run(cfg, "pretrain", repo) as b:
        mlflow.log_metric("x", 1)
        time.sleep(0.3)
    client = _client(cfg, repo)
    parent = client.get_run(b.parent_run_id)
    tags = parent.data.tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit == tags["iformer.git_commit"]
    assert tags["mlflow.user"] and tags["mlflow.source.name"] == "python -m stages.prepare"
    assert tags["mlflow.runName"] == parent.info.run_name
    assert tags["iformer.params_changed"] == "optim.base_lr=0.004"
    kids = [client.get_run(x.run_id) for x in (a, b)]
    assert parent.info.start_time <= kids[0].info.start_time
    assert parent.info.end_time >= kids[1].info.end_time, "the parent ends with the last stage"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["wall_s"] >= 0.6


def test_linked_child_carries_this_invocations_identity(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "inv-1")
    base = Config()
    repo = stub_project(tmp_path / "dvc-repo", base.to_dict())
    with runs.stage_run(base, "prepare", repo) as prep:
        prep.log_headline({"images": 1797.0})
        outputs.write_manifest("prepare", repo, prep)
    dvc_record(repo, "prepare")  # DVC records it: the next run skips it, and links it
    monkeypatch.setenv("IFORMER_PIPELINE_RUN", "inv-2")
    monkeypatch.setenv("DVC_EXP_NAME", "epochs3")
    cfg = parse_config({**base.to_dict(), "train": {**base.to_dict()["train"], "epochs": 3}}, "t")
    with runs.stage_run(cfg, "pretrain", repo) as pre:
        pass
    client = _client(cfg, repo)
    kids = client.search_runs([pre.experiment_id], f"tags.`{runs.TAG_PARENT}` = '{pre.parent_run_id}'")
    linked = next(k for k in kids if k.data.tags[runs.TAG_STAGE] == "prepare")
    assert linked.data.tags[runs.TAG_LINKED_FROM] == prep.run_id
    assert linked.data.tags["iformer.dvc_experiment"] == "epochs3"
    assert linked.data.tags["iformer.params_hash"] == cfg.params_hash() != base.params_hash()
    assert linked.data.tags["iformer.linked_params_hash"] == base.params_hash()
    assert linked.data.tags["iformer.linked_dvc_experiment"] == "workspace"
    assert linked.data.params["train.epochs"] == "3", "this experiment's params, not the producer's"
    # The restored stage's headline metrics reach this invocation's parent, as if it had run here.
    assert client.get_run(prep.parent_run_id).data.metrics["images"] == 1797.0
    assert client.get_run(pre.parent_run_id).data.metrics["images"] == 1797.0


def test_moved_repo_keeps_working_artifact_links(repo, tmp_path):
    import mlflow

    cfg = Config()
    note = repo / "note.txt"
    note.write_text("hello")
    with runs.stage_run(cfg, "prepare", repo) as srun:
        mlflow.log_artifact(str(note), "x")
    moved = tmp_path / "elsewhere"
    shutil.move(repo, moved)
    assert store.relocate(moved) == (repo / "mlflow" / "artifacts").as_uri()
    client = _client(cfg, moved)
    run = client.get_run(srun.run_id)
    assert run.info.artifact_uri.startswith((moved / "mlflow" / "artifacts").as_uri())
    got = client.download_artifacts(srun.run_id, "x/note.txt", str(tmp_path))
    assert open(got).read() == "hello"
    exp = client.get_experiment(srun.experiment_id)
    assert exp.artifact_location == (layout.state_root(moved) / "mlflow" / "artifacts").as_uri()
    assert store.relocate(moved) is None, "a second pass has nothing to move"
