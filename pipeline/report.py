"""The `report` stage: this pipeline run beside the paper's reference row.

Writes `artifacts/report/` with `report.md`, `report.json` and `curves.png`
(loss and accuracy per epoch). Later issues add export, latency and dense-task
sections; each is a function returning a markdown section and a JSON dict.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from iformer.reference import reference_for

from . import layout
from .config import Config
from .errors import PipelineError
from .tracking import StageRun, read_stage_manifest, write_manifest


@dataclass
class Inputs:
    history: list[dict]
    evaluation: dict
    pretrain: dict
    prepare: dict
    dense: dict  # stage -> its metrics (finetune_coco, finetune_ade20k), when they ran
    latency: dict | None = None  # artifacts/latency/latency.json
    export: dict | None = None   # the export stage's manifest


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
    return Inputs(history, json.loads(metrics.read_text()), manifests["pretrain"], manifests["prepare"],
                  dense, json.loads(latency.read_text()) if latency.is_file() else None,
                  read_stage_manifest("export", root))


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



def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    a.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    a.legend()
    b.plot(epochs, [r["val_top1"] for r in history], "o-", label="val top-1")
    b.plot(epochs, [r["val_top5"] for r in history], "o-", label="val top-5")
    if "val_top1_ema" in history[0]:
        b.plot(epochs, [r["val_top1_ema"] for r in history], "o--", label="val top-1 (EMA)")
    b.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1.02))
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        "top1": ev["top1"],
        "top5": ev["top5"],
        "distilled": cfg.distill.enabled,
        "train_img_per_sec": inputs.history[-1].get("img_per_sec"),
    }
    summary = {"ours": ours, "paper": ref.as_dict() if ref else None,
               "mlflow_run_ids": {"pretrain": inputs.pretrain.get("mlflow_run_id"),
                                  "prepare": inputs.prepare.get("mlflow_run_id")},
               "ray_run_name": inputs.pretrain.get("ray_run_name"),
               "checkpoint_sha256": inputs.pretrain.get("checkpoint_sha256"),
               "history": inputs.history}
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
        f"{_fmt(ours['top1'], True)} | {_fmt(ours['top5'], True)} |",
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
    lines += ["", "![loss and accuracy per epoch](curves.png)", "", "## Per-epoch history", "",
              "| epoch | train loss | val loss | val top-1 | img/s | lr |", "|---|---|---|---|---|---|"]
    for r in inputs.history:
        lines.append(f"| {int(r['epoch'])} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
                     f"{100 * r['val_top1']:.2f} | {r.get('img_per_sec', 0):.1f} | {r.get('lr', 0):.2e} |")
    return "\n".join(lines) + "\n", summary


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    out = layout.stage_dir("report", root)
    out.mkdir(parents=True, exist_ok=True)
    markdown, summary = build(cfg, inputs)
    plot_curves(inputs.history, out / "curves.png")
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    mlflow.log_artifacts(str(out), "report")
    client = srun.client()
    for name in ("report.md", "report.json", "curves.png"):
        client.log_artifact(srun.parent_run_id, str(out / name), "report")
    write_manifest("report", root, srun, top1=summary["ours"]["top1"])
    print(markdown.split("## Per-epoch")[0])
