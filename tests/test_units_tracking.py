"""`pipeline.tracking.registry` and `store.relocate` on one real MLflow sqlite store (no server, no
stage run): registered versions and their tags, and every artifact column a moved repo rewrites,
logged models' and model versions' included. Expected locations follow MLflow's own layout:
`<experiment location>/<run id>/artifacts` and `<experiment location>/models/<model id>/artifacts`."""
from __future__ import annotations

import json
import sqlite3

import pytest

from pipeline.config import Config
from pipeline.tracking import registry, store


def cfg_for(experiment: str, variant: str = "iformer_s") -> Config:
    return Config.model_validate({"mlflow": {"experiment": experiment}, "model": {"variant": variant}})


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A store written at `<old>/mlflow/`, as the pipeline writes one (experiment at `<old>/mlflow/artifacts`),
    holding a run, a logged model and model versions from a logged model, a file and an S3 URL."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    base = tmp_path_factory.mktemp("tracking")
    old = base / "old"
    (old / "mlflow").mkdir(parents=True)
    uri = f"sqlite:///{old / 'mlflow' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp, _use_tracking_uri(uri):  # MLflow finds logged models by the global URI
        mp.delenv("DVC_ROOT", raising=False)
        client = MlflowClient(uri)
        exp = client.create_experiment("moved", artifact_location=(old / "mlflow" / "artifacts").as_uri())
        run = client.create_run(exp).info.run_id
        model = client.create_logged_model(exp, source_run_id=run, name="model").model_id
        client.create_registered_model("moved.iformer_t")
        from_model = client.create_model_version("moved.iformer_t", f"models:/{model}", run, model_id=model)
        from_file = client.create_model_version(
            "moved.iformer_t", f"{(old / 'mlflow' / 'artifacts').as_uri()}/{run}/artifacts/checkpoints", run)
        elsewhere = client.create_model_version("moved.iformer_t", "s3://bucket/model", run)
        yield {"base": base, "old": old, "uri": uri, "client": client, "experiment": exp, "run": run, "model": model,
               "versions": (from_model.version, from_file.version, elsewhere.version)}


# -- the registry ----------------------------------------------------------------------------------
def test_register_creates_the_model_once_and_numbers_its_versions(tracked):
    client, cfg = tracked["client"], cfg_for("reg")
    run_a = client.create_run(tracked["experiment"]).info.run_id
    run_b = client.create_run(tracked["experiment"]).info.run_id
    assert registry.model_name(cfg) == "reg.iformer_s"
    tags = {"iformer.checkpoint_sha256": "ab" * 32, "iformer.epochs": 3, "long": "x" * 6000}
    # The version number (an int from a database store, a string from a server: MLflow's entity either way).
    assert str(registry.register(client, cfg, f"runs:/{run_a}/checkpoints", run_a, tags)) == "1"
    assert str(registry.register(client, cfg, f"runs:/{run_b}/checkpoints", run_b, {})) == "2"
    model = client.get_registered_model("reg.iformer_s")
    assert model.description == ("iFormer iformer_s trained by the pipeline's pretrain stage; export files are "
                                 "tagged on each version.")
    first = client.get_model_version("reg.iformer_s", "1")
    assert (first.run_id, first.source, first.model_id) == (run_a, f"runs:/{run_a}/checkpoints", None)
    # Tag values are strings, cut to MLflow's 5,000-character limit (a longer one would be refused).
    assert first.tags == {"iformer.checkpoint_sha256": "ab" * 32, "iformer.epochs": "3", "long": "x" * 5000}


def test_a_logged_mlflow_model_lists_its_registered_versions(tracked):
    """The logged model's `mlflow.modelVersions` tag is what MLflow's UI shows its versions from (a tracking
    server writes it on create_model_version; a client on the sqlite store must)."""
    client, cfg = tracked["client"], cfg_for("logged")
    run = client.create_run(tracked["experiment"]).info.run_id
    model = client.create_logged_model(tracked["experiment"], source_run_id=run, name="model").model_id
    first = registry.register(client, cfg, f"models:/{model}", run, {})  # the fixture set MLflow's global URI
    second = registry.register(client, cfg, f"models:/{model}", run, {})
    got = client.get_model_version("logged.iformer_s", first)
    assert got.source == f"models:/{model}" and got.run_id == run
    listed = json.loads(client.get_logged_model(model).tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in listed] == [("logged.iformer_s", "1"), ("logged.iformer_s", "2")]
    assert (str(first), str(second)) == ("1", "2")


def test_a_version_a_server_already_listed_is_not_listed_twice(tracked):
    client, cfg = tracked["client"], cfg_for("served")
    run = client.create_run(tracked["experiment"]).info.run_id
    model = client.create_logged_model(tracked["experiment"], source_run_id=run, name="model").model_id
    # What a tracking server writes while creating version 1 (its store's int version).
    client.set_logged_model_tags(model, {"mlflow.modelVersions": json.dumps([{"name": "served.iformer_s", "version": 1}])})
    registry.link_logged_model(client, model, "served.iformer_s", "1")  # as a client of that server sees it
    assert json.loads(client.get_logged_model(model).tags["mlflow.modelVersions"]) == [
        {"name": "served.iformer_s", "version": 1}]


def test_version_of_and_attach_find_the_version_a_run_trained(tracked):
    client, cfg = tracked["client"], cfg_for("attach", "iformer_t")
    runs = [client.create_run(tracked["experiment"]).info.run_id for _ in range(3)]
    for run in runs[:2]:
        registry.register(client, cfg, f"runs:/{run}/checkpoints", run, {})
    assert str(registry.version_of(client, cfg, runs[1]).version) == "2"
    assert registry.version_of(client, cfg, runs[2]) is None  # trained nothing registered
    assert registry.version_of(client, cfg_for("nobody"), runs[0]) is None  # no such registered model

    files = {"classifier_224.mlpackage.zip": "runs:/e1/export/classifier_224.mlpackage.zip",
             "classifier_224.onnx": "runs:/e1/export/classifier_224.onnx"}
    assert str(registry.attach(client, cfg, runs[1], files)) == "2"
    assert client.get_model_version("attach.iformer_t", "2").tags == {
        "export.classifier_224.mlpackage.zip": "runs:/e1/export/classifier_224.mlpackage.zip",
        "export.classifier_224.onnx": "runs:/e1/export/classifier_224.onnx"}
    assert client.get_model_version("attach.iformer_t", "1").tags == {}, "only the version of that run"
    assert registry.attach(client, cfg, runs[2], files) is None


# -- a moved store ---------------------------------------------------------------------------------
def _moved(tracked, name: str):
    """A copy of the store as it would sit in a repo moved to `<base>/<name>`."""
    new = tracked["base"] / name
    (new / "mlflow").mkdir(parents=True)
    db = new / "mlflow" / "mlflow.db"
    with sqlite3.connect(tracked["old"] / "mlflow" / "mlflow.db") as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    return new, db


def test_relocate_rewrites_every_artifact_column(tracked, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("DVC_ROOT", raising=False)
    new, db = _moved(tracked, "new")
    old_prefix = (tracked["old"] / "mlflow" / "artifacts").as_uri()
    new_prefix = (new / "mlflow" / "artifacts").as_uri()
    assert store.relocate(new, db) == old_prefix

    client = MlflowClient(f"sqlite:///{db}")
    run, model = tracked["run"], tracked["model"]
    assert client.get_experiment(tracked["experiment"]).artifact_location == new_prefix
    assert client.get_run(run).info.artifact_uri == f"{new_prefix}/{run}/artifacts"
    assert client.get_logged_model(model).artifact_location == f"{new_prefix}/models/{model}/artifacts"
    with sqlite3.connect(db) as con:
        versions = dict(((v, (s, loc)) for v, s, loc in con.execute(
            "select version, source, storage_location from model_versions where name = 'moved.iformer_t'")))
    from_model, from_file, elsewhere = (int(v) for v in tracked["versions"])
    assert versions[from_model] == (f"models:/{model}", f"{new_prefix}/models/{model}/artifacts")
    assert versions[from_file] == (f"{new_prefix}/{run}/artifacts/checkpoints",) * 2
    assert versions[elsewhere] == ("s3://bucket/model",) * 2, "a location outside the repo is left alone"
    with sqlite3.connect(db) as con:
        for table, column in store.COLUMNS:
            left = con.execute(f"select count(*) from {table} where {column} like ?", (old_prefix + "%",)).fetchone()
            assert left == (0,), f"{table}.{column} still points into the old repo"
    assert store.relocate(new, db) is None, "a second pass has nothing to move"


def test_relocate_leaves_what_is_not_a_moved_default_store(tracked, tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert store.relocate(tmp_path, tmp_path / "absent.db") is None
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert store.relocate(tmp_path, empty) is None  # no MLflow tables
    assert store.relocate(tracked["old"], tracked["old"] / "mlflow" / "mlflow.db") is None  # not moved
    assert store.default_db(tmp_path) == tmp_path / "mlflow" / "mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tracked["old"]))  # a `dvc exp run --temp` copy uses the real repo's store
    assert store.default_db(tmp_path) == tracked["old"] / "mlflow" / "mlflow.db"


def test_ui_url_opens_the_experiments_runs_table_by_the_id_in_the_store(tracked, tmp_path):
    db = tracked["old"] / "mlflow" / "mlflow.db"
    exp_id = store.experiment_id(db, "moved")
    assert exp_id == tracked["experiment"]  # the id MLflow itself gave the experiment
    assert store.ui_url(exp_id) == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    assert store.experiment_id(db, "never-made") is None and store.ui_url(None, 5001) == "http://127.0.0.1:5001/"
    assert store.experiment_id(tmp_path / "absent.db", "moved") is None and not (tmp_path / "absent.db").exists()


# -- the parent run's headlines, the registered version and the runs table's view (issue 14) ---------
def test_registering_is_on_request_and_the_version_carries_the_parents_headlines(tracked):
    """`mlflow.register_model`: baseline (default) registers only runs with the committed params; the version
    gets each headline the parent gets, in the parent's units (percent, ms), and the UI's shared view lists them."""
    from pipeline.tracking import view
    from pipeline.tracking.runs import StageRun

    client, exp = tracked["client"], tracked["experiment"]
    base, never, always = (Config.model_validate({"mlflow": {"experiment": "head", "register_model": p}})
                           for p in ("baseline", "never", "always"))
    # `changed` as the parent's iformer.params_changed tag spells it (baseline.describe).
    assert registry.wanted(base, "baseline") and not registry.wanted(base, "optim.base_lr=0.004")
    assert not registry.wanted(never, "baseline") and registry.wanted(always, "optim.base_lr=0.004")
    with pytest.raises(Exception, match="register_model"):
        Config.model_validate({"mlflow": {"register_model": "sometimes"}})

    parent = client.create_run(exp).info.run_id
    child = client.create_run(exp).info.run_id
    version = registry.register(client, base, f"runs:/{child}/checkpoints", child, {},
                                description="Trained by pipeline run 'baseline abc1234'")
    client.set_tag(parent, registry.TAG_VERSION, f"{registry.model_name(base)}/{version}")
    srun = StageRun(child, parent, tracked["uri"], exp)
    # evaluate's figures as metrics/evaluate.json holds them (fractions), latency's medians in ms.
    srun.log_headline({"top1": 0.988888, "top5": 1.0, "params_m": 2.0312, "gmacs_224": 0.53456})
    srun.log_headline({"latency_ms.onnxruntime.classifier_224": 14.8412}, {"latency_host.onnxruntime": "Xeon, 2 threads"})
    srun.log_headline({"census.classifier_224.ops_without_const": 812})
    got = client.get_run(parent).data
    assert {k: got.metrics[k] for k in ("top1_pct", "top5_pct", "params_m", "gmacs_224")} == {
        "top1_pct": 98.89, "top5_pct": 100.0, "params_m": 2.03, "gmacs_224": 0.53}
    assert got.metrics["latency_ms.onnxruntime.classifier_224"] == 14.84 and "top1" not in got.metrics
    assert got.tags["latency_host.onnxruntime"] == "Xeon, 2 threads"
    v = client.get_model_version("head.iformer_t", version)
    assert v.description == "Trained by pipeline run 'baseline abc1234'"
    assert {k: v.tags[k] for k in ("top1_pct", "latency_ms.onnxruntime.classifier_224")} == {
        "top1_pct": "98.89", "latency_ms.onnxruntime.classifier_224": "14.84"}
    assert not any(k.startswith("census.") for k in v.tags), "the version carries headlines, not the op census"
    # The shared view: accuracy first, then latency, then sizes; a UI column key per metric.
    saved = json.loads(client.get_experiment(exp).tags[view.TAG])  # a saved view, as the UI's Views menu lists them
    assert saved["name"] == "Headline metrics" and saved["createdAt"] <= saved["updatedAt"]
    state = json.loads(saved["state"])
    assert [c for c in state["selectedColumns"] if c.startswith("metrics.")] == [
        "metrics.`top1_pct`", "metrics.`top5_pct`", "metrics.`latency_ms.onnxruntime.classifier_224`",
        "metrics.`params_m`", "metrics.`gmacs_224`"]
    assert "tags.`iformer.params_changed`" in state["selectedColumns"]
    db = tracked["old"] / "mlflow" / "mlflow.db"
    assert store.has_view(db, exp, view.TAG) and not store.has_view(db, exp, "mlflow.sharedViewState.none")
    assert store.ui_url(exp, 5000, view.KEY) == (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs?viewStateShareKey=headline&workflowType=machine_learning")


def test_parent_runs_are_named_after_what_they_changed():
    from pipeline.tracking.baseline import run_name

    lr = {"optim.base_lr": {"baseline": 0.002, "value": 0.004}}
    assert run_name("lucky-fish", lr, "d0e5f90abc") == "lucky-fish", "the DVC experiment's name first"
    assert run_name(None, lr, "d0e5f90abc") == "optim.base_lr=0.004"
    assert run_name(None, {}, "d0e5f90abc") == "baseline d0e5f90"
    many = {f"aug.p{i}": {"baseline": 0, "value": 1} for i in range(20)}
    assert len(run_name(None, many, "x")) == 60 and run_name(None, many, "x").endswith("…")
