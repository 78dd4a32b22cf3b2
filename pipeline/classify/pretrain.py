"""The `pretrain` stage: ImageNet-style pretraining on Ray Train, or released weights passed through.

`check` validates every input (prepared data, released weights, teacher,
resume checkpoint) before Ray starts. With `model.weights` training starts
from released weights; with `train.epochs: 0` too, nothing trains: `run`
writes those weights as `model.pt` for the prepared classes, unchanged. `run` launches a `TorchTrainer` whose run name is derived
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

from ..compute import cluster, trainer
from ..config import TRAINING_SECTIONS, Config
from ..core import checkpoint, layout, lifecycle
from ..core.outputs import Outputs
from ..errors import PipelineError
from ..tracking import registry, runs
from ..tracking.runs import StageRun
from .datasets import Prepared, normalization

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    prepared: Prepared
    run_name: str | None  # None: passed through, nothing trains
    teacher_path: str | None
    release: checkpoint.Release | None = None


def register(cfg: Config, root: Path, srun: StageRun, logged: str, tags: dict) -> str | None:
    """A model version for this run's weights if `mlflow.register_model` asks for one (its number, else None)."""
    client = srun.client()
    parent = client.get_run(srun.parent_run_id)
    changed = parent.data.tags.get("iformer.params_changed", "")  # `baseline` when none differ (tracking.runs)
    if not registry.wanted(cfg, changed):
        log.info("model not registered: mlflow.register_model is %s and this run changed %s",
                 cfg.mlflow.register_model, changed)
        return None
    version = registry.register(client, cfg, logged, srun.run_id, {
        **tags, "iformer.parent_run_id": srun.parent_run_id, "iformer.params_changed": changed,
        **{k: v for k, v in runs.identity_tags(cfg, root).items() if k != runs.TAG_REPO}},
        description=f"Trained by pipeline run '{parent.info.run_name}' ({srun.parent_run_id}); params changed from "
                    f"the committed ones: {changed}.")
    client.set_tag(srun.parent_run_id, registry.TAG_VERSION, f"{registry.model_name(cfg)}/{version}")
    return version


def run_name(cfg: Config, prepared: Prepared, release: checkpoint.Release | None = None) -> str:
    """Same training config + same data (+ same starting weights) => same Ray run => resume, not restart."""
    d = cfg.to_dict()
    key = {k: d[k] for k in TRAINING_SECTIONS}
    key["fingerprint"] = prepared.manifest["fingerprint"]
    if release is not None:
        key["weights_sha256"] = release.sha256
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"pretrain-{cfg.model.variant}-{digest}"


def released_weights(cfg: Config, root: Path, prepared: Prepared) -> checkpoint.Release:
    path = layout.weights_path(cfg.model.weights, root)
    return checkpoint.check_release(path, str(cfg.model.weights), variant=cfg.model.variant, layer_scale=cfg.layer_scale,
                                    num_classes=prepared.num_classes, classes=prepared.classes,
                                    pass_through=cfg.train.epochs == 0)


def check(cfg: Config, root: Path) -> Inputs:
    prepared = Prepared.load(layout.stage_dir("prepare", root))
    release = released_weights(cfg, root, prepared) if cfg.model.weights is not None else None
    if cfg.train.epochs == 0:  # passed through: no training, so no teacher, Ray or batch to check
        return Inputs(prepared, None, None, release)
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
        layout.check_inside(path, (root / "teachers",), "distill.teacher_checkpoint",
                                "copy or link it into teachers/")
        if path.is_dir():
            raise PipelineError(f"distill.teacher_checkpoint: {path} is a directory; name the teacher's file in it")
        try:
            load_teacher(cfg.distill.teacher, path, prepared.num_classes)
        except TeacherError as err:
            raise PipelineError(f"distill.teacher_checkpoint: {err}") from None
        teacher_path = str(path)
    if cfg.train.resume_from is not None:
        src = Path(cfg.train.resume_from)
        obj = checkpoint.load_resume_state(src)
        checkpoint.check_compatible(obj, variant=cfg.model.variant, num_classes=prepared.num_classes,
                                    distillation=cfg.distill.enabled, what="train.resume_from", path=src)
    cluster.check(cfg)
    name = run_name(cfg, prepared, release)
    # One trainer per Ray run: a second `dvc repro` (or a leftover process)
    # on the same run would write the same checkpoints.
    lifecycle.exclusive(cluster.run_dir(cfg, root, name) / ".lock", "pretrain")
    return Inputs(prepared, name, teacher_path, release)


def interrupted_run(cfg: Config, root: Path, inputs: Inputs) -> str | None:
    """The MLflow run of an earlier attempt at this Ray run: a resumed run continues it (`stage.main`)."""
    return trainer.recorded_run(cfg, root, inputs.run_name) if inputs.run_name else None


def fit(cfg: Config, root: Path, inputs: Inputs, srun: StageRun | None):
    """Run the Ray Train job; returns the final training state dict."""
    from .worker import train_loop_per_worker

    if srun is not None:
        trainer.remember_run(cfg, root, inputs.run_name, srun.run_id)
    result = trainer.fit(cfg, root, "pretrain", inputs.run_name, train_loop_per_worker, {
        "cfg": cfg.to_dict(),
        "prepared_dir": str(inputs.prepared.dir),
        "teacher_path": inputs.teacher_path,
        "weights_path": str(inputs.release.path) if inputs.release else None,
        "tracking_uri": srun.tracking_uri if srun else None,
        "run_id": srun.run_id if srun else None,
    }, cluster.scaling_config(cfg), warm=lambda: warm_up(cfg))
    if result.checkpoint is None:
        raise PipelineError(f"ray run {inputs.run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = checkpoint.load_training_state(Path(d) / checkpoint.STATE_FILE, "final ray checkpoint")
    state["ray_checkpoint"] = result.checkpoint.path
    return state


def warm_up(cfg: Config) -> None:
    """What `run` needs once training ends to log the model, readied while the driver waits on Ray
    (`trainer.fit`): the network (timm), MLflow's PyTorch flavour, its check of the model's
    requirements against what is installed (it maps every installed package to its modules once per
    process), and torch.export's one-time set-up: ~3 s of one core that the stage's end no longer
    spends, done while the workers' start leaves a core idle. Without `mlflow.log_model` the end
    needs none of it (the workers report the mean and std their transforms used)."""
    if cfg.mlflow.log_model:
        import mlflow.pytorch  # noqa: F401
        import timm  # noqa: F401 (the network `run` builds to log)
        from mlflow.models import infer_signature  # noqa: F401
        from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

        warn_dependency_requirement_mismatches(model_requirements())  # what log_model checks, as it will

        from iformer.models import build_model  # noqa: F401

        tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        torch.export.export(tiny, (torch.zeros(2, 3, 8, 8),))


def passed_through(inputs: Inputs) -> dict:
    """The final state of a stage that trains nothing: the released weights as they are."""
    return {"model": inputs.release.state, "ema": None, "epoch": 0, "history": [],
            "num_classes": inputs.prepared.num_classes, **normalization()}


#: The columns of an empty history (weights passed through): the plots' axes still exist.
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5")


def write_history(history: list[dict], path: Path) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k)) or list(HISTORY_COLUMNS)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({**row, "epoch": int(row["epoch"]) + 1})


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    started = time.perf_counter()
    release = inputs.release
    trains = inputs.run_name is not None
    state = fit(cfg, root, inputs, srun) if trains else passed_through(inputs)
    outputs = Outputs.begin("pretrain", root)
    out = outputs.dir
    use_ema = cfg.train.ema_decay is not None and state.get("ema") is not None
    weights = state["ema"] if use_ema else state["model"]
    distillation = cfg.distill.enabled if trains else release.distillation
    origin = release.source("fine-tuned" if trains else "passed through") if release else None
    digest = checkpoint.save_weights(
        out / "model.pt", weights, variant=cfg.model.variant, num_classes=state["num_classes"],
        distillation=distillation, classes=inputs.prepared.classes, image_size=cfg.data.image_size,
        mean=state["mean"], std=state["std"], layer_scale=cfg.layer_scale,
        extra={"ema": use_ema, "epochs": state["epoch"], "source": origin},
    )
    history = state["history"]
    write_history(history, out / "history.csv")
    # The plots' data, committed to git beside metrics/ (as DVC's cache holds only this
    # clone's runs, `dvc plots diff` against the recorded baseline needs it there).
    write_history(history, outputs.file(layout.plots_dir(root) / "pretrain_history.csv"))
    final = history[-1] if history else {}
    # Training's own figures; accuracy is the evaluate stage's (`top1`/`top5` there), so the
    # last epoch's validation numbers stay in history.csv and are not a second `top1` column.
    summary = {"epochs": state["epoch"],
               **({"train_loss": final["train_loss"], "img_per_sec": final.get("img_per_sec", 0.0)} if final else {}),
               "train_s": round(time.perf_counter() - started, 1)}
    metrics = outputs.metrics(summary)

    mlflow.log_artifact(str(out / "history.csv"), "pretrain")
    mlflow.log_text(metrics.read_text(), "metrics/pretrain.json")
    tags = {"iformer.checkpoint_sha256": digest, **checkpoint.source_tags(origin)}
    mlflow.set_tags({**tags, **({"iformer.ray_run_name": inputs.run_name} if trains else {})})
    # The trained network is logged once: as an MLflow model, or else as the checkpoint.
    if cfg.mlflow.log_model:
        start = time.perf_counter()
        log.info("logging the model to MLflow (torch.export; mlflow.log_model: false skips this)")
        logged = log_model(cfg, out / "model.pt")
        log.info("model logged in %.1f s", time.perf_counter() - start)
    else:
        mlflow.log_artifact(str(out / "model.pt"), "checkpoints")
        logged = f"runs:/{srun.run_id}/checkpoints"
    version = register(cfg, root, srun, logged, tags)
    # After registering: the version carries these figures too.
    srun.log_headline({k: summary[k] for k in ("img_per_sec", "train_s", "train_loss") if k in summary})
    outputs.manifest(
        srun,
        ray_run_name=inputs.run_name,
        ray_storage_path=cluster.storage_path(cfg, root) if trains else None,
        # pruned after success unless ray.prune_checkpoints is off: the weights are model.pt
        ray_checkpoint=None if cfg.ray.prune_checkpoints else state.get("ray_checkpoint"),
        registered_model={"name": registry.model_name(cfg), "version": version} if version else None,
        checkpoint="model.pt",
        checkpoint_sha256=digest,
        variant=cfg.model.variant,
        distillation=distillation,
        epochs=state["epoch"],
        source=origin,
        final=summary,
    )
    outputs.commit()
    model_path = layout.stage_dir("pretrain", root) / "model.pt"
    if not trains:
        log.info("%s: %s -> %s", cfg.model.variant, checkpoint.describe_source(origin), model_path)
        return
    freed = cluster.prune_run(cfg, root, inputs.run_name)
    log.info("pruned %.1f MB of Ray checkpoints (the weights are in %s)", freed / 1e6, model_path)
    log.info("%s last-epoch val_top1 %.4f after %d epochs -> %s", cfg.model.variant, final.get("val_top1", float("nan")),
             state["epoch"], model_path)


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
    # pt2 (torch.export), MLflow's safe format, said outright. MLflow's check that reloads the saved
    # model and predicts the example took half of this function's time in every run; the tests
    # load the logged model and compare its predictions with the checkpoint's instead.
    info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, logits),
                                    input_example=example, pip_requirements=model_requirements(),
                                    serialization_format="pt2", validate_serving_input=False)
    return info.model_uri


def model_requirements() -> list[str]:
    """What serving the logged model needs, pinned to what trained it.

    Stated rather than inferred: MLflow's inference imports the model in a
    fresh interpreter, which took most of the stage's fixed cost.
    """
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision", "timm", "mlflow")]
