"""The `finetune_coco` (Mask R-CNN) and `finetune_ade20k` (Semantic FPN) stages.

`check` reads the prepared data description and the backbone's initial
weights (the pretrain stage's `model.pt`, or an official iFormer file given as
`<task>.backbone.checkpoint`) and loads them into the backbone strictly, so a
checkpoint of another variant fails before Ray starts; the backbone's layer
scale is the one those weights have (recorded, or their `gamma` parameters).
`run` trains on Ray Train (`pipeline/dense/worker.py`) under a run name derived
from the config, the data and the initial weights (same inputs => resume, in
the MLflow run the interrupted attempt logged to: `interrupted_run`), then writes
`artifacts/<stage>/` (weights `model.pth` in mmengine's format, the resolved
mmengine config as text, sample predictions) and `metrics/<stage>.json`, and
logs them to the stage's MLflow run.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from iformer.dense.backbone import BackboneWeightsError, IFormerBackbone, checkpoint_layer_scale, load_backbone_weights

from ..compute import cluster, trainer
from ..config import Config
from ..core import checkpoint, console, layout, lifecycle
from ..core.outputs import Outputs
from ..errors import PipelineError
from ..tracking.runs import StageRun
from . import prepare, samples

log = logging.getLogger(__name__)

TASK_OF = {"finetune_coco": "detection", "finetune_ade20k": "segmentation"}
# Our metric names -> mmdet's CocoMetric / mmseg's IoUMetric keys.
METRICS = {
    "detection": {"bbox_ap": "coco/bbox_mAP", "bbox_ap50": "coco/bbox_mAP_50", "bbox_ap75": "coco/bbox_mAP_75",
                  "segm_ap": "coco/segm_mAP", "segm_ap50": "coco/segm_mAP_50", "segm_ap75": "coco/segm_mAP_75"},
    "segmentation": {"miou": "mIoU", "macc": "mAcc", "aacc": "aAcc"},
}
HEADLINE = {"detection": ("bbox_ap", "segm_ap"), "segmentation": ("miou",)}


@dataclass
class Inputs:
    stage: str
    task: str
    data: dict
    init: str
    init_sha256: str
    run_name: str
    layer_scale: float  # of the initial weights, hence of the backbone


def initial_weights(cfg: Config, root: Path, task: str) -> tuple[Path, float]:
    """Load the backbone's initial weights strictly; returns their file and layer scale."""
    field = f"{task}.backbone.checkpoint"
    path = Path(getattr(cfg, task).backbone.checkpoint).expanduser()
    path = path if path.is_absolute() else root / path
    tracked = (layout.stage_dir("pretrain", root), root / "weights")  # what dvc.yaml lists as dependencies
    layout.check_inside(path, tracked, field, "copy or link it into weights/")
    pretrained = path == layout.stage_dir("pretrain", root) / "model.pt"
    if path.is_dir():
        raise PipelineError(f"{field}: {path} is a directory; name the weights file in it")
    if not path.is_file():
        hint = "run the pretrain stage first" if pretrained \
            else "expected a pretrain model.pt or an official iFormer checkpoint"
        raise PipelineError(f"{field}: {path} does not exist; {hint}")
    if pretrained:
        checkpoint.verify_pretrain(path, root)
    obj = checkpoint.read_file(path, field)  # one line for a refused pickle or a broken file
    if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT:  # a pretrain weights file
        obj = checkpoint.load_weights(path, field, expect_variant=cfg.model.variant)
        log.info("backbone weights %s: %s", path.name, checkpoint.describe_source(obj.get("source")))
    else:
        log.info("backbone weights %s: a released checkpoint, loaded as it is", path.name)
    try:
        layer_scale = checkpoint_layer_scale(obj)
        load_backbone_weights(IFormerBackbone(cfg.model.variant, window_size=0, layer_scale=layer_scale), obj,
                              str(path))
    except BackboneWeightsError as err:
        raise PipelineError(f"{field}: {err} (model.variant is {cfg.model.variant})") from None
    return path, layer_scale


def run_name(cfg: Config, stage: str, task: str, data: dict, init_sha: str) -> str:
    # drawing samples and checking images are not training
    section = getattr(cfg, task).model_dump(mode="json", exclude={"samples": True, "data": {"verify"}})
    key = {"section": section, "variant": cfg.model.variant,
           "data": {k: data.get(k) for k in ("source", "root", "classes", "splits")}, "init": init_sha}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{stage}-{cfg.model.variant}-{digest}"


def check_stage(stage: str):
    task = TASK_OF[stage]

    def check(cfg: Config, root: Path) -> Inputs:
        data = prepare.load(root, task)
        if not Path(data["root"]).is_dir():
            raise PipelineError(f"{data['root']}: the {task} data prepared by prepare_dense is gone; rerun it")
        init, layer_scale = initial_weights(cfg, root, task)
        sha = checkpoint.sha256(init)
        name = run_name(cfg, stage, task, data, sha)
        cluster.check(cfg, getattr(cfg, task).ray, f"{task}.ray")
        lifecycle.exclusive(cluster.run_dir(cfg, root, name) / ".lock", stage)  # one trainer per Ray run
        return Inputs(stage, task, data, str(init), sha, name, layer_scale)

    return check


def interrupted_run(cfg: Config, root: Path, inputs: Inputs) -> str | None:
    """The MLflow run of an earlier attempt at this Ray run: a resumed run continues it (`stage.main`)."""
    return trainer.recorded_run(cfg, root, inputs.run_name)


def fit(cfg: Config, root: Path, inputs: Inputs, srun: StageRun | None):
    from .worker import train_loop_per_worker

    section = getattr(cfg, inputs.task)
    if srun is not None:
        trainer.remember_run(cfg, root, inputs.run_name, srun.run_id)
    result = trainer.fit(cfg, root, inputs.stage, inputs.run_name, train_loop_per_worker, {
        "cfg": cfg.to_dict(), "stage": inputs.stage, "task": inputs.task, "data": inputs.data, "init": inputs.init,
        "layer_scale": inputs.layer_scale,
        "tracking_uri": srun.tracking_uri if srun else None, "run_id": srun.run_id if srun else None,
    }, cluster.scaling_config(cfg, section.ray),
        warm=partial(samples.warm_up, inputs.task) if section.samples else None)
    if result.checkpoint is None or not result.metrics:
        raise PipelineError(f"ray run {inputs.run_name} finished without a checkpoint or metrics")
    return result


def summarize(task: str, raw: dict, data: dict) -> dict:
    """Our metric names from mmdet/mmseg's; AP in 0..1 (as COCO), IoU/accuracies in % (as mmseg)."""
    missing = [k for k in METRICS[task].values() if k not in raw]
    if missing and task == "detection" and not any(k.startswith("coco/") for k in raw):
        # mmdet's CocoMetric returns nothing when the model detected nothing at all: AP 0.
        log.warning("the detector found nothing on the validation images; AP is 0")
        raw = {**raw, **{k: 0.0 for k in missing}}
    elif missing:
        raise PipelineError(f"evaluation returned no {', '.join(missing)} (got {sorted(raw)})")
    out = {ours: float(raw[theirs]) for ours, theirs in METRICS[task].items()}
    if task == "segmentation":
        out["miou_majority_baseline"] = majority_baseline(data["splits"]["val"]["class_pixels"])
    out.update(train_seconds=raw["train_seconds"], eval_seconds=raw["eval_seconds"])
    return out


def majority_baseline(class_pixels: list[int]) -> float:
    """mIoU (%) of predicting the most frequent class everywhere (all-background on the digit scenes).

    IoU of that class = its share of the labelled pixels; every other class
    present scores 0; classes absent from the ground truth are left out, as
    mmseg's IoUMetric leaves them out (NaN).
    """
    total = sum(class_pixels)
    present = [c for c in class_pixels if c > 0]
    return 100.0 * max(class_pixels) / total / len(present) if total else 0.0


def run_stage(stage: str):
    def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
        import mlflow
        import torch

        from .mmengine_checkpoints import allow_mmengine_checkpoints
        from .worker import build_config

        task = inputs.task
        section = getattr(cfg, task)
        result = fit(cfg, root, inputs, srun)
        metrics = summarize(task, result.metrics, inputs.data)
        outputs = Outputs.begin(stage, root)
        out = outputs.dir
        allow_mmengine_checkpoints()
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "checkpoint.pth", map_location="cpu", weights_only=True)
        weights = out / "model.pth"
        torch.save({"meta": state.get("meta", {}), "state_dict": state["state_dict"]}, weights)

        from mmengine.config import Config as MMConfig

        # OpenMMLab's prints and deprecation warnings go to the run's log, not the console.
        with console.to_log(cluster.run_dir(cfg, root, inputs.run_name) / "ray.log"):
            mm = build_config(cfg, task, inputs.data, "<ray worker temp dir>", None, 1, False, inputs.layer_scale)
            (out / "config.py").write_text(MMConfig(mm).pretty_text)  # a record for readers; never executed
            drawn = samples.draw_samples(task, mm, weights, inputs.data, section.samples, out / "samples")

        mpath = outputs.metrics(metrics)
        mlflow.log_metrics(metrics)
        srun.log_headline({k: metrics[k] for k in HEADLINE[task]})  # the same names as metrics/<stage>.json
        mlflow.log_text(mpath.read_text(), f"metrics/{stage}.json")
        mlflow.log_artifact(str(out / "config.py"), stage)
        for path in drawn:
            mlflow.log_artifact(str(path), f"{stage}/samples")
        mlflow.set_tags({"iformer.ray_run_name": inputs.run_name, "iformer.backbone_init": inputs.init,
                         "iformer.train_precision": result.metrics.get("amp", "none")})  # `*.train.amp` as it ran
        outputs.manifest(srun, task=task, metrics=metrics, ray_run_name=inputs.run_name,
                         ray_storage_path=cluster.storage_path(cfg, root), checkpoint="model.pth",
                         checkpoint_sha256=checkpoint.sha256(weights), backbone_init=inputs.init,
                         backbone_init_sha256=inputs.init_sha256, samples=[p.name for p in drawn])
        outputs.commit()
        cluster.prune_run(cfg, root, inputs.run_name)  # finished: its checkpoints are not needed to resume
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in METRICS[task])
        console.say(stage, f"{cfg.model.variant} {shown} (train {metrics['train_seconds']:.0f}s, "
                    f"eval {metrics['eval_seconds']:.0f}s)")

    return run
