"""This run's inputs and its sections beside the paper's rows: classification, latency, dense.

Each section is a function returning markdown lines (and, where the JSON
needs it, a dict). Accuracy, AP and mIoU are printed and stored in percent.
An input whose stage is not up to date with this run's params and code
(`Inputs.stale`, from DVC: `pipeline.core.freshness`) is dropped before anything is
built from it: its cells read "stale" and the report names the stage and why.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from iformer.reference import reference_for

from ..config import Config
from ..core import layout
from ..core.freshness import describe
from ..core.outputs import read_stage_manifest
from ..errors import PipelineError


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
    stale: dict = field(default_factory=dict)  # stage -> why its outputs are not this run's

    def without_stale(self, stale: dict) -> "Inputs":
        """These inputs with those of the `stale` stages dropped (and remembered as stale)."""
        gone = lambda stage, value, empty=None: empty if stage in stale else value  # noqa: E731
        return replace(self, history=gone("pretrain", self.history, []), evaluation=gone("evaluate", self.evaluation, {}),
                       pretrain=gone("pretrain", self.pretrain, {}), prepare=gone("prepare", self.prepare, {}),
                       dense={s: m for s, m in self.dense.items() if s not in stale},
                       latency=gone("latency", self.latency), export=gone("export", self.export),
                       per_class=gone("evaluate", self.per_class), stale=dict(stale))


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
#: What a cell shows for a figure whose stage is not up to date with this run.
STALE = "stale"


def _percent(ap):
    """COCO AP comes as 0..1; the paper prints percent."""
    return None if ap is None else 100 * ap


def dense_section(cfg: Config, dense: dict, stale: dict | None = None) -> tuple[list[str], dict]:
    """Mask R-CNN AP and Semantic FPN mIoU beside the paper's Table 5 row ("stale" for a stale stage)."""
    stale = {s for s in stale or {} if s in DENSE_STAGES}
    if not dense and not stale:
        return [], {}
    coco, ade = dense.get("finetune_coco", {}), dense.get("finetune_ade20k", {})
    ref = reference_for(cfg.model.variant)
    ours = {"ap_box": _percent(coco.get("bbox_ap")), "ap_mask": _percent(coco.get("segm_ap")), "miou": ade.get("miou"),
            "miou_majority_baseline": ade.get("miou_majority_baseline")}
    cell = {"ap_box": "finetune_coco", "ap_mask": "finetune_coco", "miou": "finetune_ade20k"}
    shown = {k: STALE if stage in stale else _fmt(ours[k]) for k, stage in cell.items()}
    data = f"detection on `{cfg.detection.data.source}`, segmentation on `{cfg.segmentation.data.source}`"
    lines = ["", "## Dense prediction", "", f"Mask R-CNN and Semantic FPN with the {cfg.model.variant} backbone; {data}.",
             "", "| | AP box (%) | AP mask (%) | mIoU (%) |", "|---|---|---|---|",
             f"| this run | {shown['ap_box']} | {shown['ap_mask']} | {shown['miou']} |"]
    if ref and ref.ap_box is not None:
        lines += ["", f"Paper reference, not measured here (Table 5; COCO 2017 Mask R-CNN 1x, ADE20K Semantic FPN): "
                  f"AP box {_fmt(ref.ap_box)}, AP mask {_fmt(ref.ap_mask)}, mIoU {_fmt(ref.miou)}."]
    if ours["miou_majority_baseline"] is not None:
        lines += ["", f"Predicting the most frequent class everywhere scores {ours['miou_majority_baseline']:.2f} mIoU "
                  "on this validation set."]
    if "digits" in (cfg.detection.data.source, cfg.segmentation.data.source):
        lines += ["", "The digit scenes are the embedded default, not COCO / ADE20K: these figures show the "
                  "fine-tuning works, and are not comparable with the paper's."]
    return lines, {"ours": ours, "metrics": dense, "stale": sorted(stale)}



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
        return []  # not measured, or stale (`stale_section` says so)
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
    quoted = ", ".join(f"{m} {_fmt(paper[m])} ms" for m in models if paper.get(m) is not None)
    if quoted:
        lines += ["", f"Paper reference, not measured here (iPhone 13, Core ML; Tables 3 and 5): {quoted}."]
    if export:
        reasons = {m["compute_plan"].get("skipped") for m in export["models"].values()}
        common_skip = reasons.pop() if len(reasons) == 1 and None not in reasons else None
        lines += ["", "Core ML ML Programs: op census" + (f"; no compute plans ({common_skip})." if common_skip else
                                                       ", and where Core ML would run them."), ""]
        for name, m in export["models"].items():
            c, plan = m["census"], m["compute_plan"]
            line = (f"- `{name}`: {c['ops_without_const']} MIL ops without const ({c['ops_total']} with), "
                    f"{c['reshape_transpose']} reshape+transpose, "
                    f"{c['by_type'].get('softmax', 0)} softmax, {c['weight_bytes'] / 1e6:.1f} MB weights")
            if "skipped" in plan and not common_skip:
                line += f"; compute plan skipped: {plan['skipped']}"
            elif "skipped" not in plan:
                line += (f"; {100 * plan['cost_share']['neural_engine']:.0f}% of estimated cost on the Neural Engine, "
                         f"{plan['off_neural_engine_ops']} ops off it {plan['off_neural_engine_by_type']}")
            lines.append(line)
    return lines


def measured_latency(latency: dict | None) -> list[tuple[str, str, float, str]]:
    """(backend, model, median ms, host) per measured backend: its 224 px classifier, else its first one."""
    out = []
    for b, r in (latency or {}).items():
        models = sorted(m for m in r.get("models", {}) if m.startswith("classifier_"))
        if models:
            m = "classifier_224" if "classifier_224" in models else models[0]
            ran = r.get("ran_on", {})  # `label` since issue 14; before, the device and threads
            host = ran.get("label") or ", ".join(str(ran[k]) for k in ("device", "threads") if k in ran)
            out.append((b, m, r["models"][m]["median"], host or "host not recorded"))
    return out


def first_table(dataset: str, size_cells: list[str], top_cells: list[str], measured: list, stale: bool) -> list[str]:
    """This run alone, one column per quantity: a latency column per backend beside the host that timed it."""
    lat_head = [c for b, m, _, _ in measured for c in (f"latency {b} {m.removeprefix('classifier_')} px (ms)",
                                                       f"{b} host")]
    lat_cells = [c for _, _, v, host in measured for c in (f"{v:.2f}", host)]
    if stale:  # the stale figures were dropped: one cell says so
        lat_head, lat_cells = ["latency (ms)"], [STALE]
    head = ["", "data", "Params (M)", "GMACs @224", *lat_head, "Top-1 (%)", "Top-5 (%)"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            "| " + " | ".join(["this run", dataset, *size_cells, *lat_cells, *top_cells]) + " |"]


def stale_section(stale: dict) -> list[str]:
    """What this report leaves out because its stage is not up to date with this run's params and code."""
    if not stale:
        return []
    return ["", f"**Not up to date**, left out (\"{STALE}\"): the outputs of {describe(stale)} were not produced "
            "with this run's params and code. `dvc repro` reruns those stages (then `dvc repro -f report`)."]


def build(cfg: Config, inputs: Inputs) -> tuple[str, dict]:
    from ..core.checkpoint import describe_source  # here, not at the top: it imports torch, which `pipeline.exps` does without

    ev, stale = inputs.evaluation, inputs.stale
    ref = reference_for(cfg.model.variant)
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    ours = {
        "variant": cfg.model.variant,
        "dataset": inputs.prepare.get("source", cfg.data.source),
        "image_size": cfg.data.image_size,
        "epochs": cfg.train.epochs,
        "params_m": ev.get("params_m"),
        "gmacs_224": ev.get("gmacs_224"),
        "top1": pct(ev.get("top1")),  # percent, as the paper's
        "top5": pct(ev.get("top5")),
        "distilled": inputs.pretrain.get("distillation", cfg.distill.enabled),
        "train_img_per_sec": inputs.history[-1].get("img_per_sec") if inputs.history else None,
        "weights_source": inputs.pretrain.get("source"),
    }
    summary = {"units": {"top1": "%", "top5": "%", "ap_box": "%", "ap_mask": "%", "miou": "%", "latency": "ms",
                         "params_m": "M", "gmacs_224": "GMACs"},
               "ours": ours, "paper": ref.as_dict() if ref else None, "stale": stale,
               "mlflow_run_ids": {"pretrain": inputs.pretrain.get("mlflow_run_id"),
                                  "prepare": inputs.prepare.get("mlflow_run_id")},
               "ray_run_name": inputs.pretrain.get("ray_run_name"),
               "checkpoint_sha256": inputs.pretrain.get("checkpoint_sha256"),
               "history": [{k: 100 * v if k.startswith("val_top") else v for k, v in r.items()}
                           for r in inputs.history]}
    paper_top1 = (ref.top1_distilled if ours["distilled"] else ref.top1) if ref else None
    measured = measured_latency(inputs.latency)
    dense_lines, summary["dense"] = dense_section(cfg, inputs.dense, stale)
    ev_cell = (lambda key: STALE) if "evaluate" in stale else (lambda key: _fmt(ours[key]))
    lines = [
        f"# iFormer pipeline report: {cfg.model.variant}",
        "",
        f"Recipe `{cfg.recipe}`, data `{ours['dataset']}` at {cfg.data.image_size}px, " + (
            f"{cfg.train.epochs} epochs, global batch {cfg.train.batch_size} at lr {cfg.lr:.3g}"
            + (", DeiT hard distillation" if cfg.distill.enabled else "") if cfg.train.epochs else
            "no training") + (f"; weights from {describe_source(ours['weights_source'])}"
                              if ours["weights_source"] else "") + ".",
        "",
        *first_table(ours["dataset"], [ev_cell(k) for k in ("params_m", "gmacs_224")],
                     [ev_cell(k) for k in ("top1", "top5")], measured, "latency" in stale),
    ]
    if ref:
        lines += ["", "Paper reference, not measured here (Table 3; ImageNet-1K at 224 px, latency on iPhone 13 with "
                  "Core ML):", "", "| reference | Params (M) | GMACs @224 | iPhone 13 latency @224 (ms) | "
                  f"ImageNet-1K top-1 (%){' distilled' if ours['distilled'] else ''} |", "|---|---|---|---|---|",
                  f"| paper {cfg.model.variant} | {_fmt(ref.params_m)} | {_fmt(ref.gmacs)} | {_fmt(ref.latency_ms)} | "
                  f"{_fmt(paper_top1)} |"]
    if ours["dataset"] != "imagefolder":
        lines += ["", f"Top-1 here is on the embedded `{ours['dataset']}` set, not ImageNet-1K: "
                  + ("it shows the pipeline learns, and is" if cfg.train.epochs else "it is")
                  + " not comparable with the paper's figure."]
    lines += stale_section(stale)
    lines += latency_section(ref, inputs.latency, inputs.export)
    summary["latency"] = inputs.latency
    lines += dense_lines
    if inputs.per_class:
        summary["per_class_top1"] = {c: None if a is None else 100 * a for c, a in inputs.per_class.items()}
        lines += ["", "## Per-class top-1 (%)", "", "| " + " | ".join(inputs.per_class) + " |",
                  "|" + "---|" * len(inputs.per_class),
                  "| " + " | ".join(_fmt(None if a is None else 100 * a) for a in inputs.per_class.values()) + " |"]
    if not inputs.history:  # weights passed through: nothing trained here
        return "\n".join(lines) + "\n", summary
    lines += ["", "![loss, accuracy and learning rate per epoch](curves.png)", "", "## Per-epoch history", "",
              "| epoch | train loss | val loss | val top-1 | img/s | lr |", "|---|---|---|---|---|---|"]
    for r in inputs.history:
        lines.append(f"| {int(r['epoch'])} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
                     f"{100 * r['val_top1']:.2f} | {r.get('img_per_sec', 0):.1f} | {r.get('lr', 0):.2e} |")
    return "\n".join(lines) + "\n", summary
