"""Bad input at the stage CLI: one clear error, exit 2, nothing half-written."""
import socket


def _fails_cleanly(repo, stage, needle, env=None):
    out = repo.stage_error(stage, needle, env=env)
    assert not (repo.path / "artifacts" / stage / "manifest.json").exists()
    return out


def test_unknown_key_stops_before_anything(tiny_repo):
    tiny_repo.set_params({"model": {"dropout": 0.2}})
    _fails_cleanly(tiny_repo, "prepare", "model.dropout = 0.2: unknown key")
    assert not (tiny_repo.path / "artifacts" / "prepare").exists()
    assert not (tiny_repo.path / "mlflow").exists(), "no MLflow store, let alone a run"


def test_every_stage_refuses_a_bad_value_before_importing_its_own_code(tiny_repo):
    """`stage.main` loads a stage's modules only once its params are valid: a typo costs no torch import."""
    import yaml

    tiny_repo.set_params({"train": {"epochs": 0}})
    names = list(yaml.safe_load((tiny_repo.path / "dvc.yaml").read_text())["stages"]) + ["field"]
    assert len(names) == 10
    for name in names:
        out = _fails_cleanly(tiny_repo, name, "train.epochs = 0", env={"PYTHONPROFILEIMPORTTIME": "1"})
        imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
        assert "pipeline.config" in imported, name  # the log is there: the params were read
        assert not {"torch", "timm", "mlflow", "ray", "mmdet"} & imported, (name, sorted(imported))


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


def test_unknown_tracking_scheme_fails_before_the_stage_checks(tiny_repo):
    tiny_repo.set_params({"mlflow": {"tracking_uri": "bogus://x"}})
    _fails_cleanly(tiny_repo, "prepare", "mlflow.tracking_uri / MLFLOW_TRACKING_URI: 'bogus://x' has an unknown scheme")
    assert not (tiny_repo.path / "artifacts" / "prepare").exists()


def test_empty_params_file_is_refused_by_the_stage_and_by_dvc(tiny_repo):
    (tiny_repo.path / "params.yaml").write_text("")
    _fails_cleanly(tiny_repo, "prepare", "params.yaml: is empty")
    out = tiny_repo.run("dvc", "repro", check=False)
    assert out.returncode != 0 and "missing from 'params.yaml'" in out.stdout + out.stderr


def test_resume_from_a_file_that_is_no_checkpoint(prepared_repo):
    junk = prepared_repo.path / "notes.pt"
    junk.write_text("these are notes, not tensors\n")
    prepared_repo.set_params({"train": {"resume_from": str(junk)}})
    try:
        out = _fails_cleanly(prepared_repo, "pretrain", f"train.resume_from: {junk} is not a loadable checkpoint")
        assert len(out.stderr) < 1000
    finally:
        prepared_repo.set_params({"train": {"resume_from": None}})


def test_unreachable_ray_cluster_fails_fast_before_any_run(prepared_repo):
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    prepared_repo.set_params({"ray": {"address": f"127.0.0.1:{port}", "connect_timeout_s": 5.0}})
    before = len(prepared_repo.runs())
    try:
        start = time.time()
        _fails_cleanly(prepared_repo, "pretrain", f"ray.address: nothing answers at 127.0.0.1:{port} within 5 s")
        assert time.time() - start < 60
    finally:
        prepared_repo.set_params({"ray": {"address": None}})
    assert len(prepared_repo.runs()) == before


def test_bad_exp_run_value_says_how_to_restore_params(tiny_repo):
    out = tiny_repo.run("dvc", "exp", "run", "-S", "train.epochs=abc", check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "train.epochs = 'abc'" in text and "git checkout -- params.yaml" in text, text[-3000:]
    assert "Traceback" not in text
