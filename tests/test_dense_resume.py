"""A dense fine-tuning stage killed mid-training resumes from its last checkpoint, in the same MLflow run.

Real mmseg Semantic FPN on Ray Train, real MLflow: the stage process is
killed by PID (SIGKILL, as the OOM killer would) after Ray Train registered a
checkpoint and after the run logged iterations beyond it, then run again.
"""
import json
import re
import signal
import subprocess
import sys
import threading

import pytest

from conftest import latest_checkpoint, make_repo, wait_for, write_weights
from pipeline.tracking import runs

pytestmark = pytest.mark.slow

ITERS, CHECKPOINT_EVERY, LOG_EVERY = 120, 40, 5
PARAMS = {
    "mlflow": {"log_model": False},
    "detection": {"data": {"train_scenes": 8, "val_scenes": 4, "scene_size": 64, "digit_size": [24, 32],
                           "digits_per_scene": [1, 2]}},
    "segmentation": {"train": {"iters": ITERS, "batch_size": 2, "crop_size": 64, "image_scale": [256, 64],
                               "checkpoint_interval": CHECKPOINT_EVERY, "log_interval": LOG_EVERY}, "samples": 1},
}


def ade20k_checkpoint(repo) -> int:
    return latest_checkpoint(repo.path / "ray_results", "finetune_ade20k", "iter")


def stage_runs(repo) -> list:
    return repo.runs(f"tags.`{runs.TAG_STAGE}` = 'finetune_ade20k'")


def logged(repo, run_id: str, key: str = "train/loss") -> dict[int, list[float]]:
    """step -> every value the run holds for `key` at that step."""
    out: dict[int, list[float]] = {}
    for m in repo.mlflow_client().get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


def test_a_killed_finetune_resumes_from_its_checkpoint_with_one_loss_per_iteration_in_one_run(tmp_path):
    repo = make_repo(tmp_path / "repo", PARAMS)
    write_weights(repo, classes=list("0123456789"))  # an untrained backbone: resuming is the subject here
    repo.stage("prepare_dense")

    stage = subprocess.Popen([sys.executable, "-m", "stages.finetune_ade20k"], cwd=repo.path, env=repo.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first_err: list[str] = []
    reader = threading.Thread(target=lambda: first_err.extend(stage.stderr), daemon=True)
    reader.start()
    try:
        # The stage says where Ray logs once its MLflow run is open: find that run before training starts.
        wait_for(lambda: any("Ray's own log" in line for line in first_err), 600, "the stage to start Ray")
        client, run_id = repo.mlflow_client(), stage_runs(repo)[0].info.run_id

        def past_a_checkpoint() -> bool:
            """A checkpoint exists and the run holds losses of iterations after it (to be redone)."""
            assert stage.poll() is None, "".join(first_err)[-3000:]
            ckpt = ade20k_checkpoint(repo)
            held = client.get_metric_history(run_id, "train/loss") if ckpt else []
            return max((m.step for m in held), default=0) > ckpt > 0

        wait_for(past_a_checkpoint, 900, "a checkpoint and losses logged after it")
        stage.send_signal(signal.SIGKILL)  # the stage process alone; what it started of Ray goes with it
        stage.wait(timeout=60)
    finally:
        if stage.poll() is None:
            stage.kill()
        reader.join(timeout=10)
    assert stage.returncode == -signal.SIGKILL
    at_kill = ade20k_checkpoint(repo)
    assert 0 < at_kill < ITERS, at_kill
    assert not (repo.path / "artifacts/finetune_ade20k/manifest.json").exists()
    [killed] = stage_runs(repo)
    before = logged(repo, killed.info.run_id)
    redone = sorted(s for s in before if s > at_kill)
    assert redone, (at_kill, sorted(before))  # logged by the first attempt, trained again by the second

    again = repo.stage("finetune_ade20k")
    resumed = re.search(rf"{ITERS} iterations from ray checkpoint (\S+)", again.stderr)
    assert resumed and resumed[1].endswith(f"iter-{at_kill:06d}"), again.stderr[-3000:]
    shown = [int(n) for n in re.findall(rf"iter (\d+)/{ITERS}:", again.stderr)]
    assert shown and min(shown) > at_kill, shown  # the iterations before the checkpoint are not redone
    print(f"\nkilled with the checkpoint of iteration {at_kill} and losses logged up to {max(before)}; "
          f"the rerun resumed at {at_kill + 1} (first progress line: iteration {min(shown)})")

    manifest = json.loads((repo.path / "artifacts/finetune_ade20k/manifest.json").read_text())
    [run] = stage_runs(repo)  # the killed attempt's run, continued: no second run
    assert run.info.run_id == killed.info.run_id == manifest["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags[runs.TAG_ATTEMPTS] == "2"
    assert "process was gone" in run.data.tags["iformer.closed_because"]
    every = list(range(LOG_EVERY, ITERS + 1, LOG_EVERY))
    for key in ("train/loss", "train/lr"):
        steps = logged(repo, run.info.run_id, key)
        assert sorted(steps) == every and all(len(v) == 1 for v in steps.values()), (key, steps)
    after = logged(repo, run.info.run_id)
    assert {s: after[s] for s in before} == before, "the redone iterations keep the first attempt's values"
    assert "miou" in run.data.metrics
