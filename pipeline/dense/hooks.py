"""mmengine hooks that tie a Runner to Ray Train and to the stage's MLflow run.

`RayCheckpointHook` replaces mmengine's CheckpointHook: every `interval`
epochs (detection) or iterations (segmentation) rank 0 saves the full training
state (`checkpoint.pth`, mmengine's format) into a temporary directory and
every rank calls `ray.train.report`, so Ray Train keeps the checkpoints and an
interrupted run resumes from the newest. `MlflowLossHook` logs the training
losses and learning rate every `interval` iterations from rank 0 into the
stage's own MLflow child run (its id is passed in), not into a new run, and
shows a progress line on the console about every tenth of the run.
"""
from __future__ import annotations

import tempfile

from mmengine.hooks import Hook

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
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.rank != 0:
            return
        step, total = runner.iter + 1, runner.max_iters
        shown = step % max(1, total // 10) == 0 or step == total
        if (step % self.interval and step != total and not shown) or (self.client is None and not shown):
            return
        values = {f"train/{k}": _scalar(v) for k, v in (outputs or {}).items()}
        values = {k: v for k, v in values.items() if v is not None}
        if shown:
            from ..console import say

            say(self.stage, f"iter {step}/{total}: loss {values.get('train/loss', float('nan')):.4f}")
        if self.client is None or (step % self.interval and step != total):
            return
        from ..tracking import metric_batch

        lrs = runner.optim_wrapper.get_lr().get("lr")
        if lrs:
            values["train/lr"] = float(lrs[0])
        self.client.log_batch(self.run_id, metrics=metric_batch(values, step))
