"""The command line as a user meets it: every command's `--help`, the index `python -m pipeline`,
`-S` overrides, `recipes --list`, the repo root from a sub-folder, and a stage's interrupt line.

`--help` runs in this process (`runpy`, as `python -m` runs a module), so the
heavy imports are paid once; `python -m pipeline` and the interrupt line run as
real processes.
"""
import contextlib
import io
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline import __main__ as index
from pipeline.config.presets import PRESETS
from pipeline.config.recipes import RECIPES
from pipeline.core import layout
from pipeline.errors import PipelineError

COMMANDS = [f"pipeline.{c}" for c in index.COMMANDS]
STAGES = [f"stages.{s}" for s in layout.STAGES + layout.OPTIONAL_STAGES]


def run_module(module: str, *argv: str) -> tuple[int, str, str]:
    """`python -m module argv...` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("module", COMMANDS + STAGES)
def test_every_command_and_stage_prints_help_with_a_description_and_every_option_explained(module):
    code, out, err = run_module(module, "--help")
    assert code == 0 and "Traceback" not in out + err, err
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: python -m {module}")
    description = rest.split("\n\n")[0].strip()
    assert description and not description.startswith(("options:", "positional arguments:")), out
    # Every option line of argparse's listing carries help text after its flags.
    options = out.split("options:\n", 1)[1]
    entries = [line for line in options.splitlines() if line.startswith("  -")]
    bare = [e for e in entries if len(e.split("  ")) < 3 and not _continued(options, e)]
    assert not bare, f"options without help in {module}: {bare}"


def _continued(listing: str, entry: str) -> bool:
    """argparse puts the help on the next line when the flags are long; True when it is there."""
    lines = listing.splitlines()
    nxt = lines[lines.index(entry) + 1] if lines.index(entry) + 1 < len(lines) else ""
    return nxt.startswith(" " * 10) and nxt.strip() != ""


def test_store_help_changes_nothing(tmp_path, monkeypatch):
    """`--help` used to run the relocation: with a store there, nothing may be touched."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "mlflow").mkdir()
    db = tmp_path / "mlflow" / "mlflow.db"
    db.write_bytes(b"")
    monkeypatch.setenv("IFORMER_ROOT", str(tmp_path))
    before = db.stat().st_mtime_ns
    code, out, _ = run_module("pipeline.store", "--help")
    assert code == 0 and "artifact links" not in out.split("\n\n")[0]
    assert db.stat().st_mtime_ns == before and db.read_bytes() == b""


def test_python_m_pipeline_lists_each_command_with_one_line():
    for argv in ([], ["--help"]):
        out = subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and not out.stderr, out.stderr
        for command in COMMANDS:
            line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith(f"python -m {command} "))
            assert len(line.split(f"python -m {command}", 1)[1].strip()) > 10, line
    bad = subprocess.run([sys.executable, "-m", "pipeline", "recipes"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: recipes:") and bad.stderr.count("\n") == 1


def test_recipes_list_groups_classification_recipes_and_dense_presets_with_a_summary():
    code, out, _ = run_module("pipeline.recipes", "--list")
    assert code == 0
    lines = out.splitlines()
    heads = [i for i, ln in enumerate(lines) if not ln.startswith(" ")]
    assert len(heads) == 2 and heads[0] == 0 and "Classification" in lines[0] and "Dense" in lines[heads[1]]
    recipes = {ln.split()[0]: ln for ln in lines[1:heads[1]]}
    presets = {ln.split()[0]: ln for ln in lines[heads[1] + 1:]}
    assert set(recipes) == set(RECIPES) and set(presets) == set(PRESETS)
    # Summaries from the tables, checked against the paper (Table 9; Sec. 4.2/4.3).
    assert "iFormer-M" in recipes["iformer_m"] and "300 epochs" in recipes["iformer_m"]
    assert "batch 4096" in recipes["iformer_m"] and "base lr 0.004" in recipes["iformer_m"]
    assert "450 epochs" in recipes["iformer_l2"] and "batch 8192" in recipes["iformer_h"]
    assert "distillation" in recipes["iformer_m_distill"] and "distillation" not in recipes["iformer_m"]
    assert "weights/iFormer_m.pth" in recipes["iformer_m_release"]
    assert "Mask R-CNN" in presets["mask_rcnn_1x"] and "12 epochs" in presets["mask_rcnn_1x"]
    assert "Semantic FPN" in presets["semantic_fpn_40k"] and "40,000 iterations" in presets["semantic_fpn_40k"]


def test_recipes_take_dvc_style_S_overrides(tmp_path):
    from pipeline import recipes
    from pipeline.config import load_config

    params = tmp_path / "params.yaml"
    assert recipes.main(["digits", "-S", "train.epochs=2", "--set-param", "optim.betas=[0.8, 0.9]",
                         "--params", str(params)]) == 0
    cfg = load_config(params)
    assert cfg.train.epochs == 2 and list(cfg.optim.betas) == [0.8, 0.9]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert recipes.main(["digits", "-S", "train.epochs", "--params", str(params)]) == 2
    assert err.getvalue().startswith("error: -S 'train.epochs': expected KEY=VALUE")


def test_submit_groups_S_overrides_under_the_exp_before_them(monkeypatch):
    from pipeline import submit

    seen = []
    monkeypatch.setattr(submit.batch, "submit_all", lambda root, args, command: seen.append((args.exp, command)) or 0)
    argv = ["--exp", "small", "-S", "model.variant=iformer_s", "-S", "aug.scale=[0.5,1.0]",
            "--exp", "-S", "train.epochs=3", "--", "dvc", "exp", "run", "pretrain"]
    assert submit.main(argv) == 0
    assert submit.main(["-S", "train.seed=1"]) == 0  # -S before any --exp: one unnamed experiment
    assert seen == [([("small", ["model.variant=iformer_s", "aug.scale=[0.5,1.0]"]), (None, ["train.epochs=3"])],
                     ["dvc", "exp", "run", "pretrain"]),
                    ([(None, ["train.seed=1"])], [])]


def test_the_repo_root_is_found_from_a_sub_folder_and_refused_outside_one(tmp_path, monkeypatch):
    monkeypatch.delenv("IFORMER_ROOT", raising=False)
    monkeypatch.chdir(ROOT / "pipeline" / "config")
    assert layout.repo_root() == ROOT
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "params.yaml").write_text("{}\n")  # a params file is not a project
    monkeypatch.chdir(tmp_path / "sub")
    with pytest.raises(PipelineError, match="no dvc.yaml here or in any folder above"):
        layout.repo_root()
    code, out, err = run_module("stages.evaluate")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "no dvc.yaml" in err, err
    assert not (tmp_path / "sub" / "mlflow").exists()


def test_an_interrupted_export_promises_no_checkpoint(tmp_path):
    """Export keeps no checkpoints: its interrupt line says it starts again (pretrain's says it resumes)."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    script = ("import os, signal\nfrom pipeline import stage\n"
              "def check(cfg, root):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
              "raise SystemExit(stage.main('export', lambda: stage.Work(check, lambda *a: None), []))\n")
    env = dict(os.environ, IFORMER_ROOT=str(tmp_path), PYTHONPATH=str(ROOT))
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    line = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 128 + 15 and line.startswith("error: export: interrupted (SIGTERM)"), out.stderr
    assert "checkpoint" not in line and "a rerun does export again from the start" in line


def test_a_long_build_runs_quietly_with_a_heartbeat_and_its_duration(tmp_path):
    """scripts/quietly.sh, as setup-openmmlab.sh builds mmcv with it: the tool's chatter in the log only."""
    log = tmp_path / "logs" / "build.log"
    env = {**os.environ, "HEARTBEAT_S": "1"}
    chatter = "for i in 1 2 3; do echo 'SetuptoolsDeprecationWarning' $i; sleep 1; done"
    done = subprocess.run(["bash", str(ROOT / "scripts/quietly.sh"), str(log), "setup: demo build", "bash", "-c",
                           chatter], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert "Setuptools" not in done.stderr and log.read_text().count("SetuptoolsDeprecationWarning") == 3
    assert len(lines) >= 2 and all(f"(log: {log})" in line for line in lines), lines
    assert re.fullmatch(rf"setup: demo build: done in \d+ min \d+ s \(log: {re.escape(str(log))}\)", lines[-1])
    failed = subprocess.run(["bash", str(ROOT / "scripts/quietly.sh"), str(log), "setup: demo build", "bash", "-c",
                             "echo 'error: no compiler'; exit 3"], capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 3 and "failed (exit 3)" in failed.stderr and "error: no compiler" in failed.stderr
