"""The fine-tuning job on each Ray Train worker: an mmengine Runner inside Ray.

Ray Train starts the workers and, for more than one, the torch process group.
mmengine must not start a second one: with one worker the Runner runs with
launcher 'none'; with several it gets launcher 'pytorch', and its `setup_env`
sees the group Ray already initialised and only joins it (mmengine calls
`init_dist` only when no group exists), wrapping the model in DDP over Ray's
group. Checkpoints go to Ray Train through `RayCheckpointHook`; an interrupted
run resumes from Ray's newest checkpoint (mmengine `resume`). After training
every rank runs mmengine's ValLoop (the metric gathers the ranks' shards) and
the metrics are reported with the final checkpoint (full state, so a restart
after it only re-evaluates).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mmengine.runner import Runner

from ..compute.trainer import keep_layouts, seed_everything, set_cpu_math
from ..config import Config
from ..core.console import say
from . import configs
from .amp import float_heads
from .hooks import CHECKPOINT_FILE, MlflowLossHook, RayCheckpointHook
from .mmengine_checkpoints import allow_mmengine_checkpoints

TASKS = ("detection", "segmentation")
#: How the worker's first line names what `*.train.amp` resolved to.
PRECISIONS = {"none": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


class ChannelsLastRunner(Runner):
    """mmengine's Runner, with the network put in channels_last (NHWC) memory before it is wrapped
    when its config says `channels_last`, and its heads' outputs cast to float32 when it trains
    in mixed precision (`amp.float_heads`). The convolutions follow their weights' layout (oneDNN on
    CPUs, cuDNN on GPUs), so the batches stay as the data preprocessor makes them; converting
    before the wrap lays DDP's gradient buckets out like the parameters they mirror. A fused
    optimizer keeps its gradients and moments in the same layout (`trainer.keep_layouts`)."""

    def wrap_model(self, model_wrapper_cfg, model):
        if self.cfg.get("amp", "none") != "none":
            float_heads(model)
        if self.cfg.get("channels_last", False):
            model = model.to(memory_format=torch.channels_last)
        return super().wrap_model(model_wrapper_cfg, model)

    def build_optim_wrapper(self, optim_wrapper):
        wrapper = super().build_optim_wrapper(optim_wrapper)
        keep_layouts(wrapper.optimizer)  # `*.train.fused_optimizer`
        return wrapper


def build_config(cfg: Config, task: str, data: dict, work_dir: str, init: str | None, world: int,
                 use_gpu: bool, layer_scale: float | None = None) -> dict:
    """The mmengine config of `task` for a Ray worker group of `world` workers.

    `layer_scale`: the backbone's, as its initial weights have it (None: the official value).
    """
    build = configs.detection if task == "detection" else configs.segmentation
    mm = build(cfg, data, work_dir, init, world, layer_scale)
    mm["channels_last"] = getattr(cfg, task).train.channels_last  # read by ChannelsLastRunner
    if world > 1:
        mm["launcher"] = "pytorch"
        # CPU modules take no device_ids; on GPU mmengine fills in LOCAL_RANK.
        wrapper = dict(type="MMDistributedDataParallel", broadcast_buffers=False, find_unused_parameters=False)
        if not use_gpu:
            wrapper["device_ids"] = None
        mm["model_wrapper_cfg"] = wrapper
    return mm


def set_up_process(section) -> tuple[int, bool]:
    """What this process needs before a task's Runner is built (`section`: `cfg.detection` or
    `cfg.segmentation`): its CPU math, kernels, registries and checkpoint allow-list. Returns the
    torch threads and whether every one flushes subnormals (`set_cpu_math`)."""
    # First: torch's thread pool takes the subnormal mode of the thread that makes it.
    threads, flushed = set_cpu_math(section.ray.cpus_per_worker, section.train.flush_denormal)
    # mmengine seeds random, numpy and torch from `randomness` when the Runner starts; the kernels
    # are ours to choose (its own `deterministic` would make ops without a deterministic CUDA kernel fail).
    seed_everything(section.train.seed, deterministic=True)
    configs.register()
    allow_mmengine_checkpoints()
    return threads, flushed


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from mmengine.config import Config as MMConfig
    from ray.train import Checkpoint

    cfg = Config.model_validate(config["cfg"])
    task = config["task"]
    section = getattr(cfg, task)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads, flushed = set_up_process(section)

    # mmengine's work dir: its logs, config dump and resume copy; gone however the run ends.
    with tempfile.TemporaryDirectory(prefix=f"mm-{task}-{rank}-", ignore_cleanup_errors=True) as work_dir:
        mm = build_config(cfg, task, config["data"], work_dir, config["init"], world, cfg.ray.use_gpu,
                          config.get("layer_scale"))
        origin = "the pretrained backbone"
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                shutil.copy(Path(d) / CHECKPOINT_FILE, Path(work_dir) / CHECKPOINT_FILE)
            mm["load_from"], mm["resume"] = str(Path(work_dir) / CHECKPOINT_FILE), True
            origin = f"ray checkpoint {ckpt.path}"
        runner = ChannelsLastRunner.from_cfg(MMConfig(mm))
        by_epoch = task == "detection"
        interval = section.train.checkpoint_interval
        runner.register_hook(RayCheckpointHook(interval, by_epoch))
        runner.register_hook(MlflowLossHook(config.get("tracking_uri"), config.get("run_id"),
                                            section.train.log_interval, config["stage"]))
        if rank == 0:
            total = f"{section.train.epochs} epochs" if by_epoch else f"{section.train.iters} iterations"
            floats = ("subnormals flushed" if flushed else f"{task}.train.flush_denormal: some threads keep subnormals"
                    if section.train.flush_denormal else "IEEE subnormals")
            amp = PRECISIONS[mm["amp"]] + (" (auto)" if section.train.amp == "auto" else "")
            say(config["stage"], f"{task}: rank 0/{world}, {threads} threads ({floats}), {amp}, {total} from {origin}")
        start = time.perf_counter()
        runner.train()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        # mmdet / mmseg return numpy scalars (float32 for mmseg's IoU), which are not Python floats.
        metrics = {k: float(v) for k, v in runner.val().items() if isinstance(v, (int, float, np.number))}
        metrics.update(train_seconds=train_seconds, eval_seconds=time.perf_counter() - start, amp=mm["amp"])
        with tempfile.TemporaryDirectory() as tmp:
            runner.save_checkpoint(tmp, CHECKPOINT_FILE, by_epoch=by_epoch)
            final = Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(metrics, checkpoint=final, checkpoint_dir_name="final")
