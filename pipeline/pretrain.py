"""The `pretrain` stage: ImageNet-style pretraining on Ray Train.

`check` validates every input (prepared data, teacher, resume checkpoint)
before Ray starts. `run` launches a `TorchTrainer` whose run name is derived
from the training config and the data fingerprint, so rerunning an interrupted
stage with the same config finds its checkpoints in `ray.storage_path` and
resumes, in the MLflow run the interrupted attempt logged to
(`interrupted_run`); it then writes `artifacts/pretrain/` (final weights,
metric history, manifest) and logs them to MLflow.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, cluster, layout, lifecycle, registry, tracking, trainer
from .config import TRAINING_SECTIONS, Config
from .data import Prepared
from .errors import PipelineError
from .tracking import StageRun, write_manifest

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    prepared: Prepared
    run_name: str
    teacher_path: str | None


def run_name(cfg: Config, prepared: Prepared) -> str:
    """Same training config + same data => same Ray run => resume, not restart."""
    d = cfg.to_dict()
    key = {k: d[k] for k in TRAINING_SECTIONS}
    key["fingerprint"] = prepared.manifest["fingerprint"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"pretrain-{cfg.model.variant}-{digest}"


def check(cfg: Config, root: Path) -> Inputs:
    prepared = Prepared.load(layout.stage_dir("prepare", root))
    n_train = prepared.manifest["counts"]["train"]
    if cfg.train.batch_size > n_train:
        raise PipelineError(f"train.batch_size: {cfg.train.batch_size} is larger than the {n_train} training images")
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and cfg.per_worker_batch % 2:
        raise PipelineError(f"train.batch_size: mixup/cutmix need an even per-worker batch, got {cfg.per_worker_batch}")
    teacher_path = None
    if cfg.distill.enabled:
        from iformer.distill import TeacherError, load_teacher

        path = Path(cfg.distill.teacher_checkpoint)
        path = path if path.is_absolute() else root / path
        if not path.absolute().is_relative_to(root / "teachers"):
            raise PipelineError(f"distill.teacher_checkpoint: {path} is outside {root / 'teachers'}, so DVC "
                                "would not see it change; copy or link it into teachers/")
        try:
            load_teacher(cfg.distill.teacher, path, prepared.num_classes)
        except TeacherError as err:
            raise PipelineError(f"distill.teacher_checkpoint: {err}") from None
        teacher_path = str(path)
    if cfg.train.resume_from is not None:
        src = Path(cfg.train.resume_from)
        src = src / checkpoint.STATE_FILE if src.is_dir() else src
        obj = checkpoint.load_any(src, "train.resume_from")
        if "variant" not in obj:
            raise PipelineError(f"train.resume_from: {src} is not a pretrain checkpoint (no variant recorded)")
        checkpoint.check_compatible(obj, variant=cfg.model.variant, num_classes=prepared.num_classes,
                                    distillation=cfg.distill.enabled, what="train.resume_from", path=src)
    cluster.check(cfg)
    name = run_name(cfg, prepared)
    # One trainer per Ray run: a second `dvc repro` (or a leftover process)
    # on the same run would write the same checkpoints.
    lifecycle.exclusive(cluster.run_dir(cfg, root, name) / ".lock", "pretrain")
    return Inputs(prepared, name, teacher_path)


def interrupted_run(cfg: Config, root: Path, inputs: Inputs) -> str | None:
    """The MLflow run of an earlier attempt at this Ray run: a resumed run continues it (`stage.main`)."""
    return trainer.recorded_run(cfg, root, inputs.run_name)


def fit(cfg: Config, root: Path, inputs: Inputs, srun: StageRun | None):
    """Run the Ray Train job; returns the final training state dict."""
    from .train import train_loop_per_worker

    if srun is not None:
        trainer.remember_run(cfg, root, inputs.run_name, srun.run_id)
    result = trainer.fit(cfg, root, "pretrain", inputs.run_name, train_loop_per_worker, {
        "cfg": cfg.to_dict(),
        "prepared_dir": str(inputs.prepared.dir),
        "teacher_path": inputs.teacher_path,
        "tracking_uri": srun.tracking_uri if srun else None,
        "run_id": srun.run_id if srun else None,
    }, cluster.scaling_config(cfg))
    if result.checkpoint is None:
        raise PipelineError(f"ray run {inputs.run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = checkpoint.load_training_state(Path(d) / checkpoint.STATE_FILE, "final ray checkpoint")
    state["ray_checkpoint"] = result.checkpoint.path
    return state


def write_history(history: list[dict], path: Path) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({**row, "epoch": int(row["epoch"]) + 1})


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    started = time.perf_counter()
    state = fit(cfg, root, inputs, srun)
    out = layout.stage_dir("pretrain", root)
    out.mkdir(parents=True, exist_ok=True)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    use_ema = cfg.train.ema_decay is not None and state.get("ema") is not None
    weights = state["ema"] if use_ema else state["model"]
    digest = checkpoint.save_weights(
        out / "model.pt", weights, variant=cfg.model.variant, num_classes=state["num_classes"],
        distillation=cfg.distill.enabled, classes=inputs.prepared.classes, image_size=cfg.data.image_size,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, extra={"ema": use_ema, "epochs": state["epoch"]},
    )
    history = state["history"]
    write_history(history, out / "history.csv")
    # The plots' data, committed to git beside metrics/ (as DVC's cache holds only this
    # clone's runs, `dvc plots diff` against the recorded baseline needs it there).
    layout.plots_dir(root).mkdir(parents=True, exist_ok=True)
    write_history(history, layout.plots_dir(root) / "pretrain_history.csv")
    final = history[-1]
    # Training's own figures; accuracy is the evaluate stage's (`top1`/`top5` there), so the
    # last epoch's validation numbers stay in history.csv and are not a second `top1` column.
    summary = {"epochs": state["epoch"], "train_loss": final["train_loss"], "img_per_sec": final.get("img_per_sec", 0.0),
               "train_s": round(time.perf_counter() - started, 1)}
    metrics = layout.metrics_path("pretrain", root)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(summary, indent=2) + "\n")

    mlflow.log_artifact(str(out / "history.csv"), "pretrain")
    mlflow.log_artifact(str(metrics), "metrics")
    mlflow.set_tags({"iformer.ray_run_name": inputs.run_name, "iformer.checkpoint_sha256": digest})
    srun.log_headline({k: summary[k] for k in ("img_per_sec", "train_s", "train_loss")})
    # The trained network is logged once: as an MLflow model, or else as the checkpoint.
    if cfg.mlflow.log_model:
        start = time.perf_counter()
        log.info("logging the model to MLflow (torch.export; mlflow.log_model: false skips this)")
        source = log_model(cfg, out / "model.pt")
        log.info("model logged in %.1f s", time.perf_counter() - start)
    else:
        mlflow.log_artifact(str(out / "model.pt"), "checkpoints")
        source = f"runs:/{srun.run_id}/checkpoints"
    version = registry.register(srun.client(), cfg, source, srun.run_id, {
        "iformer.checkpoint_sha256": digest, "iformer.parent_run_id": srun.parent_run_id,
        **{k: v for k, v in tracking.identity_tags(cfg, root).items() if k != tracking.TAG_REPO}})
    write_manifest(
        "pretrain", root, srun,
        ray_run_name=inputs.run_name,
        ray_storage_path=cluster.storage_path(cfg, root),
        # pruned after success unless ray.prune_checkpoints is off: the weights are model.pt
        ray_checkpoint=None if cfg.ray.prune_checkpoints else state.get("ray_checkpoint"),
        registered_model={"name": registry.model_name(cfg), "version": version},
        checkpoint="model.pt",
        checkpoint_sha256=digest,
        variant=cfg.model.variant,
        epochs=state["epoch"],
        final=summary,
    )
    freed = cluster.prune_run(cfg, root, inputs.run_name)
    log.info("pruned %.1f MB of Ray checkpoints (the weights are in %s)", freed / 1e6, out / "model.pt")
    log.info("%s last-epoch val_top1 %.4f after %d epochs -> %s", cfg.model.variant, final.get("val_top1", float("nan")),
             state["epoch"], out / "model.pt")


def log_model(cfg: Config, weights_path: Path) -> str:
    """The eval-mode network as an MLflow model (torch.export, with signature and example)."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    obj = checkpoint.load_weights(weights_path)
    model = checkpoint.build_from_weights(obj)
    size = obj["image_size"]
    # A batch of 2 keeps the exported batch dimension dynamic (torch.export
    # specialises size-1 dimensions).
    example = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, logits),
                                    input_example=example, pip_requirements=model_requirements())
    return info.model_uri


def model_requirements() -> list[str]:
    """What serving the logged model needs, pinned to what trained it.

    Stated rather than inferred: MLflow's inference imports the model in a
    fresh interpreter, which took most of the stage's fixed cost.
    """
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision", "timm", "mlflow")]
