"""mmengine hooks that tie a Runner to Ray Train and to the stage's MLflow run.

`RayCheckpointHook` replaces mmengine's CheckpointHook: every `interval`
epochs (detection) or iterations (segmentation) rank 0 saves the full training
state (`checkpoint.pth`, mmengine's format) into a temporary directory and
every rank calls `ray.train.report`, so Ray Train keeps the checkpoints and an
interrupted run resumes from the newest. `MlflowLossHook` logs the training
losses and learning rate every `interval` iterations from rank 0 into the
stage's own MLflow child run (its id is passed in), not into a new run, and
shows a progress line on the console about every tenth of the run. A run
resumed from a checkpoint continues the interrupted attempt's MLflow run and
redoes the iterations after that checkpoint: steps the run already holds are
not logged again, so each keeps one value (the first attempt's).
"""
from __future__ import annotations

import math
import tempfile

from mmengine.hooks import Hook

from ..errors import PipelineError

CHECKPOINT_FILE = "checkpoint.pth"


def _scalar(v) -> float | None:
    try:
        return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, RuntimeError):
        return None


class RayCheckpointHook(Hook):
    priority = "VERY_LOW"  # after the scheduler and logger hooks of the same step

    def __init__(self, interval: int, by_epoch: bool):
        self.interval = interval
        self.by_epoch = by_epoch

    def _report(self, runner, done: int, total: int) -> None:
        import ray.train
        from ray.train import Checkpoint

        if done % self.interval and done != total:
            return
        metrics = {"epoch" if self.by_epoch else "iter": done}
        with tempfile.TemporaryDirectory() as tmp:
            runner.save_checkpoint(tmp, CHECKPOINT_FILE, by_epoch=self.by_epoch)  # rank 0 only
            ckpt = Checkpoint.from_directory(tmp) if runner.rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{'epoch' if self.by_epoch else 'iter'}-{done:06d}")

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch:
            self._report(runner, runner.epoch + 1, runner.max_epochs)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.by_epoch:
            self._report(runner, runner.iter + 1, runner.max_iters)


class MlflowLossHook(Hook):
    priority = "BELOW_NORMAL"

    def __init__(self, tracking_uri: str | None, run_id: str | None, interval: int, stage: str):
        self.interval = interval
        self.stage = stage
        self.run_id = run_id
        self.client = None
        self.logged_until = 0  # the last step the MLflow run already holds
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def before_train(self, runner) -> None:
        if runner.rank == 0 and self.client is not None:
            held = self.client.get_metric_history(self.run_id, "train/loss")
            self.logged_until = max((m.step for m in held), default=0)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        step, total = runner.iter + 1, runner.max_iters
        loss = _scalar((outputs or {}).get("loss"))
        if loss is not None and not math.isfinite(loss):  # every rank: a diverged run is no result
            raise PipelineError(f"{self.stage}: loss is {loss} at iteration {step}: training diverged (lower the "
                                "learning rate, or check the data); nothing was recorded as finished")
        if runner.rank != 0:
            return
        shown = step % max(1, total // 10) == 0 or step == total
        if (step % self.interval and step != total and not shown) or (self.client is None and not shown):
            return
        values = {f"train/{k}": _scalar(v) for k, v in (outputs or {}).items()}
        values = {k: v for k, v in values.items() if v is not None}
        if shown:
            from ..core.console import say

            say(self.stage, f"iter {step}/{total}: loss {values.get('train/loss', float('nan')):.4f}")
        if self.client is None or (step % self.interval and step != total) or step <= self.logged_until:
            return
        from ..tracking.metrics import metric_batch

        lrs = runner.optim_wrapper.get_lr().get("lr")
        if lrs:
            values["train/lr"] = float(lrs[0])
        self.client.log_batch(self.run_id, metrics=metric_batch(values, step))
