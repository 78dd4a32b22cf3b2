"""`pipeline.report.experiments` and `python -m pipeline.exps`: the experiment rows read from
`dvc exp show --json`, the table's columns and figures, `--md` / `--csv`, and the stale marks.

The JSON is made with DVC's own serializer (`ExpState(...).dumpd()`, what `dvc exp show --json`
prints), so the rows are read from DVC's format, not from one we imagine; `dvc` itself is not
run (its output is handed to the command in place of the subprocess)."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from pipeline import exps
from pipeline.core import freshness
from pipeline.report import experiments

HEAD = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
FAST = "f00dfeed0000000000000000000000000000beef"
BROKEN = "deadbeef00000000000000000000000000000000"


def params(epochs: int) -> dict:
    return {"params.yaml": {"data": {"model": {"variant": "iformer_t"}, "train": {"epochs": epochs, "lr": 0.001}}}}


WORKSPACE_METRICS = {
    "metrics/evaluate.json": {"data": {"top1": 0.7512, "top5": 0.9347, "params_m": 2.9, "gmacs_224": 0.5349}},
    "metrics/latency.json": {"data": {
        "onnxruntime": {"classifier_224": {"median": 1.234, "mean": 1.3}, "backbone_512": {"median": 9.876}},
        "torch": {"classifier_224": {"median": 2.5}},
        "iphone": {"skipped": "iphone needs a macOS host"},
        "oldbackend": {"classifier_224": {"median": 3}},  # a backend no longer registered
    }},
}
FAST_METRICS = {
    "metrics/evaluate.json": {"data": {"top1": 0.8, "top5": 0.95, "params_m": 2.9, "gmacs_224": 0.53}},
    "metrics/finetune_coco.json": {"data": {"bbox_ap": 0.3456, "segm_ap": 0.30}},
    "metrics/finetune_ade20k.json": {"data": {"miou": 38.26}},
    "metrics/pretrain.json": {"data": {"img_per_sec": 1234.6}},
}


def show_json(broken: bool = False) -> list[dict]:
    """`dvc exp show --json` for: the workspace, commit `main` and its experiment `fast` (and a broken one)."""
    from dvc.repo.experiments.serialize import ExpRange, ExpState, SerializableError, SerializableExp

    fast = ExpRange([ExpState(FAST, "fast", SerializableExp(FAST, params=params(3), metrics=FAST_METRICS))], name="fast")
    ranges = [fast]
    if broken:
        ranges.append(ExpRange([ExpState(BROKEN, error=SerializableError("params.yaml: bad", "YAMLError"))]))
    states = [ExpState("workspace", data=SerializableExp("workspace", params=params(2), metrics=WORKSPACE_METRICS)),
              ExpState(HEAD, "main", SerializableExp(HEAD, params=params(2),
                                                      metrics={"metrics/evaluate.json": {"data": {"top1": 0.7}}}),
                       experiments=ranges)]
    return json.loads(json.dumps([s.dumpd() for s in states]))


HEADER = ["Experiment", "train.epochs", "top1 %", "top5 %", "params M", "GMACs", "oldbackend 224 ms", "ort 224 ms",
          "torch 224 ms", "ort 512 ms", "box AP", "mask AP", "mIoU", "img/s"]
WORKSPACE = ["workspace", "2", "75.12", "93.47", "2.90", "0.53", "3.00", "1.23", "2.50", "9.88", "–", "–", "–", "–"]
MAIN = ["main", "2", "70.00", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–"]
FAST_ROW = ["  fast", "3", "80.00", "95.00", "2.90", "0.53", "–", "–", "–", "–", "34.6", "30.0", "38.3", "1235"]


def test_rows_are_the_workspace_each_commit_and_its_experiments_indented():
    rows = experiments.rows_of(show_json(broken=True))
    assert [(r["name"], r["rev"]) for r in rows] == [("workspace", "workspace"), ("main", HEAD), ("  fast", FAST),
                                                    ("  deadbee", BROKEN)]  # unnamed: its short rev
    assert rows[0]["params"] == {"model.variant": "iformer_t", "train.epochs": 2, "train.lr": 0.001}
    assert rows[2]["params"]["train.epochs"] == 3
    assert rows[2]["metrics"]["metrics/finetune_coco.json"] == {"bbox_ap": 0.3456, "segm_ap": 0.30}
    assert rows[3]["params"] == {} and rows[3]["metrics"] == {}  # DVC could not read it


def test_a_commit_without_a_branch_name_is_its_short_rev():
    rows = experiments.rows_of([{"rev": HEAD, "name": None, "data": None, "experiments": None}])
    assert [r["name"] for r in rows] == ["a1b2c3d"]


def test_the_table_shows_changed_params_and_headlines_in_the_reports_units():
    header, body = experiments.table(experiments.rows_of(show_json()))
    assert header == HEADER
    assert body == [WORKSPACE, MAIN, FAST_ROW]


def test_a_stale_figure_reads_stale():
    rows = experiments.rows_of(show_json())
    rows[2]["stale"] = {"metrics/evaluate.json": "evaluate: params train.epochs changed"}
    rows[0]["stale"] = {"metrics/latency.json": "latency: artifacts/export modified"}
    _, body = experiments.table(rows)
    assert body[2] == ["  fast", "3", "stale", "stale", "stale", "stale", "–", "–", "–", "–", "34.6", "30.0", "38.3",
                       "1235"]
    assert body[0][6:10] == ["stale"] * 4 and body[0][2:6] == WORKSPACE[2:6]


def test_render_text_md_and_csv():
    header, body = ["Experiment", "top1 %"], [["workspace", "75.12"], ["  fast", "stale"]]
    assert experiments.render(header, body, "text") == (
        "Experiment  top1 %\n"
        "----------  ------\n"
        "workspace    75.12\n"
        "  fast       stale\n")
    assert experiments.render(header, body, "md") == (
        "| Experiment | top1 % |\n|---|---|\n| workspace | 75.12 |\n| fast | stale |\n")
    assert experiments.render(header, body, "csv") == "Experiment,top1 %\r\nworkspace,75.12\r\nfast,stale\r\n"


def test_dvc_command_drops_dependency_hashes_and_detail_columns(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "deps": ["pipeline/x.py", "data"]}, "b": {"cmd": "y", "deps": ["data"]}}}))
    cmd = experiments.dvc_command(tmp_path, ["-A"])
    assert cmd[:5] == ["dvc", "exp", "show", "--no-pager", "--only-changed"] and cmd[-1] == "-A"
    drop, keep = cmd[cmd.index("--drop") + 1], cmd[cmd.index("--keep") + 1]
    for column in ("pipeline/x.py", "data", "Created", "onnxruntime.classifier_224.mean", "bbox_ap50", "prepare_seconds"):
        assert re.match(drop, column), column
    for column in ("pipeline/xapy", "top1", "onnxruntime.classifier_224.median", "bbox_ap"):
        assert not re.match(drop, column), column
    for column in ("top1", "miou", "torch.backbone_512.median", "train_s"):
        assert re.match(keep, column), column
    assert not re.match(keep, "top1x")


# -- the command ------------------------------------------------------------------------------------
@pytest.fixture
def command(tmp_path, monkeypatch, capsys):
    """`python -m pipeline.exps ARGS` in a repo at tmp_path, `dvc exp show --json` answering `show`."""
    monkeypatch.setenv("IFORMER_ROOT", str(tmp_path))
    asked = []

    def run(argv, show=None, rc=0, stderr=""):
        def fake_run(cmd, cwd=None, **_):
            asked.append((cmd, cwd))
            return subprocess.CompletedProcess(cmd, rc, json.dumps(show_json() if show is None else show), stderr)

        monkeypatch.setattr(exps.subprocess, "run", fake_run)
        code = exps.main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    run.asked = asked
    return run


def test_exps_md_prints_the_markdown_table_and_passes_other_arguments_to_dvc(command, tmp_path):
    code, out, err = command(["--md", "-A"])
    assert code == 0 and err == ""
    assert command.asked == [(["dvc", "exp", "show", "--json", "-A"], tmp_path)]
    lines = out.splitlines()
    assert lines[0] == "| " + " | ".join(HEADER) + " |" and lines[1] == "|" + "---|" * len(HEADER)
    assert lines[2:] == ["| " + " | ".join(c.strip() for c in row) + " |" for row in (WORKSPACE, MAIN, FAST_ROW)]


def test_exps_names_what_is_stale_below_the_table(command, monkeypatch):
    owners = {"metrics/evaluate.json": "evaluate", "metrics/latency.json": "latency"}
    fresh = freshness.Freshness({}, {"evaluate", "latency"}, {}, owners)
    stale = freshness.Freshness({"evaluate": "evaluate: params train.epochs changed"}, {"evaluate"}, {}, owners)
    monkeypatch.setattr(freshness, "workspace", lambda root: fresh)
    monkeypatch.setattr(freshness, "at_revision", lambda root, rev: stale if rev == FAST else fresh)
    code, out, _ = command(["--md"])
    assert code == 0
    assert "| fast | 3 | stale | stale | stale | stale | – | – | – | – | 34.6 | 30.0 | 38.3 | 1235 |" in out
    assert out.endswith("\nstale: made before a change to its row's params or code; `dvc repro` (or `dvc exp run` "
                        "without a target) reruns what changed. Not up to date:\n"
                        "  fast: evaluate (params train.epochs changed)\n")
    code, out, _ = command(["--csv"])
    assert out.splitlines()[3].startswith("fast,3,stale,") and "Not up to date" not in out  # CSV stays a table


def test_exps_reports_dvcs_error_and_exit_code(command):
    code, out, err = command([], rc=255, stderr="ERROR: unexpected error - not a git repository")
    assert (code, out, err) == (255, "", "ERROR: unexpected error - not a git repository\n")


def test_summary_is_one_line_of_the_workspaces_headlines(tmp_path, monkeypatch, capsys):
    """`make pipeline`'s last line: the metrics files' figures, accuracy and AP in percent (x 100 by hand)."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "metrics").mkdir()
    for f, m in {**WORKSPACE_METRICS, **FAST_METRICS}.items():
        (tmp_path / f).write_text(json.dumps(m["data"]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IFORMER_ROOT", raising=False)
    assert exps.main(["--summary"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("[pipeline] this run: top1 80.00 %, top5 95.00 %, params 2.90 M, 0.53 GMACs, ")
    assert "ort 224 px 1.23 ms, torch 224 px 2.50 ms" in first and first.endswith("box AP 34.6, mask AP 30.0, mIoU 38.3, 1235 img/s")
    assert len(first) < 300 and "make exps" in second


def test_the_experiment_table_and_the_report_stage_start_without_torch():
    """Reading dvc's rows and the paper's figures needs no network: `iformer` imports nothing itself and the
    report's tables reach for the checkpoint module (torch) only when they are built (torch, timm and
    torchvision took 2.4 s of each such command's start)."""
    import sys
    from pathlib import Path

    probe = "import sys, pipeline.exps, stages.report; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
