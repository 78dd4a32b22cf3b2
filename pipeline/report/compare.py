"""Sections across runs: this run's identity, Table 3 / Table 5-style tables, op census per run.

Our rows come from the MLflow parent runs (`runs.row`), the paper's from
`iformer.reference`; all accuracies in percent, latencies in ms.
"""
from __future__ import annotations

from iformer.reference import reference_for

from .runs import backbone_latency, backends, classifier_latency


def _f(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def identity(experiment: str, commit: str, parent_run_id: str, changed: dict) -> list[str]:
    lines = ["", "## This run", "", f"- MLflow experiment `{experiment}`, parent run `{parent_run_id}`",
             f"- git commit `{commit}`"]
    if changed:
        lines.append("- params differing from the committed baseline (HEAD's params.yaml): " + ", ".join(
            f"`{k}` {v['baseline']} → {v['value']}" for k, v in changed.items()))
    else:
        lines.append("- params: the committed baseline (HEAD's params.yaml)")
    return lines


def head_note(variant: str, params_m: float | None, num_classes: int) -> str | None:
    """Why our parameter count differs from the paper's: the classifier head's width."""
    ref = reference_for(variant)
    if ref is None or params_m is None or num_classes == 1000:
        return None
    from iformer.models import build_model

    full = sum(p.numel() for p in build_model(variant, 1000).parameters()) / 1e6
    return (f"Params {params_m:.2f} M vs the paper's {ref.params_m:.2f} M: the head here has {num_classes} classes; "
            f"the same network with ImageNet's 1000-class head has {full:.2f} M.")


def classification_table(rows: list[dict], current: str) -> list[str]:
    """Table 3 style: every run beside the paper's iFormer rows."""
    bk = backends(rows)
    cells = ["run", "experiment", "params changed", "Params (M)", "GMACs @224",
             *(f"latency {b} (ms)" for b in bk), "Top-1 (%)", "Top-5 (%)"]
    lines = ["", "## All runs: classification (Table 3 style)", "", _row(cells), "|" + "---|" * len(cells)]
    for r in rows:
        mark = " (this run)" if r["run_id"] == current else ""
        lines.append(_row([f"{r['name']}{mark}", r["experiment"], r["params_changed"] or "–", _f(r["params_m"]),
                           _f(r["gmacs_224"]), *(_f(classifier_latency(r, b)) for b in bk), _f(r["top1"]),
                           _f(r["top5"])]))
    for variant in sorted({r["variant"] for r in rows if r["variant"]}):
        ref = reference_for(variant)
        if ref:
            lines.append(_row([f"paper {variant} (ImageNet-1K; latency iPhone 13 {_f(ref.latency_ms)} ms)", "–", "–",
                               _f(ref.params_m), _f(ref.gmacs), *("–" for _ in bk), _f(ref.top1), "–"]))
    return lines


def dense_table(rows: list[dict]) -> list[str]:
    """Table 5 style: AP box / mask, mIoU and the backbone's latency, for runs that fine-tuned."""
    dense = [r for r in rows if r["ap_box"] is not None or r["miou"] is not None]
    if not dense:
        return []
    bk = backends(rows)
    cells = ["run", "AP box (%)", "AP mask (%)", "mIoU (%)", *(f"backbone latency {b} (ms)" for b in bk)]
    lines = ["", "## All runs: dense prediction (Table 5 style)", "", _row(cells), "|" + "---|" * len(cells)]
    for r in dense:
        lines.append(_row([r["name"], _f(r["ap_box"]), _f(r["ap_mask"]), _f(r["miou"]),
                           *(_f(backbone_latency(r, b)) for b in bk)]))
    for variant in sorted({r["variant"] for r in dense}):
        ref = reference_for(variant)
        if ref and ref.ap_box is not None:
            lines.append(_row([f"paper {variant} (COCO 1x / ADE20K; backbone @512 on iPhone 13 "
                               f"{_f(ref.dense_latency_ms)} ms)", _f(ref.ap_box), _f(ref.ap_mask), _f(ref.miou),
                               *("–" for _ in bk)]))
    return lines


def census_table(rows: list[dict]) -> list[str]:
    """Core ML op counts of the exported models, per run (variants differ here first)."""
    with_census = [r for r in rows if r["census_ops"]]
    if not with_census:
        return []
    models = sorted({m for r in with_census for m in r["census_ops"]})
    lines = ["", "## All runs: Core ML op census", "", "| run | variant | " + " | ".join(models) + " |",
             "|" + "---|" * (2 + len(models))]
    for r in with_census:
        lines.append(f"| {r['name']} | {r['variant']} | " + " | ".join(_f(r['census_ops'].get(m), 0) for m in models)
                     + " |")
    return lines


def pareto_section(backend: str, image: str, points: list[dict]) -> list[str]:
    front = [p["run"] for p in points if p["on_front"]]
    return ["", f"### Accuracy vs latency: {backend}", "", f"![accuracy vs latency on {backend}]({image})", "",
            f"Left: our runs measured on `{backend}`, Pareto front: {', '.join(front) or '–'}. Right: the paper's "
            "Tables 3 and 18 (iPhone 13, Core ML, ImageNet-1K), reference figures not measured here."]
