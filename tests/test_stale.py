"""Never show an old result as a new one; never lose the previous result to a failed run.

The user's session from issue 12: `dvc exp run pretrain -S train.epochs=2 -S
optim.base_lr=0.004` retrains only pretrain, so evaluate's top-1 (and every
later figure) still belongs to the previous model. `make exps`, the report and
the MLflow parent run must say "stale" (or leave it out), on DVC's word. And a
run that fails or is stopped (a typo in `-S`, Ctrl-C during export) must leave
the previous outputs where they were.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import dvc_record, exported_repo, make_repo, stub_env, stub_project, wait_for

from pipeline.tracking import runs
from pipeline.config import Config, parse_config

EPOCHS2 = {"train": {"epochs": 2}, "optim": {"base_lr": 0.004}}


def _with(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in over.items():
        out[section].update(values)
    return out


def _write(root: Path, files: dict[str, object]) -> None:
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body if isinstance(body, str) else json.dumps(body))


@pytest.mark.slow
def test_the_parent_run_links_only_stages_dvc_records_as_up_to_date(tmp_path):
    """`dvc exp run pretrain -S ...`, then `dvc repro -f -s report`, on stub stages (`stub_stage.py`)."""
    from mlflow.tracking import MlflowClient

    root = stub_project(tmp_path / "repo", Config().to_dict())
    env = stub_env(root)

    def run(*cmd):
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
        return out

    def last_parent():
        client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
        exp = client.get_experiment_by_name(Config().mlflow.experiment).experiment_id
        parent = client.search_runs([exp], f"tags.`{runs.TAG_KIND}` = 'pipeline'",
                                    order_by=["attributes.start_time DESC"])[0]
        kids = client.search_runs([exp], f"tags.`{runs.TAG_PARENT}` = '{parent.info.run_id}'")
        return parent, {k.data.tags[runs.TAG_STAGE]: k for k in kids}

    run("dvc", "repro")  # the baseline: six epochs, top-1 0.6
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run("dvc", "exp", "run", "pretrain", "-n", "epochs2", "-S", "train.epochs=2", "-S", "optim.base_lr=0.004")
    parent, kids = last_parent()
    assert set(kids) == {"prepare", "pretrain"} and kids["prepare"].info.run_name == "prepare (cached)"

    run("dvc", "repro", "-f", "-s", "report")  # the report alone: evaluate's top-1 is the six-epoch model's
    parent, kids = last_parent()
    assert set(kids) == {"prepare", "pretrain", "report"}, "evaluate is not linked as '(cached)'"
    assert kids["pretrain"].info.run_name == "pretrain (cached)"
    assert "top1_pct" not in parent.data.metrics, "the old top-1 is not this experiment's"
    assert parent.data.metrics["train_s"] == 20.0, "pretrain's own figure is"
    why = "evaluate: artifacts/pretrain modified"
    assert parent.data.tags[runs.TAG_STALE] == "evaluate, report (artifacts/pretrain modified)"
    seen = json.loads((root / "artifacts/report/seen.json").read_text())
    assert seen == {"stale": {"evaluate": why}, "stale_upstream": why}
    assert kids["report"].data.tags[runs.TAG_STALE_UPSTREAM] == why

    run("dvc", "repro")  # evaluate reruns on the two-epoch model, and the report with it
    parent, kids = last_parent()
    assert parent.data.metrics["top1_pct"] == 20.0 and runs.TAG_STALE not in parent.data.tags
    assert kids["evaluate"].info.run_name == "evaluate" and kids["pretrain"].info.run_name == "pretrain (cached)"
    assert json.loads((root / "artifacts/report/seen.json").read_text()) == {"stale": {}, "stale_upstream": None}


@pytest.mark.slow
def test_queued_and_temp_experiments_run_with_persistent_outputs(tmp_path):
    """`persist: true` outputs and outputs swapped in by the stage, in DVC's own experiment copies."""
    from mlflow.tracking import MlflowClient

    root = stub_project(tmp_path / "repo", Config().to_dict())
    env = stub_env(root)

    def run(*cmd):
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
        return out.stdout

    run("dvc", "repro")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run("dvc", "exp", "run", "--queue", "-n", "q3", "-S", "train.epochs=3")
    run("dvc", "queue", "start")
    wait_for(lambda: not any(w in run("dvc", "queue", "status") for w in ("Queued", "Running")), 900, "the queue")
    run("dvc", "exp", "run", "--temp", "-n", "t4", "-S", "train.epochs=4")

    top1 = {}
    for entry in json.loads(run("dvc", "exp", "show", "--json")):
        for exp in entry.get("experiments") or []:
            rev = exp["revs"][0]
            top1[exp.get("name") or rev.get("name")] = rev["data"]["metrics"]["metrics/evaluate.json"]["data"]["top1"]
    assert top1 == {"q3": 0.3, "t4": 0.4}, top1
    assert json.loads((root / "metrics/evaluate.json").read_text()) == {"top1": 0.6}, "the workspace is untouched"
    assert "up to date" in run("dvc", "status")
    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name(Config().mlflow.experiment).experiment_id
    for name, value in top1.items():
        parents = client.search_runs([exp_id], f"tags.`iformer.dvc_experiment` = '{name}' and "
                                               f"tags.`{runs.TAG_KIND}` = 'pipeline'")
        assert len(parents) == 1, [(p.info.run_name, p.data.tags.get(runs.TAG_INVOCATION)) for p in parents]
        parent = parents[0]
        kids = client.search_runs([exp_id], f"tags.`{runs.TAG_PARENT}` = '{parent.info.run_id}'")
        assert parent.data.metrics["top1_pct"] == round(100 * value, 2) and runs.TAG_STALE not in parent.data.tags
        assert sorted(k.info.run_name for k in kids) == ["evaluate", "prepare (cached)", "pretrain", "report"]


def test_the_report_marks_stale_figures_and_never_shows_them_as_this_runs():
    from pipeline.report import Inputs, build

    cfg = parse_config(_with(Config().to_dict(), EPOCHS2), "t")
    history = [{"epoch": 1.0, "train_loss": 1.3, "val_loss": 2.3, "val_top1": 0.0972, "val_top5": 0.5, "lr": 4e-3},
               {"epoch": 2.0, "train_loss": 0.8, "val_loss": 1.4, "val_top1": 0.6667, "val_top5": 0.9667, "lr": 1e-6}]
    inputs = Inputs(history, {"top1": 0.9889, "top5": 1.0, "params_m": 2.62, "gmacs_224": 0.53}, {}, {"source": "digits"},
                    {"finetune_coco": {"bbox_ap": 0.714, "segm_ap": 0.70}, "finetune_ade20k": {"miou": 18.3}},
                    per_class={"0": 0.9889})
    why = "evaluate: artifacts/pretrain modified"
    stale = {"evaluate": why, "finetune_coco": why, "finetune_ade20k": why}
    markdown, summary = build(cfg, inputs.without_stale(stale))

    assert "2 epochs, global batch 64 at lr 0.004" in markdown
    # data, Params, GMACs (evaluate's), Top-1, Top-5; no latency measured, so no latency column
    assert "| this run | digits | stale | stale | stale | stale |" in markdown, markdown
    assert "| this run | stale | stale | stale |" in markdown, "the dense table"
    for old in ("98.89", "71.40", "18.30", "Per-class"):
        assert old not in markdown, old
    assert "| 2 | 0.8000 | 1.4000 | 66.67 |" in markdown, "pretrain's own history is this run's"
    assert "Not up to date" in markdown and "artifacts/pretrain modified" in markdown
    assert summary["ours"]["top1"] is None and summary["stale"] == stale
    assert summary["dense"]["ours"]["ap_box"] is None


def _record(repo, stage: str, files: dict) -> None:
    _write(repo.path, files)
    dvc_record(repo.path, stage)


def _exps(repo, *args) -> str:
    return repo.run(sys.executable, "-m", "pipeline.exps", *args).stdout


#: Stands in for `python -m stages.pretrain` (no training): its outputs follow the params.
FAKE_PRETRAIN = """import json, pathlib, yaml
epochs = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
for folder in ("artifacts/pretrain", "plots", "metrics"):
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
pathlib.Path("artifacts/pretrain/model.pt").write_text(f"{epochs} epochs")
pathlib.Path("plots/pretrain_history.csv").write_text("epoch\\n" + "".join(f"{e}\\n" for e in range(epochs)))
pathlib.Path("metrics/pretrain.json").write_text(json.dumps({"img_per_sec": 25.0 * epochs}))
"""


@pytest.mark.slow
def test_exps_says_stale_for_figures_an_experiment_did_not_reproduce(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo.path / "fake_pretrain.py").write_text(FAKE_PRETRAIN)
    dvc = yaml.safe_load((repo.path / "dvc.yaml").read_text())
    dvc["stages"]["pretrain"]["cmd"] = "python fake_pretrain.py"
    (repo.path / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    _record(repo, "prepare", {"artifacts/prepare/manifest.json": {"classes": ["0", "1"]}})
    repo.run("dvc", "repro", "-s", "pretrain")
    _record(repo, "evaluate", {"artifacts/evaluate/manifest.json": {}, "metrics/evaluate.json": {"top1": 0.9889}})
    repo.git("add", "-A")
    repo.git("commit", "-qm", "baseline")
    # The session: only pretrain reruns; evaluate's entry and metrics stay as they were.
    repo.run("dvc", "exp", "run", "pretrain", "-n", "epochs2", "-S", "train.epochs=2", "-S", "optim.base_lr=0.004")

    rows = {r["Experiment"].strip(): r for r in csv.DictReader(io.StringIO(_exps(repo, "--csv")))}
    baseline = next(r for name, r in rows.items() if name not in ("workspace", "epochs2"))
    assert (baseline["top1 %"], baseline["img/s"], baseline["train.epochs"]) == ("98.89", "150", "6"), rows
    for name in ("epochs2", "workspace"):
        assert (rows[name]["top1 %"], rows[name]["img/s"], rows[name]["train.epochs"]) == ("stale", "50", "2"), rows
        assert rows[name]["box AP"] == "–", "never produced: missing, not stale"
    text = _exps(repo)
    assert "stale: made before a change" in text, text
    assert "  epochs2: evaluate, report (artifacts/pretrain modified)" in text, text

    _record(repo, "evaluate", {"metrics/evaluate.json": {"top1": 0.6667}})  # evaluate rerun in the workspace
    rows = {r["Experiment"].strip(): r for r in csv.DictReader(io.StringIO(_exps(repo, "--csv")))}
    assert rows["workspace"]["top1 %"] == "66.67" and rows["epochs2"]["top1 %"] == "stale"


def _digest(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        path = root / rel
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_params_the_stage_refuses_leave_the_previous_outputs(tmp_path):
    repo = make_repo(tmp_path / "repo")
    _record(repo, "prepare", {"artifacts/prepare/manifest.json": {"classes": ["0", "1"]}})
    _record(repo, "pretrain", {"artifacts/pretrain/model.pt": "six epochs", "plots/pretrain_history.csv": "epoch\n1\n",
                               "metrics/pretrain.json": {"img_per_sec": 200.0}})
    repo.git("add", "-A")
    repo.git("commit", "-qm", "baseline")
    outputs = ["artifacts/pretrain", "metrics/pretrain.json", "plots/pretrain_history.csv"]
    before = _digest(repo.path, outputs)

    # A value of the wrong type in params.yaml, and one out of range through `-S`. (DVC reruns a stage
    # only for the params keys it lists, so a misspelt key alone reruns nothing; the stage refuses it
    # whenever it runs, see test_config.)
    repo.set_params({"train": {"epochs": "two"}})
    for cmd, needle in ((["dvc", "repro", "pretrain"], "train.epochs = 'two': Input should be a valid integer"),
                        (["dvc", "exp", "run", "pretrain", "-S", "train.epochs=0"], "train.epochs = 0")):
        out = repo.run(*cmd, check=False)
        text = out.stdout + out.stderr
        assert out.returncode != 0
        [line] = [x for x in text.splitlines() if x.startswith("error:")]
        assert needle in line and "pretrain's previous outputs are kept" in line, text[-3000:]
        assert _digest(repo.path, outputs) == before, "DVC kept them (persist) and the stage never touched them"
        status = json.loads(repo.run("dvc", "status", "--json").stdout)
        assert "params.yaml" in status["pretrain"][0]["changed deps"] and "prepare" not in status, status
        repo.git("checkout", "--", "params.yaml")


def test_a_failed_stage_says_what_is_missing_and_the_command_that_restores_it(tmp_path):
    from pipeline.core import outputs

    root = stub_project(tmp_path / "repo", Config().to_dict())
    _write(root, {"artifacts/prepare/a": "1", "artifacts/pretrain/model.txt": "6", "artifacts/evaluate/seen.json": "{}",
                  "metrics/evaluate.json": {"top1": 0.6}})
    dvc_record(root, "prepare", "pretrain", "evaluate")
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "recorded"]):
        subprocess.run(cmd, cwd=root, env=stub_env(root), check=True)
    assert outputs.after_failure("evaluate", root) == "evaluate's previous outputs are kept"
    assert outputs.after_failure("report", root) == "", "never recorded: nothing to keep"

    (root / "metrics/evaluate.json").unlink()
    (root / "artifacts/evaluate/seen.json").unlink()
    (root / "artifacts/evaluate").rmdir()
    said = outputs.after_failure("evaluate", root)
    restore = "dvc checkout evaluate && git checkout -- metrics/evaluate.json"
    assert said == f"missing since its last recorded run: artifacts/evaluate, metrics/evaluate.json; restore with `{restore}`"
    subprocess.run(restore, shell=True, cwd=root, env=stub_env(root), check=True, capture_output=True)
    assert json.loads((root / "metrics/evaluate.json").read_text()) == {"top1": 0.6}
    status = subprocess.run(["dvc", "status", "--json"], cwd=root, env=stub_env(root), capture_output=True, text=True)
    assert "evaluate" not in json.loads(status.stdout), status.stdout

    _write(root, {"metrics/evaluate.json": {"top1": 0.2}})  # recorded, not committed: git has another version
    dvc_record(root, "evaluate")
    (root / "metrics/evaluate.json").unlink()
    assert outputs.after_failure("evaluate", root) == ("missing since its last recorded run: metrics/evaluate.json; "
                                                       "`dvc repro evaluate` writes metrics/evaluate.json again")


@pytest.mark.slow
def test_ctrl_c_during_export_keeps_the_previous_export_and_a_rerun_completes_it(tmp_path):
    repo = exported_repo(tmp_path / "repo", {"export": {"classifier_sizes": [], "backbone_size": None}}, "first")
    _write(repo.path, {"metrics/pretrain.json": {"img_per_sec": 1.0}, "plots/pretrain_history.csv": "epoch\n1\n"})
    dvc_record(repo.path, "prepare", "pretrain", "export")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "exported")
    kept = ["artifacts/export", "metrics/export.json"]
    before = _digest(repo.path, kept)
    assert "artifacts/export/classifier_32.onnx" in before

    repo.set_params({"export": {"classifier_sizes": [64]}})
    dvc = subprocess.Popen(["dvc", "repro", "-s", "export"], cwd=repo.path, env=repo.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: dvc.poll() is not None or any((repo.path / "artifacts/export.tmp").glob("*.onnx")), 600,
                 "export to write a file")
        assert dvc.poll() is None, dvc.communicate()
        os.killpg(dvc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = dvc.communicate(timeout=120)
    finally:
        if dvc.poll() is None:
            os.killpg(dvc.pid, signal.SIGKILL)
    assert dvc.returncode != 0, (out + err)[-3000:]
    found = [x for x in (out + err).splitlines() if x.startswith("error: export")]
    assert len(found) == 1, (out + err)[-3000:]  # once seen with none, in a batch after the e2e tests
    [line] = found
    assert "interrupted (SIGINT)" in line and "export's previous outputs are kept" in line, line
    assert _digest(repo.path, kept) == before
    assert not (repo.path / "artifacts/export.tmp").exists(), "what it wrote aside is gone"
    status = json.loads(repo.run("dvc", "status", "--json").stdout)
    assert "export" in status and not {"prepare", "pretrain"} & set(status), status

    start = time.time()
    repo.run("dvc", "repro", "-s", "export")
    assert "export" not in json.loads(repo.run("dvc", "status", "--json").stdout), "export is up to date again"
    assert (repo.path / "artifacts/export/classifier_64.onnx").is_file()
    assert "classifier_64" in json.loads((repo.path / "metrics/export.json").read_text())
    print(f"export rerun: {time.time() - start:.0f} s")
