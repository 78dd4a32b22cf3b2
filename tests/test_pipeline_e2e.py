"""The whole classification path, as a user runs it: `dvc repro`, then `dvc exp run`."""
import json

import pytest

from conftest import make_repo, native_bf16_cpu
from pipeline.core import checkpoint, layout
from pipeline.core.cpus import usable_cpus
from pipeline.tracking import runs

pytestmark = pytest.mark.slow

STAGES = set(layout.STAGES)


def _pipeline_runs(repo):
    parents = repo.runs(f"tags.`{runs.TAG_KIND}` = 'pipeline'")
    children = {p.info.run_id: repo.runs(f"tags.`{runs.TAG_PARENT}` = '{p.info.run_id}'") for p in parents}
    return parents, children


@pytest.fixture(scope="module")
def default_repo(tmp_path_factory):
    """The embedded default, untouched, after one `dvc repro`."""
    repo = make_repo(tmp_path_factory.mktemp("e2e") / "repo")
    # A guard against a hang, not a speed goal: beside the other pytest worker this run took 949 s on
    # 2 AVX2-only cores and 1,017 s on 2 AVX512-BF16 ones (357 s there alone).
    out = repo.run("dvc", "repro", timeout=2400)
    repo.repro_log = out.stdout + out.stderr
    return repo


def test_default_pipeline_learns_digits(default_repo):
    metrics = json.loads((default_repo.path / "metrics/evaluate.json").read_text())
    assert metrics["top1"] >= 0.90, metrics
    assert metrics["fuse_max_abs_diff"] < 1e-4
    report = (default_repo.path / "artifacts/report/report.md").read_text()
    # The paper's row (Table 3: iFormer-T 2.9 M, 0.53 GMACs, 0.60 ms on iPhone 13, 74.1 %) in its own table.
    assert "Paper reference, not measured here" in report and "| paper iformer_t | 2.90 | 0.53 | 0.60 | 74.10 |" in report
    assert (default_repo.path / "artifacts/report/curves.png").stat().st_size > 10_000
    assert (default_repo.path / "artifacts/evaluate/confusion_matrix.png").stat().st_size > 10_000


def test_default_dense_stages_learn(default_repo):
    """The default fine-tunes at its full length: levels a detector or segmenter that learned nothing cannot reach.

    A detector that finds nothing scores AP 0 (COCO's -1 when it has no
    detections at all); a segmenter that labels everything background scores
    the majority-class mIoU the stage computes beside its own.
    """
    coco = json.loads((default_repo.path / "metrics/finetune_coco.json").read_text())
    ade = json.loads((default_repo.path / "metrics/finetune_ade20k.json").read_text())
    assert coco["bbox_ap"] >= 0.3 and coco["segm_ap"] >= 0.3, coco
    assert coco["bbox_ap50"] >= coco["bbox_ap"] and coco["segm_ap50"] >= coco["segm_ap"], coco
    assert ade["miou"] >= ade["miou_majority_baseline"] + 5.0, ade
    assert ade["miou_majority_baseline"] > 0
    # Each trains on every CPU it may use (2 by default), each of those threads reading subnormals as zero,
    # in bf16 exactly where the CPU computes it natively (`amp: auto`), and its run's tag says which.
    threads = min(2, usable_cpus())
    precision = ("bf16 autocast", "bf16") if native_bf16_cpu() else ("float32", "none")
    for task in ("detection", "segmentation"):
        line = f"{task}: rank 0/1, {threads} threads (subnormals flushed), {precision[0]} (auto), "
        assert line in default_repo.repro_log
    parents, children = _pipeline_runs(default_repo)
    kids = {k.data.tags[runs.TAG_STAGE]: k for k in children[parents[0].info.run_id]}
    for stage in ("finetune_coco", "finetune_ade20k"):
        assert kids[stage].data.tags["iformer.train_precision"] == precision[1]


def test_default_log_is_short_and_ours(default_repo):
    log = default_repo.repro_log
    assert "\x1b[" not in log, "no ANSI codes when the output is not a terminal"
    for noise in ("Traceback", "TrainController", "RayTrainWorker", "TrainingReport", "PreemptionWatcher",
                  "GetTimeoutError", "Checkpoint successfully created"):
        assert noise not in log, noise
    lines = log.splitlines()
    # DVC's own lines, ours ([stage] ...) and the report's table; Ray alone used to add ~75.
    strangers = [line for line in lines if line and not line.startswith(("[", "Running stage", "> python",
                                                                          "Updating lock", "Generating lock"))]
    assert len(strangers) < 40, strangers
    assert any(line.startswith("[pretrain] epoch 6/6: train_loss") for line in lines)
    assert any(line.startswith("[evaluate] evaluated 360/360 images") for line in lines)
    ray_log = next(line.split(": ", 1)[1] for line in lines if line.startswith("[pretrain] Ray's own log: "))
    kept = open(ray_log).read()
    assert "RayTrainWorker" in kept, "Ray's chatter is kept in the run's log file"
    assert "Autoscaler status" not in kept, "without the autoscaler's status table every 5 s"


def test_checkpoint_reloads_strictly(default_repo):
    path = default_repo.path / "artifacts/pretrain/model.pt"
    weights = checkpoint.load_weights(path, expect_variant="iformer_t")
    model = checkpoint.build_from_weights(weights)
    manifest = json.loads((default_repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == checkpoint.sha256(path)
    assert manifest["epochs"] == default_repo.params()["train"]["epochs"]
    assert sum(p.numel() for p in model.parameters()) > 2e6


def test_the_logged_model_serves_the_checkpoints_predictions(default_repo):
    """The MLflow model the pretrain stage logs (MLflow's own reload-and-predict check at logging is off:
    it took half of the logging's time) loads through pyfunc and predicts what the checkpoint's network does,
    at a batch size other than its input example's (2): the batch dimension stays dynamic."""
    import mlflow
    import numpy as np
    import torch

    parents, children = _pipeline_runs(default_repo)
    pre = next(k for k in children[parents[0].info.run_id] if k.data.tags[runs.TAG_STAGE] == "pretrain")
    logged = [m for m in default_repo.mlflow_client().search_logged_models([parents[0].info.experiment_id])
              if m.source_run_id == pre.info.run_id]
    assert len(logged) == 1
    served = mlflow.pyfunc.load_model(logged[0].artifact_location)
    weights = checkpoint.load_weights(default_repo.path / "artifacts/pretrain/model.pt")
    size = weights["image_size"]
    batch = np.random.default_rng(1).standard_normal((3, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = checkpoint.build_from_weights(weights)(torch.from_numpy(batch)).numpy()
    got = np.asarray(served.predict(batch))
    assert got.shape == expected.shape == (3, len(weights["classes"]))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_mlflow_holds_one_complete_parent_run(default_repo):
    parents, children = _pipeline_runs(default_repo)
    assert len(parents) == 1
    parent = parents[0]
    kids = children[parent.info.run_id]
    assert {k.data.tags[runs.TAG_STAGE] for k in kids} == STAGES and len(kids) == len(STAGES)
    assert all(k.info.status == "FINISHED" for k in kids) and parent.info.status == "FINISHED"
    assert len(parent.data.tags["iformer.git_commit"]) == 40
    assert parent.data.metrics["top1_pct"] >= 90.0, "percent on the parent"
    client = default_repo.mlflow_client()
    pre = next(k for k in kids if k.data.tags[runs.TAG_STAGE] == "pretrain")
    epochs = default_repo.params()["train"]["epochs"]
    for name in ("train_loss", "val_top1", "lr", "img_per_sec"):
        assert len(client.get_metric_history(pre.info.run_id, name)) == epochs, name
    assert not client.list_artifacts(pre.info.run_id, "checkpoints"), "the model is logged once (as an MLflow model)"
    assert {a.path for a in client.list_artifacts(pre.info.run_id, "config")} == {"config/resolved.yaml"}
    ev = next(k for k in kids if k.data.tags[runs.TAG_STAGE] == "evaluate")
    ev_files = {a.path for a in client.list_artifacts(ev.info.run_id, "evaluate")}
    assert {"evaluate/confusion_matrix.png", "evaluate/per_class_accuracy.json"} <= ev_files
    models = client.search_logged_models([parent.info.experiment_id])
    assert any(m.source_run_id == pre.info.run_id for m in models), "the model is logged with mlflow.pytorch"
    version = client.search_model_versions(f"name='iformer.iformer_t' and run_id='{pre.info.run_id}'")[0]
    assert version.source.startswith("models:/") and version.tags["export.classifier_224.onnx"].startswith("runs:/")
    assert {"wall_s", "top1_pct", "img_per_sec", "latency_ms.onnxruntime.classifier_224"} <= set(parent.data.metrics)
    assert parent.data.tags["mlflow.source.name"] == "dvc repro"
    assert parent.info.end_time - parent.info.start_time >= 1000 * parent.data.metrics["wall_s"] - 1000


def test_noop_repro_and_exp_run_add_one_complete_parent(default_repo):
    repo = default_repo
    noop = repo.run("dvc", "repro")
    assert "up to date" in noop.stdout + noop.stderr
    assert len(_pipeline_runs(repo)[0]) == 1, "a no-op repro must not open a pipeline run"

    repo.git("add", "-A")
    repo.git("commit", "-qm", "baseline")
    # An experiment that changes only the latency stage's params: latency and the report rerun, every
    # stage before them is linked from the baseline's run as "(cached)".
    repo.run("dvc", "exp", "run", "-n", "short", "-S", "latency.runs=10", timeout=1500)
    parents, children = _pipeline_runs(repo)
    assert len(parents) == 2
    new = next(p for p in parents if p.data.tags["iformer.dvc_experiment"] == "short")
    kids = {k.data.tags[runs.TAG_STAGE]: k for k in children[new.info.run_id]}
    assert set(kids) == STAGES
    old = next(p for p in parents if p is not new)
    old_kids = {k.data.tags[runs.TAG_STAGE]: k for k in children[old.info.run_id]}
    rerun = {"latency", "report"}
    for stage in STAGES - rerun:
        assert kids[stage].data.tags.get(runs.TAG_LINKED_FROM) == old_kids[stage].info.run_id, stage
    for stage in rerun:
        assert runs.TAG_LINKED_FROM not in kids[stage].data.tags, stage
    assert kids["latency"].data.params["latency.runs"] == "10"
    assert kids["latency"].data.tags["iformer.dvc_experiment"] == "short"

    shown = json.loads(repo.run("dvc", "exp", "show", "--json").stdout)
    names = set()
    tops = []
    for entry in shown:
        for row in [entry, *[e for x in entry.get("experiments") or [] for e in x.get("revs", [])]]:
            data = row.get("data") or {}
            names.add(row.get("name") or data.get("name") or row.get("rev"))
            top1 = ((data.get("metrics") or {}).get("metrics/evaluate.json") or {}).get("data", {}).get("top1")
            if top1 is not None:
                tops.append(top1)
    assert "short" in names and len(tops) >= 2, shown


def test_an_experiment_that_reruns_only_pretrain_shows_the_rest_as_stale(default_repo):
    """Issue 12's session: the later stages keep the previous model's figures, and nothing passes them off."""
    import csv
    import io
    import sys

    repo = default_repo
    repo.run("dvc", "exp", "run", "pretrain", "-n", "pretrain-only", "-S", "train.epochs=2", "-S", "optim.base_lr=0.004",
             timeout=1500)
    rows = {r["Experiment"].strip(): r for r in
            csv.DictReader(io.StringIO(repo.run(sys.executable, "-m", "pipeline.exps", "--csv").stdout))}
    for name in ("pretrain-only", "workspace"):
        row = rows[name]
        assert [row[k] for k in ("top1 %", "box AP", "mIoU", "ort 224 ms")] == ["stale"] * 4, row
        assert float(row["img/s"]) > 0, "pretrain's own figure is this experiment's"
    assert float(rows["short"]["top1 %"]) >= 90, "an experiment whose stages are all up to date keeps its figures"

    repo.run("dvc", "repro", "-f", "-s", "report", timeout=900)
    report = (repo.path / "artifacts/report/report.md").read_text()
    assert "2 epochs, global batch 64 at lr 0.004" in report
    assert "| this run | digits | stale | stale | stale | stale | stale |" in report, report[:3000]
    assert "| 2 |" in report and "| 3 |" not in report.split("## Per-epoch history")[1], "this run's own curve"
    parents, children = _pipeline_runs(repo)
    last = max(parents, key=lambda p: p.info.start_time)
    kids = {k.data.tags[runs.TAG_STAGE]: k for k in children[last.info.run_id]}
    assert set(kids) == {"prepare", "pretrain", "prepare_dense", "report"}, "no stale stage linked as '(cached)'"
    assert "top1_pct" not in last.data.metrics and "box_ap_pct" not in last.data.metrics
    assert "img_per_sec" in last.data.metrics
    assert "evaluate" in last.data.tags[runs.TAG_STALE] and "finetune_coco" in last.data.tags[runs.TAG_STALE]
