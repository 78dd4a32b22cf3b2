"""Bad input at the stage CLI: one clear error, exit 2, nothing half-written."""
import socket

import pytest


def _fails_cleanly(repo, stage, needle, env=None):
    out = repo.stage_error(stage, needle, env=env)
    assert not (repo.path / "artifacts" / stage / "manifest.json").exists()
    return out


def test_unknown_key_stops_before_anything(tiny_repo):
    tiny_repo.set_params({"model": {"dropout": 0.2}})
    _fails_cleanly(tiny_repo, "prepare", "model.dropout = 0.2: unknown key")
    assert not (tiny_repo.path / "artifacts" / "prepare").exists()
    assert not (tiny_repo.path / "mlflow").exists(), "no MLflow store, let alone a run"


def test_unreachable_tracking_server(tiny_repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _fails_cleanly(tiny_repo, "prepare", f"http://127.0.0.1:{port} is unreachable",
                   env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert not (tiny_repo.path / "artifacts" / "prepare").exists()


def test_missing_data_root_leaves_no_runs(tiny_repo):
    tiny_repo.set_params({"data": {"source": "imagefolder", "root": str(tiny_repo.path / "nowhere")}})
    _fails_cleanly(tiny_repo, "prepare", "data.root: ")
    assert tiny_repo.runs() == []


def test_pretrain_before_prepare(tiny_repo):
    _fails_cleanly(tiny_repo, "pretrain", "run the prepare stage first")
    assert tiny_repo.runs() == []


def test_dvc_repro_with_bad_params_commits_nothing(tiny_repo):
    tiny_repo.set_params({"train": {"epochs": 0}})
    out = tiny_repo.run("dvc", "repro", check=False)
    assert out.returncode != 0
    assert "train.epochs = 0" in out.stdout + out.stderr
    assert not (tiny_repo.path / "dvc.lock").exists()
