"""Bad data and faults a user meets after a run: corrupted outputs, escaping paths, broken COCO/ADE20K
files, locked or lost stores. Each ends in one `error:` line naming the file or field (issue 13).

In-process on real files (a real torch checkpoint with bytes overwritten, a real truncated JPEG, a real
sqlite store held by a second connection): the stage's `check` or the validating function directly.
"""
import json
import math
import shutil
import pytest
import torch

from iformer.models import build_model
from pipeline.config import Config
from pipeline.core import checkpoint, integrity, layout
from pipeline.core.outputs import Outputs
from pipeline.errors import PipelineError

CLASSES = [str(i) for i in range(10)]


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _overwrite_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


@pytest.fixture
def pretrained(tmp_path):
    """A root with a real (untrained) model.pt and the manifest the pretrain stage writes beside it."""
    path = tmp_path / "artifacts/pretrain/model.pt"
    digest = checkpoint.save_weights(path, build_model("iformer_t", 10).state_dict(), variant="iformer_t",
                                     num_classes=10, distillation=False, classes=CLASSES, image_size=32,
                                     mean=(0.5,) * 3, std=(0.5,) * 3)
    (path.parent / "manifest.json").write_text(json.dumps({"stage": "pretrain", "checkpoint_sha256": digest}))
    return tmp_path


# -- integrity: a corrupted file never becomes a number ---------------------------------------------
def test_corrupted_weights_are_refused_by_every_reader(pretrained):
    from pipeline.dense.finetune import initial_weights

    path = pretrained / "artifacts/pretrain/model.pt"
    checkpoint.pretrain_weights(pretrained, "iformer_t", CLASSES)  # intact: accepted
    _overwrite_middle(path)  # as in DVC's cache: still a loadable zip, tensors changed
    with pytest.raises(PipelineError) as err:
        checkpoint.pretrain_weights(pretrained, "iformer_t", CLASSES)
    msg = _one_line(err)
    assert msg.startswith(f"{path}: sha256 ") and "the pretrain stage recorded" in msg
    cfg = Config()  # the dense stages start from the same file by default
    assert str(cfg.detection.backbone.checkpoint) == "artifacts/pretrain/model.pt"
    with pytest.raises(PipelineError, match="the pretrain stage recorded"):
        initial_weights(cfg, pretrained, "detection")


def test_nan_metric_is_an_error_not_a_result(tmp_path):
    out = Outputs.begin("evaluate", tmp_path)
    with pytest.raises(PipelineError) as err:
        out.metrics({"top1": 0.097, "loss": math.nan, "num_images": 360})
    assert _one_line(err).startswith("evaluate: metric loss is nan")
    with pytest.raises(PipelineError, match="metric classifier_32.onnx_max_abs_diff is inf"):
        integrity.finite({"classifier_32": {"onnx_max_abs_diff": math.inf}}, "export")
    out.metrics({"top1": 0.5, "skipped": {"mac": "needs macOS"}})  # finite numbers and text pass
    out.discard()
    assert not (tmp_path / "metrics/evaluate.json").exists() and not (tmp_path / "artifacts/evaluate").exists()


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory):
    """A root with what the prepare stage writes for the digits (its own functions), manifest last."""
    from pipeline.classify.prepare import make_digits, write_listing

    root = tmp_path_factory.mktemp("prepared")
    out = root / "artifacts/prepare"
    manifest = write_listing(make_digits(out, 16, 0.2, 0), out, "digits", relative_root=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_prepared_listing_and_images_are_verified(prepared_root, tmp_path):
    from pipeline.classify.datasets import Prepared

    copy = tmp_path / "prepare"
    shutil.copytree(prepared_root / "artifacts/prepare", copy)
    manifest = Prepared.load(copy).manifest
    assert set(manifest["listing_sha256"]) == {"train", "val"} and manifest["images_sha256"]
    image = copy / "images" / Prepared.load(copy).samples("val")[0][0]
    _overwrite_middle(image)
    with pytest.raises(PipelineError, match=f"{copy / 'images'}: sha256 .* the prepare stage recorded"):
        Prepared.load(copy)
    (copy / "manifest.json").write_text("{half")
    with pytest.raises(PipelineError, match="manifest.json: unreadable"):
        Prepared.load(copy)


def test_latency_refuses_an_exported_model_changed_since_export(pretrained):
    from pipeline.deploy import latency

    export = pretrained / "artifacts/export"
    export.mkdir(parents=True)
    entry = {"kind": "classifier", "onnx": "classifier_224.onnx", "coreml": "classifier_224.mlpackage.zip"}
    for key in ("onnx", "coreml"):
        (export / entry[key]).write_bytes(bytes(range(256)) * 64)
        entry[f"{key}_sha256"] = integrity.sha256(export / entry[key])
    (export / "manifest.json").write_text(json.dumps({
        "models": {"classifier_224": entry, "backbone_512": dict(entry, kind="classifier")},
        "weights_sha256": integrity.sha256(pretrained / "artifacts/pretrain/model.pt")}))
    latency.check(Config(), pretrained)  # as recorded: accepted
    _overwrite_middle(export / entry["coreml"])
    with pytest.raises(PipelineError) as err:
        latency.check(Config(), pretrained)
    assert _one_line(err).startswith(f"{export / entry['coreml']}: sha256 ")
    assert "the export stage recorded" in str(err.value)


# -- paths a param names stay inside what DVC tracks ------------------------------------------------
def test_checkpoint_paths_cannot_climb_out_of_their_folder(pretrained, tmp_path):
    from pipeline.dense.finetune import initial_weights

    root = pretrained
    (root / "weights").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(root / "artifacts/pretrain/model.pt", outside / "model.pt")
    (root / "weights/linked.pt").symlink_to(outside / "model.pt")  # a link in weights/: allowed, as documented
    assert layout.weights_path("weights/linked.pt", root) == root / "weights/linked.pt"
    (root / "weights/shelf").symlink_to(outside)
    for escape in ("weights/../elsewhere/model.pt", "weights/shelf/../elsewhere/model.pt"):  # both exist
        with pytest.raises(PipelineError, match=r"model.weights: .* is outside .*weights"):
            layout.weights_path(escape, root)
    with pytest.raises(PipelineError, match="model.weights: .*weights/shelf is a directory"):
        layout.weights_path("weights/shelf", root)
    cfg = Config.model_validate({"detection": {"backbone": {"checkpoint": "weights/../elsewhere/model.pt"}}})
    with pytest.raises(PipelineError, match="detection.backbone.checkpoint: .* is outside"):
        initial_weights(cfg, root, "detection")
    with pytest.raises(PipelineError, match="train.resume_from: .* is a directory, not a checkpoint file"):
        checkpoint.load_any(outside, "train.resume_from")


def test_teacher_checkpoint_cannot_climb_out_of_teachers(prepared_root):
    from pipeline.classify import pretrain

    root = prepared_root
    (root / "teachers").mkdir(exist_ok=True)
    cfg = Config.model_validate({"distill": {"enabled": True, "teacher_checkpoint": "teachers/../artifacts/prepare/train.tsv"},
                                 "data": {"image_size": 32}, "train": {"batch_size": 8}})
    with pytest.raises(PipelineError, match=r"distill.teacher_checkpoint: .* is outside .*teachers"):
        pretrain.check(cfg, root)


# -- every count, size and duration has a sane upper bound -----------------------------------------
@pytest.mark.parametrize("over, field", [
    ({"latency": {"threads": 100000}}, "latency.threads"),
    ({"latency": {"runs": 1000000000}}, "latency.runs"),
    ({"train": {"epochs": 3000000}}, "train.epochs"),
    ({"train": {"batch_size": 10 ** 7}}, "train.batch_size"),
    ({"ray": {"num_workers": 100000}}, "ray.num_workers"),
    ({"segmentation": {"train": {"iters": 10 ** 9}}}, "segmentation.train.iters"),
    ({"detection": {"train": {"image_scale": [133300, 800]}}}, "detection.train.image_scale"),
    ({"detection": {"data": {"train_scenes": 10 ** 8}}}, "detection.data.train_scenes"),
    ({"sweep": {"num_samples": 10 ** 7}}, "sweep.num_samples"),
    ({"sweep": {"space": {"batch_size": [64, 10 ** 8]}}}, "sweep.space.batch_size"),
])
def test_unbounded_values_are_refused_naming_the_field(over, field):
    import yaml

    from conftest import ROOT, deep_update
    from pipeline.config import parse_config

    with pytest.raises(PipelineError) as err:
        parse_config(deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), over))
    msg = _one_line(err)
    assert field in msg and ("less than or equal" in msg or "up to 8192" in msg), msg


def test_latency_threads_beyond_this_machine_are_refused_before_any_run(tmp_path, prepared_root):
    import os

    from pipeline.deploy import latency
    from pipeline.sweep import search

    cpus = len(os.sched_getaffinity(0))
    cfg = Config.model_validate({"latency": {"threads": cpus + 1}})
    with pytest.raises(PipelineError, match=rf"latency.threads: {cpus + 1} is more than the {cpus} CPUs"):
        latency.check(cfg, tmp_path)  # before it looks for the exported models
    cfg = Config.model_validate({"latency": {"threads": cpus + 1}, "sweep": {"latency": {"backend": "torch"}}})
    with pytest.raises(PipelineError, match=rf"latency.threads: {cpus + 1} is more than the {cpus} CPUs"):
        search.check(cfg, prepared_root)  # the sweep times its variants with them too


def test_workers_the_local_ray_cannot_hold_are_refused_before_any_run(prepared_root, monkeypatch):
    """Ray Train would wait for them, time out after a minute and try again, without end."""
    import os

    from pipeline.classify import pretrain
    from pipeline.compute import cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = os.cpu_count()  # Ray's logical CPUs on this machine
    base = {"data": {"image_size": 32}, "train": {"batch_size": 8}}
    cfg = Config.model_validate({**base, "ray": {"num_workers": 2, "cpus_per_worker": float(cpus)}})
    with pytest.raises(PipelineError) as err:
        pretrain.check(cfg, prepared_root)
    assert _one_line(err) == (f"ray.num_workers x ray.cpus_per_worker: 2 x {cpus} = {2 * cpus} CPUs, more than the "
                              f"{cpus} the local Ray offers (this machine's CPUs); ask for fewer, or name a Ray "
                              "cluster in ray.address")
    for fits in ({"num_workers": 2, "cpus_per_worker": cpus / 2},  # exactly the machine
                 {"num_workers": 2, "cpus_per_worker": float(cpus), "local_num_cpus": 2 * cpus},
                 {"num_workers": 2, "cpus_per_worker": float(cpus), "address": "127.0.0.1:1"}):  # a cluster's own
        cfg = Config.model_validate({**base, "ray": fits})
        if "address" in fits:
            monkeypatch.setattr(cluster, "_probe", lambda *a: None)  # its CPUs are the cluster's to count
            monkeypatch.setattr(cluster, "check_storage", lambda *a: None)
            monkeypatch.setattr(cluster, "check_tracking", lambda *a: None)
        pretrain.check(cfg, prepared_root)
    # A dense stage's own block, named as its own.
    cfg = Config.model_validate({"ray": {"local_num_cpus": 2}, "segmentation": {"ray": {"num_workers": 4,
                                                                                        "cpus_per_worker": 0.75}}})
    with pytest.raises(PipelineError, match=r"^segmentation.ray.num_workers x segmentation.ray.cpus_per_worker: "
                                            r"4 x 0.75 = 3 CPUs, more than the 2 the local Ray offers \(ray.local_num"):
        cluster.check(cfg, cfg.segmentation.ray, "segmentation.ray")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without CUDA devices")
def test_gpu_workers_on_a_machine_without_gpus_are_refused_before_any_run(prepared_root, monkeypatch):
    from pipeline.classify import pretrain

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = Config.model_validate({"data": {"image_size": 32}, "train": {"batch_size": 8}, "ray": {"use_gpu": True}})
    with pytest.raises(PipelineError) as err:
        pretrain.check(cfg, prepared_root)
    assert _one_line(err).startswith("ray.use_gpu: ray.num_workers x ray.gpus_per_worker = 1 x 1 = 1 GPUs, more "
                                     "than the 0 CUDA devices")


# -- dense data: every field the stages read is checked, every image decoded ------------------------
@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    from pipeline.dense import scenes

    out = tmp_path_factory.mktemp("scenes")
    scenes.write(out, train=4, val=2, size=64, per_scene=(1, 2), digit_size=(18, 26), seed=5)
    return out


@pytest.fixture
def coco(scenes_dir, tmp_path):
    shutil.copytree(scenes_dir / "coco", tmp_path / "coco")
    return tmp_path / "coco"


def _edit_coco(root, change):
    from pipeline.dense import datasets

    path = datasets.coco_annotation_file(root, "train2017")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))  # NaN is written as JSON's NaN, which json.loads reads back
    return path


def _ann(data):
    return data["annotations"][0]


@pytest.mark.parametrize("change, needle", [
    (lambda d: [a.update(bbox=[math.nan] * 4) for a in d["annotations"]], "not [x, y, w, h] of finite numbers"),
    (lambda d: _ann(d).update(bbox=[1, 2, "30", 20]), "not [x, y, w, h] of finite numbers"),
    (lambda d: _ann(d).update(area=math.inf), "has area inf, not a finite number"),
    (lambda d: d["images"][0].update(width="64"), "has width '64' and height 64, not positive integers"),
    (lambda d: d["images"][0].update(id=[1]), "image id [1] is not an integer"),
    (lambda d: _ann(d).update(category_id=[1]), "has category_id [1], not an integer"),
    (lambda d: _ann(d).update(image_id="1"), "has image_id '1', not an integer"),
    (lambda d: _ann(d).update(segmentation=[["1", "2", "30", "2", "30", "20"]]), "are not all finite numbers"),
    (lambda d: _ann(d).update(iscrowd=2), "has iscrowd 2, not 0 or 1"),
    (lambda d: d["images"][0].update(file_name="../../../../etc/passwd"), "has file_name '../../../../etc/passwd'"),
    (lambda d: d["images"][0].update(file_name="/etc/passwd"), "has file_name '/etc/passwd', not a file under"),
])
def test_coco_fields_are_type_and_value_checked(coco, change, needle):
    from pipeline.dense import datasets

    path = _edit_coco(coco, change)
    with pytest.raises(PipelineError) as err:
        datasets.check_coco(coco, "detection.data.root")
    msg = _one_line(err)
    assert msg.startswith(f"detection.data.root: {path}: ") and needle in msg, msg


def test_coco_images_are_decoded_and_links_inside_stay_allowed(coco, tmp_path):
    from pipeline.dense import datasets

    data = json.loads(datasets.coco_annotation_file(coco, "train2017").read_text())
    first = coco / "train2017" / data["images"][0]["file_name"]
    moved = tmp_path / "shelf" / first.name
    moved.parent.mkdir()
    first.rename(moved)
    first.symlink_to(moved)  # a data folder filled with links, as documented
    datasets.check_coco(coco, "detection.data.root")
    first.unlink()
    first.write_text("a text file named like an image\n")
    with pytest.raises(PipelineError, match=f"detection.data.root: .*instances_train2017.json: {first} is not a "
                                            "readable image"):
        datasets.check_coco(coco, "detection.data.root")
    assert datasets.check_coco(coco, "detection.data.root", verify="none")["splits"]["train"]["images"] == 4


def test_truncated_ade20k_jpeg_is_refused(scenes_dir, tmp_path):
    from pipeline.dense import datasets, scenes

    ade = tmp_path / "ade"
    shutil.copytree(scenes_dir / "ade20k", ade)
    image = sorted((ade / "images/validation").glob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])  # a copy cut short
    n = len(scenes.SEG_CLASSES)
    assert datasets.check_ade(ade, n, "segmentation.data.root", verify="header")  # the header alone looks fine
    with pytest.raises(PipelineError) as err:
        datasets.check_ade(ade, n, "segmentation.data.root")
    assert _one_line(err).startswith(f"segmentation.data.root: {image} is not a readable image (OSError: ")


# -- credentials and messages ------------------------------------------------------------------------
@pytest.mark.parametrize("url, what", [
    ("https://ghp_0123456789abcdef@github.example.com/x.git", "a user name or token"),
    ("https://me:s3cret@git.example.com/x.git", "a password"),
    ("https://git.example.com/x.git?access_token=ghp_0123456789abcdef", "a token in its query"),
])
def test_git_remote_with_any_credential_is_refused_unshown(tmp_path, monkeypatch, url, what):
    from pipeline.jobs.plan import remote_url

    monkeypatch.delenv("IFORMER_GIT_REMOTE", raising=False)
    with pytest.raises(PipelineError) as err:
        remote_url(tmp_path, url)
    msg = _one_line(err)
    assert f"--git-remote / IFORMER_GIT_REMOTE: has {what} in it" in msg
    assert "0123456789abcdef" not in msg and "s3cret" not in msg and "git.example.com" not in msg


def test_ssh_remotes_name_a_user_without_a_credential():
    from pipeline.jobs.plan import credential_in

    for url in ("ssh://git@github.com/me/exps.git", "git@github.com:me/exps.git", "/shared/exps.git",
                "file:///shared/exps.git", "https://github.com/me/exps.git"):
        assert credential_in(url) is None, url


def test_recipes_params_that_is_a_directory_or_broken_yaml(tmp_path, capsys):
    from pipeline import recipes

    assert recipes.main(["t", "--params", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --params: {tmp_path} is a directory; name the params file " \
                                      "(params.yaml)\n"
    broken = tmp_path / "params.yaml"
    broken.write_text("model:\n  variant: [iformer_t\n")
    assert recipes.main(["t", "--params", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --params: {broken} is not valid YAML at line ") and err.count("\n") == 1
    assert broken.read_text() == "model:\n  variant: [iformer_t\n", "the broken file is left as it was"


def test_a_multi_line_library_message_is_one_error_line(capsys):
    from pipeline.errors import report

    assert report(PipelineError("model.weights: x.pth is refused:\n  Weights only load failed.\n\n  GLOBAL os.system")) == 2
    assert capsys.readouterr().err == ("error: model.weights: x.pth is refused:; Weights only load failed.; "
                                       "GLOBAL os.system\n")


def test_an_image_gone_bad_after_prepare_is_named_without_a_resume_promise(prepared_root, tmp_path):
    from pipeline.classify.datasets import ImageListDataset, Prepared
    from pipeline.compute.trainer import training_failure

    copy = tmp_path / "prepare"
    shutil.copytree(prepared_root / "artifacts/prepare", copy)
    prepared = Prepared.load(copy)
    rel = prepared.samples("train")[3][0]
    (prepared.root / rel).write_bytes(b"")  # emptied after prepare listed it
    with pytest.raises(PipelineError) as err:
        ImageListDataset(Prepared(copy, prepared.manifest), "train")[3]
    msg = _one_line(err)
    assert msg.startswith(f"{prepared.root / rel}: unreadable image (") and "dvc repro --force prepare" in msg
    # as Ray reports it from a training worker: the same line, and no resume from a checkpoint
    text = f"Traceback (most recent call last):\n  ...\npipeline.errors.PipelineError: {msg}\n"
    line = training_failure(type("WorkerGroupError", (Exception,), {"worker_failures": {0: Exception(text)}})(),
                            Config(), tmp_path / "ray.log")
    assert line.startswith("ray: training worker rank 0 failed: ") and msg in line and "checkpoint" not in line


# -- stores and disks --------------------------------------------------------------------------------
def test_a_full_disk_while_keeping_the_export_log_keeps_the_original_error(tmp_path):
    from pipeline.deploy.export import keep_log

    log = tmp_path / "convert.log"
    log.write_text("coremltools: conversion failed at op 12\n" * 100)
    kept = tmp_path / "export.failed.log"
    assert keep_log(log, kept) == f"library output: {kept}" and kept.read_text() == log.read_text()
    kept.unlink()
    kept.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    assert keep_log(log, kept) == f"library output not kept: No space left on device writing {kept}"
    assert not kept.is_symlink() and not kept.exists(), "no 0-byte log passing for the library's output"


def test_a_locked_sqlite_store_is_waited_for_a_bounded_time(tmp_path, caplog):
    import sqlite3
    import threading

    from pipeline.tracking import store

    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("create table runs (id text)").connection.commit()
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)  # another writer, as a second stage or mlflow ui would be
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(PipelineError) as err:
        store.wait_writable(f"sqlite:///{db}", 0.5)
    assert _one_line(err) == (f"mlflow.lock_wait_s: {db} is still locked by another process after 0.5 s; nothing "
                              "was started (raise mlflow.lock_wait_s to wait longer)")
    assert f"{db} is locked by another process; waiting up to 0.5 s (mlflow.lock_wait_s)" in caplog.text
    release = threading.Timer(0.3, lambda: other.execute("ROLLBACK"))
    release.start()
    store.wait_writable(f"sqlite:///{db}", 60)  # released while it waits: goes on
    release.join()
    other.close()


def test_a_deleted_default_store_is_reported_loudly(tmp_path):
    from pipeline.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert store.lost_store(tmp_path, uri) is None  # a new repo: nothing was recorded
    for stage in ("prepare", "pretrain"):
        (tmp_path / "artifacts" / stage).mkdir(parents=True)
        (tmp_path / "artifacts" / stage / "manifest.json").write_text(json.dumps(
            {"stage": stage, "mlflow_run_id": "abc", "mlflow_tracking_uri": "sqlite:////old/place/mlflow/mlflow.db"}))
    said = store.lost_store(tmp_path, uri)
    assert said.startswith(f"WARNING: {tmp_path / 'mlflow' / 'mlflow.db'} is gone, but 2 stage manifests "
                           "(prepare, pretrain) record runs in it")
    assert store.lost_store(tmp_path, "http://127.0.0.1:5000") is None  # a server's store is not ours to judge
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "mlflow.db").write_bytes(b"")  # the new store exists: said once
    assert store.lost_store(tmp_path, uri) is None


def test_a_store_locked_mid_stage_is_retried_then_one_line(tmp_path, monkeypatch, capsys):
    import sqlite3
    import threading

    from conftest import ROOT
    from pipeline import stage
    from pipeline.tracking import store

    db = tmp_path / "mlflow/mlflow.db"
    db.parent.mkdir()
    sqlite3.connect(db).execute("create table runs (status text)").connection.commit()
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another writer, mid-stage

    def close_run():  # a write as MLflow makes it (its own busy timeout spent)
        with sqlite3.connect(db, timeout=0) as con:
            con.execute("insert into runs values ('FINISHED')")

    release = threading.Timer(1.0, lambda: other.execute("ROLLBACK"))
    release.start()
    store.when_unlocked(close_run, 60)  # retried until the other writer lets go
    release.join()
    assert sqlite3.connect(db).execute("select status from runs").fetchall() == [("FINISHED",)]

    other.execute("BEGIN EXCLUSIVE")  # held past the wait: one line, no traceback
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        store.when_unlocked(close_run, 0.5)
    monkeypatch.setattr(stage.lifecycle, "install", lambda: None)  # this test process keeps pytest's signals
    monkeypatch.setenv("IFORMER_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    status = stage.entry("python -m stages.prepare", "prepare", lambda cfg, root: close_run(),
                         ["--params", str(ROOT / "params.yaml")])
    other.execute("ROLLBACK")
    other.close()
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: mlflow: the tracking store was locked by another process while prepare ran, longer than sqlite "
        "waits; it stopped (a run it could not close, the next stage closes)"]


def test_a_nan_dense_loss_stops_training_on_every_rank():
    from types import SimpleNamespace

    from pipeline.dense.hooks import MlflowLossHook

    hook = MlflowLossHook(None, None, interval=5, stage="finetune_coco")
    for rank in (0, 1):
        runner = SimpleNamespace(rank=rank, iter=64, max_iters=100)
        hook.after_train_iter(runner, 0, outputs={"loss": torch.tensor(1.25)})  # finite: goes on
        with pytest.raises(PipelineError, match="finetune_coco: loss is nan at iteration 65: training diverged"):
            hook.after_train_iter(runner, 0, outputs={"loss": torch.tensor(float("nan")), "loss_cls": torch.tensor(1.0)})
