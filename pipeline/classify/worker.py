"""The training loop that runs on each Ray Train worker. Readable top to bottom.

`train_loop_per_worker(config)` builds data, model, optimizer, schedule and
loss from the validated `Config`, resumes from the latest Ray checkpoint if
there is one (else `train.resume_from`, else starts from `model.weights` or
from scratch), trains with per-iteration cosine LR, validates each epoch
(metrics reduced across workers), checkpoints every epoch and, on rank 0,
logs per-epoch metrics to the stage's MLflow run and prints progress.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from ..compute.trainer import compute_threads, keep_layouts, seed_everything
from ..config import Config
from ..core import console
from ..core.checkpoint import STATE_FILE, check_compatible, load_release_into, load_resume_state, load_training_state
from ..tracking.metrics import MetricLogger
from .datasets import ImageListDataset, Prepared, build_transforms, normalization

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


#: A console line of the pretrain stage (the driver shows these, Ray's chatter goes to its log).
say = functools.partial(console.say, "pretrain")


# -- pieces ---------------------------------------------------------------------
@dataclass
class Components:
    model: nn.Module          # possibly DDP-wrapped
    bare: nn.Module           # the underlying network
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object | None
    mixup: object | None
    criterion: nn.Module
    distill: nn.Module | None
    steps_per_epoch: int


def build_loaders(cfg: Config, prepared: Prepared, rank: int, world: int, use_gpu: bool):
    train_ds = ImageListDataset(prepared, "train", build_transforms(cfg, training=True))
    val_ds = ImageListDataset(prepared, "val", build_transforms(cfg, training=False))
    per_worker = cfg.per_worker_batch
    # One shuffled order per (seed, epoch), whatever the worker count: rank r takes
    # positions r, r + world, ... of it, so the ranks' i-th batches together are the
    # i-th global batch of a single worker, and a resumed epoch sees the same order.
    sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    workers = cfg.data.loader_workers
    common = dict(num_workers=workers, pin_memory=use_gpu, persistent_workers=workers > 0)
    train = DataLoader(train_ds, batch_size=per_worker, sampler=sampler, drop_last=True, generator=gen, **common)
    # Each rank evaluates a disjoint stride of val (no padding), sums are reduced.
    val = DataLoader(Subset(val_ds, range(rank, len(val_ds), world)), batch_size=cfg.evaluate.batch_size,
                     shuffle=False, **common)
    if len(train) == 0:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} exceeds the {len(train_ds)} training images")
    return train, val, sampler


def build_components(cfg: Config, num_classes: int, device: torch.device, steps_per_epoch: int,
                     wrap=lambda m: m, teacher_path: str | None = None) -> Components:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    from iformer.distill import HardDistillationLoss, load_teacher
    from iformer.models import build_model

    bare = build_model(cfg.model.variant, num_classes, drop_path=cfg.model.drop_path,
                       layer_scale=cfg.layer_scale, distillation=cfg.distill.enabled)
    if cfg.distill.enabled:
        bare.set_distilled_training(True)
    if cfg.train.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    bare = bare.to(device)
    ema = ModelEmaV3(bare, decay=cfg.train.ema_decay) if cfg.train.ema_decay else None
    model = wrap(bare)
    if cfg.train.compile:  # timm's --torchcompile; of the DDP wrapper, whose buckets then split the graph
        model = torch.compile(model)
    o = cfg.optim
    optimizer = create_optimizer_v2(bare, opt=o.name, lr=cfg.lr, weight_decay=o.weight_decay,
                                    betas=tuple(o.betas), eps=o.eps, fused=o.fused)
    keep_layouts(optimizer)
    total = cfg.train.epochs * steps_per_epoch
    warmup = min(int(round(cfg.schedule.warmup_epochs * steps_per_epoch)), max(total - 1, 0))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=cfg.schedule.min_lr,
                                  warmup_t=warmup, warmup_lr_init=cfg.schedule.warmup_lr,
                                  warmup_prefix=True, t_in_epochs=False)
    a = cfg.aug
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                      num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    distill = None
    if cfg.distill.enabled:
        teacher = load_teacher(cfg.distill.teacher, Path(teacher_path), num_classes).to(device)
        distill = HardDistillationLoss(criterion, teacher, cfg.distill.alpha)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16" and device.type == "cuda")
    return Components(model, bare, optimizer, scheduler, scaler, ema, mixup, criterion, distill, steps_per_epoch)


def autocast(cfg: Config, device: torch.device):
    if cfg.train.amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=AMP_DTYPES[cfg.train.amp])


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, cfg: Config, device: torch.device) -> dict:
    model.eval()
    loss_sum = top1 = top5 = n = 0.0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, device):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        k = min(5, logits.shape[1])
        pred = logits.topk(k, dim=1).indices
        hit = pred.eq(targets[:, None])
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
        n += targets.numel()
    loss_sum, top1, top5, n = _all_sum([loss_sum, top1, top5, n], device)
    return {"loss": loss_sum / max(n, 1), "top1": top1 / max(n, 1), "top5": top5 / max(n, 1)}


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm normalises with its running statistics and leaves them be; its affine part still trains.

    Each sample's output then depends on that sample alone, so a global batch
    split over workers gives the gradient of the same batch on one worker (the
    CPU has no SyncBatchNorm to share per-batch statistics across ranks).
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_one_epoch(c: Components, loader: DataLoader, cfg: Config, device: torch.device, epoch: int,
                    global_step: int, progress=None) -> tuple[dict, int]:
    c.model.train()
    if cfg.train.freeze_bn:
        freeze_batchnorm(c.bare)
    # The loss sum stays on the device; the host reads it (one sync) only at log steps.
    loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if c.mixup is not None:
            images, targets = c.mixup(images, targets)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, device):
            outputs = c.model(images)
            loss = c.distill(images, outputs, targets) if c.distill is not None else c.criterion(outputs, targets)
        c.optimizer.zero_grad(set_to_none=True)
        c.scaler.scale(loss).backward()
        if cfg.optim.clip_grad:
            c.scaler.unscale_(c.optimizer)
            nn.utils.clip_grad_norm_(c.model.parameters(), cfg.optim.clip_grad)
        c.scaler.step(c.optimizer)
        c.scaler.update()
        global_step += 1
        c.scheduler.step_update(num_updates=global_step)
        if c.ema is not None:
            c.ema.update(c.bare, step=global_step)
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        if (i + 1) % cfg.train.log_every_batches == 0 or i + 1 == len(loader):  # every rank, at the same steps
            total = loss_sum.item()
            if not math.isfinite(total):
                raise FloatingPointError(f"loss is {total} by epoch {epoch} step {global_step}")
            if progress is not None:
                progress(epoch, i + 1, len(loader), seen / (time.perf_counter() - start), total / seen,
                         c.optimizer.param_groups[0]["lr"])
    elapsed = time.perf_counter() - start
    loss_sum, seen, elapsed_sum = _all_sum([loss_sum.item(), seen, elapsed], device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    elapsed_mean = elapsed_sum / world  # the ranks step together (DDP syncs each step)
    return {"train_loss": loss_sum / max(seen, 1),
            "img_per_sec": seen / max(elapsed_mean, 1e-9), "train_seconds": elapsed_mean,
            "lr": c.optimizer.param_groups[0]["lr"]}, global_step


# -- progress and metrics on rank 0 -------------------------------------------------
def print_progress(total_epochs: int):
    def show(epoch, batch, batches, ips, loss, lr):
        width = 24
        filled = int(width * batch / batches)
        bar = "#" * filled + "." * (width - filled)
        say(f"epoch {epoch + 1}/{total_epochs} [{bar}] {batch}/{batches} "
            f"| {ips:.1f} img/s | loss {loss:.4f} | lr {lr:.2e}")
    return show


# -- state ----------------------------------------------------------------------------
def state_dict(c: Components, cfg: Config, num_classes: int, epoch: int, step: int, history: list) -> dict:
    return {
        "variant": cfg.model.variant, "num_classes": num_classes, "distillation": cfg.distill.enabled,
        "epoch": epoch, "global_step": step, "history": history,
        "model": c.bare.state_dict(), "optimizer": c.optimizer.state_dict(),
        "scheduler": c.scheduler.state_dict(), "scaler": c.scaler.state_dict(),
        "ema": c.ema.module.state_dict() if c.ema is not None else None, **normalization(),
    }


def restore(c: Components, state: dict) -> tuple[int, int, list]:
    c.bare.load_state_dict(state["model"], strict=True)
    c.optimizer.load_state_dict(state["optimizer"])
    c.scheduler.load_state_dict(state["scheduler"])
    c.scaler.load_state_dict(state["scaler"])
    if c.ema is not None:
        c.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    return int(state["epoch"]), int(state["global_step"]), list(state.get("history", []))


def initial_state(cfg: Config, weights_path: str | None = None) -> tuple[dict | None, str]:
    """Where training starts: Ray's latest checkpoint, else train.resume_from, else model.weights, else scratch."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return load_training_state(Path(d) / STATE_FILE, "ray checkpoint"), f"ray checkpoint {ckpt.path}"
    if cfg.train.resume_from is not None:
        return load_resume_state(Path(cfg.train.resume_from)), f"training state {cfg.train.resume_from}"
    if weights_path is not None:
        return {"weights": Path(weights_path)}, f"released weights {cfg.model.weights}"
    return None, "scratch"


def start_from_weights(c: Components, path: Path) -> list[str]:
    """The network (and its EMA) from released weights; returns the heads that start afresh."""
    fresh = load_release_into(c.bare, path)
    if c.ema is not None:  # built as a copy of the random initialisation
        c.ema.module.load_state_dict(c.bare.state_dict())
    return fresh


# -- the loop -----------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed + rank, cfg.train.deterministic)
    if device.type == "cpu":  # compute threads = the CPUs Ray reserved for this worker (that it may run on)
        torch.set_num_threads(compute_threads(cfg.ray.cpus_per_worker))

    prepared = Prepared.load(Path(config["prepared_dir"]))
    num_classes = prepared.num_classes
    train_loader, val_loader, sampler = build_loaders(cfg, prepared, rank, world, device.type == "cuda")

    def wrap(m):
        return ray.train.torch.prepare_model(m, move_to_device=False) if world > 1 else m

    c = build_components(cfg, num_classes, device, len(train_loader), wrap, config.get("teacher_path"))

    start_epoch, step, history = 0, 0, []
    state, origin = initial_state(cfg, config.get("weights_path"))
    if state is not None and "weights" in state:
        fresh = start_from_weights(c, state["weights"])
        origin += f" ({', '.join(fresh)} initialised afresh)" if fresh else ""
    elif state is not None:
        check_compatible(state, variant=cfg.model.variant, num_classes=num_classes,
                         distillation=cfg.distill.enabled, what="resume checkpoint", path=origin)
        start_epoch, step, history = restore(c, state)
    logger = MetricLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    if rank == 0:
        say(f"rank 0/{world} on {device} ({torch.get_num_threads()} threads): {cfg.model.variant}, "
            f"{len(train_loader)} steps/epoch, lr {cfg.lr:.3g}, starting at epoch {start_epoch} from {origin}")
        for row in history:  # a resumed run carries the earlier epochs into its MLflow run
            logger.log(row)
    progress = print_progress(cfg.train.epochs) if rank == 0 else None

    def report(row: dict) -> None:
        # Every rank reports; rank 0 attaches the checkpoint.
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(state_dict(c, cfg, num_classes, row["epoch"] + 1, step, history), os.path.join(tmp, STATE_FILE))
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{row['epoch'] + 1:04d}")

    if start_epoch >= cfg.train.epochs and history:
        report(history[-1])  # already complete: hand the final state back to the driver
        return
    ended = None  # when this run's previous epoch's validation ended (its checkpoint and report came after)
    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        tstart = time.perf_counter()
        train_stats, step = train_one_epoch(c, train_loader, cfg, device, epoch, step, progress)
        tval = time.perf_counter()
        # The bare network, not the DDP wrapper: ranks hold unequal val shards, and
        # eval needs no gradient sync.
        val = validate(c.bare, val_loader, cfg, device)
        row = {"epoch": epoch, **train_stats, "val_loss": val["loss"], "val_top1": val["top1"],
               "val_top5": val["top5"]}
        if c.ema is not None:
            ev = validate(c.ema.module, val_loader, cfg, device)
            row.update(val_top1_ema=ev["top1"], val_top5_ema=ev["top5"], val_loss_ema=ev["loss"])
        done = time.perf_counter()
        # Where an epoch's time goes (make bench P6): its steps, its validation, and the
        # previous epoch's checkpoint and report, seen as the gap before this one (0 on a run's first).
        row.update(epoch_seconds=done - tstart, val_seconds=done - tval,
                   checkpoint_seconds=tstart - ended if ended is not None else 0.0)
        ended = done
        history.append(row)
        report(row)
        if rank == 0:  # after the checkpoint: an epoch in MLflow is never redone after a restart
            logger.log(row)
            say(f"epoch {epoch + 1}/{cfg.train.epochs}: train_loss {row['train_loss']:.4f} "
                f"val_top1 {row['val_top1']:.4f} val_top5 {row['val_top5']:.4f} {row['img_per_sec']:.1f} img/s")
