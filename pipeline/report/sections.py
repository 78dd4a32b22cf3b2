"""This run's inputs and its sections beside the paper's rows: classification, latency, dense.

Each section is a function returning markdown lines (and, where the JSON
needs it, a dict). Accuracy, AP and mIoU are printed and stored in percent.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from iformer.reference import reference_for

from .. import layout
from ..config import Config
from ..errors import PipelineError
from ..tracking import read_stage_manifest


@dataclass
class Inputs:
    history: list[dict]
    evaluation: dict
    pretrain: dict
    prepare: dict
    dense: dict  # stage -> its metrics (finetune_coco, finetune_ade20k), when they ran
    latency: dict | None = None  # artifacts/latency/latency.json
    export: dict | None = None   # the export stage's manifest
    per_class: dict | None = None  # artifacts/evaluate/per_class_accuracy.json (fractions)


def check(cfg: Config, root: Path) -> Inputs:
    hist = layout.stage_dir("pretrain", root) / "history.csv"
    metrics = layout.metrics_path("evaluate", root)
    for path, stage in ((hist, "pretrain"), (metrics, "evaluate")):
        if not path.is_file():
            raise PipelineError(f"{path}: missing; run the {stage} stage first")
    with open(hist) as f:
        history = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    manifests = {s: read_stage_manifest(s, root) or {} for s in ("prepare", "pretrain")}
    dense = {s: json.loads(layout.metrics_path(s, root).read_text()) for s in DENSE_STAGES
             if layout.metrics_path(s, root).is_file()}
    latency = layout.stage_dir("latency", root) / "latency.json"
    per_class = layout.stage_dir("evaluate", root) / "per_class_accuracy.json"
    return Inputs(history, json.loads(metrics.read_text()), manifests["pretrain"], manifests["prepare"],
                  dense, json.loads(latency.read_text()) if latency.is_file() else None,
                  read_stage_manifest("export", root), json.loads(per_class.read_text()) if per_class.is_file() else None)


DENSE_STAGES = ("finetune_coco", "finetune_ade20k")


def _percent(ap):
    """COCO AP comes as 0..1; the paper prints percent."""
    return None if ap is None else 100 * ap


def dense_section(cfg: Config, dense: dict) -> tuple[list[str], dict]:
    """Mask R-CNN AP and Semantic FPN mIoU beside the paper's Table 5 row."""
    if not dense:
        return [], {}
    coco, ade = dense.get("finetune_coco", {}), dense.get("finetune_ade20k", {})
    ref = reference_for(cfg.model.variant)
    ours = {"ap_box": _percent(coco.get("bbox_ap")), "ap_mask": _percent(coco.get("segm_ap")), "miou": ade.get("miou"),
            "miou_majority_baseline": ade.get("miou_majority_baseline")}
    data = f"detection on `{cfg.detection.data.source}`, segmentation on `{cfg.segmentation.data.source}`"
    lines = ["", "## Dense prediction", "", f"Mask R-CNN and Semantic FPN with the {cfg.model.variant} backbone; {data}.",
             "", "| | AP box | AP mask | mIoU |", "|---|---|---|---|",
             f"| this run | {_fmt(ours['ap_box'])} | {_fmt(ours['ap_mask'])} | {_fmt(ours['miou'])} |"]
    if ref:
        lines.append(f"| paper (COCO 1x, ADE20K 40k; Table 5) | {_fmt(ref.ap_box)} | {_fmt(ref.ap_mask)} | "
                     f"{_fmt(ref.miou)} |")
    if ours["miou_majority_baseline"] is not None:
        lines += ["", f"Predicting the most frequent class everywhere scores {ours['miou_majority_baseline']:.2f} mIoU "
                  "on this validation set."]
    if "digits" in (cfg.detection.data.source, cfg.segmentation.data.source):
        lines += ["", "The digit scenes are the embedded default, not COCO / ADE20K: these figures show the "
                  "fine-tuning works, and are not comparable with the paper's."]
    return lines, {"ours": ours, "metrics": dense}



def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.2f}" if pct else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _ran_on(r: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
    if "compute_units" in r:
        return f"{r['device']}, {r['os']}, Core ML compute units {r['compute_units']}, {versions}"
    return f"{r['device']}, {r['threads']} thread(s), {r['precision']}, {versions}"


def latency_section(ref, latency: dict | None, export: dict | None) -> list[str]:
    """Measured latency per backend beside the paper's iPhone 13 figures, then the Core ML op census."""
    if not latency:
        return []
    models = next((list(r["models"]) for r in latency.values() if "models" in r), [])
    paper = {"classifier_224": ref.latency_ms if ref else None, "backbone_512": ref.dense_latency_ms if ref else None}
    lines = ["", "## Latency", "", "Batch 1, ms: median (p90).", "",
             "| backend | what ran it | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for backend, r in latency.items():
        if "skipped" in r:
            lines.append(f"| {backend} | skipped: {r['skipped']} |" + " – |" * len(models))
        else:
            cells = [f"{r['models'][m]['median']:.2f} ({r['models'][m]['p90']:.2f})" for m in models]
            lines.append(f"| {backend} | {_ran_on(r['ran_on'])} | " + " | ".join(cells) + " |")
    lines.append("| paper | iPhone 13, Core ML | " + " | ".join(_fmt(paper.get(m)) for m in models) + " |")
    if export:
        reasons = {m["compute_plan"].get("skipped") for m in export["models"].values()}
        common_skip = reasons.pop() if len(reasons) == 1 and None not in reasons else None
        lines += ["", "Core ML ML Programs: op census" + (f"; no compute plans ({common_skip})." if common_skip else
                                                       ", and where Core ML would run them."), ""]
        for name, m in export["models"].items():
            c, plan = m["census"], m["compute_plan"]
            line = (f"- `{name}`: {c['ops']} MIL ops, {c['reshape_transpose']} reshape+transpose, "
                    f"{c['by_type'].get('softmax', 0)} softmax, {c['weight_bytes'] / 1e6:.1f} MB weights")
            if "skipped" in plan and not common_skip:
                line += f"; compute plan skipped: {plan['skipped']}"
            elif "skipped" not in plan:
                line += (f"; {100 * plan['cost_share']['neural_engine']:.0f}% of estimated cost on the Neural Engine, "
                         f"{plan['off_neural_engine_ops']} ops off it {plan['off_neural_engine_by_type']}")
            lines.append(line)
    return lines


def build(cfg: Config, inputs: Inputs) -> tuple[str, dict]:
    ev = inputs.evaluation
    ref = reference_for(cfg.model.variant)
    ours = {
        "variant": cfg.model.variant,
        "dataset": inputs.prepare.get("source", cfg.data.source),
        "image_size": cfg.data.image_size,
        "epochs": len(inputs.history),
        "params_m": ev.get("params_m"),
        "gmacs_224": ev.get("gmacs_224"),
        "top1": 100 * ev["top1"],  # percent, as the paper's
        "top5": 100 * ev["top5"],
        "distilled": cfg.distill.enabled,
        "train_img_per_sec": inputs.history[-1].get("img_per_sec"),
    }
    summary = {"units": {"top1": "%", "top5": "%", "ap_box": "%", "ap_mask": "%", "miou": "%", "latency": "ms",
                         "params_m": "M", "gmacs_224": "GMACs"},
               "ours": ours, "paper": ref.as_dict() if ref else None,
               "mlflow_run_ids": {"pretrain": inputs.pretrain.get("mlflow_run_id"),
                                  "prepare": inputs.prepare.get("mlflow_run_id")},
               "ray_run_name": inputs.pretrain.get("ray_run_name"),
               "checkpoint_sha256": inputs.pretrain.get("checkpoint_sha256"),
               "history": [{k: 100 * v if k.startswith("val_top") else v for k, v in r.items()}
                           for r in inputs.history]}
    paper_top1 = (ref.top1_distilled if cfg.distill.enabled else ref.top1) if ref else None
    measured = ", ".join(f"{b} {r['models']['classifier_224']['median']:.2f}"
                         for b, r in (inputs.latency or {}).items() if "classifier_224" in r.get("models", {}))
    dense_lines, summary["dense"] = dense_section(cfg, inputs.dense)
    lines = [
        f"# iFormer pipeline report: {cfg.model.variant}",
        "",
        f"Recipe `{cfg.recipe}`, data `{ours['dataset']}` at {cfg.data.image_size}px, "
        f"{ours['epochs']} epochs, global batch {cfg.train.batch_size} at lr {cfg.lr:.3g}"
        + (", DeiT hard distillation" if cfg.distill.enabled else "") + ".",
        "",
        "| | Params (M) | GMACs @224 | Latency @224 (ms) | Top-1 (%) | Top-5 (%) |",
        "|---|---|---|---|---|---|",
        f"| this run | {_fmt(ours['params_m'])} | {_fmt(ours['gmacs_224'])} | {measured or '–'} | "
        f"{_fmt(ours['top1'])} | {_fmt(ours['top5'])} |",
    ]
    if ref:
        lines.append(f"| paper (ImageNet-1K, 224px) | {_fmt(ref.params_m)} | {_fmt(ref.gmacs)} | "
                     f"{_fmt(ref.latency_ms)} (iPhone 13) | {_fmt(paper_top1)} | – |")
    if ours["dataset"] != "imagefolder":
        lines += ["", f"Top-1 here is on the embedded `{ours['dataset']}` set, not ImageNet-1K: "
                  "it shows the pipeline learns, and is not comparable with the paper's figure."]
    lines += latency_section(ref, inputs.latency, inputs.export)
    summary["latency"] = inputs.latency
    lines += dense_lines
    if inputs.per_class:
        summary["per_class_top1"] = {c: None if a is None else 100 * a for c, a in inputs.per_class.items()}
        lines += ["", "## Per-class top-1 (%)", "", "| " + " | ".join(inputs.per_class) + " |",
                  "|" + "---|" * len(inputs.per_class),
                  "| " + " | ".join(_fmt(None if a is None else 100 * a) for a in inputs.per_class.values()) + " |"]
    lines += ["", "![loss, accuracy and learning rate per epoch](curves.png)", "", "## Per-epoch history", "",
              "| epoch | train loss | val loss | val top-1 | img/s | lr |", "|---|---|---|---|---|---|"]
    for r in inputs.history:
        lines.append(f"| {int(r['epoch'])} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
                     f"{100 * r['val_top1']:.2f} | {r.get('img_per_sec', 0):.1f} | {r.get('lr', 0):.2e} |")
    return "\n".join(lines) + "\n", summary
