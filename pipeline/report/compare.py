"""Sections across runs: this run's identity, Table 3 / Table 5-style tables, op census per run.

Our rows come from the MLflow parent runs (`history.row`), each latency beside the
host that timed it; the paper's (`iformer.reference`) stand in their own reference
table, so no column mixes datasets or devices. Accuracies in percent, latencies in ms.
"""
from __future__ import annotations

from iformer.reference import reference_for

from .history import backbone_latency, backends, classifier_latency


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


def head_note(variant: str, params_m: float | None, params_m_1000: float | None, num_classes: int) -> str | None:
    """Why our parameter count differs from the paper's: the classifier head's width (`params_m_1000`:
    the evaluate stage's count of the same network with ImageNet's head)."""
    ref = reference_for(variant)
    if ref is None or params_m is None or params_m_1000 is None or num_classes == 1000:
        return None
    return (f"Params {params_m:.2f} M vs the paper's {ref.params_m:.2f} M: the head here has {num_classes} classes; "
            f"the same network with ImageNet's 1000-class head has {params_m_1000:.2f} M.")


def _host(r: dict, backend: str) -> str:
    return r.get("latency_host", {}).get(backend) or ("not recorded" if backend in r["latency_ms"] else "–")


def classification_table(rows: list[dict], current: str) -> list[str]:
    """Table 3 style, our runs only: each latency column is one backend, beside the host that timed it."""
    bk = backends(rows)
    cells = ["run", "experiment", "params changed", "data", "Params (M)", "GMACs @224",
             *(c for b in bk for c in (f"latency {b} (ms)", f"{b} host")), "Top-1 (%)", "Top-5 (%)"]
    lines = ["", "## Our runs: classification (Table 3 style)", "",
             "Measured here; the paper's figures are in *Paper reference* below, not in these columns.", "",
             _row(cells), "|" + "---|" * len(cells)]
    for r in rows:
        mark = " (this run)" if r["run_id"] == current else ""
        lines.append(_row([f"{r['name']}{mark}", r["experiment"], r["params_changed"] or "–", r.get("data") or "–",
                           _f(r["params_m"]), _f(r["gmacs_224"]),
                           *(c for b in bk for c in (_f(classifier_latency(r, b)), _host(r, b))),
                           _f(r["top1"]), _f(r["top5"])]))
    return lines


def dense_table(rows: list[dict]) -> list[str]:
    """Table 5 style, our runs only: AP box / mask, mIoU and the backbone's latency with its host."""
    dense = [r for r in rows if r["ap_box"] is not None or r["miou"] is not None]
    if not dense:
        return []
    bk = backends(rows)
    cells = ["run", "AP box (%)", "AP mask (%)", "mIoU (%)",
             *(c for b in bk for c in (f"backbone latency {b} (ms)", f"{b} host"))]
    lines = ["", "## Our runs: dense prediction (Table 5 style)", "", _row(cells), "|" + "---|" * len(cells)]
    for r in dense:
        lines.append(_row([r["name"], _f(r["ap_box"]), _f(r["ap_mask"]), _f(r["miou"]),
                           *(c for b in bk for c in (_f(backbone_latency(r, b)), _host(r, b)))]))
    return lines


def paper_table(variants) -> list[str]:
    """The paper's rows for `variants`, as reference: ImageNet-1K, COCO, ADE20K; latency on iPhone 13."""
    refs = [ref for ref in map(reference_for, sorted(set(variants))) if ref]
    if not refs:
        return []
    cells = ["variant", "Params (M)", "GMACs @224", "iPhone 13 latency @224 (ms)", "ImageNet-1K top-1 (%)",
             "with distillation (%)", "COCO AP box (%)", "COCO AP mask (%)", "ADE20K mIoU (%)",
             "iPhone 13 backbone @512 (ms)"]
    lines = ["", "## Paper reference (not measured here)", "",
             "The iFormer paper's Tables 3, 5 and 12: ImageNet-1K, COCO 2017 (Mask R-CNN 1x), ADE20K (Semantic FPN), "
             "latency on an iPhone 13 with Core ML. Reference figures only: other data and another device than our "
             "runs above.", "", _row(cells), "|" + "---|" * len(cells)]
    for ref in refs:
        lines.append(_row([f"paper {ref.variant}", _f(ref.params_m), _f(ref.gmacs), _f(ref.latency_ms), _f(ref.top1),
                           _f(ref.top1_distilled), _f(ref.ap_box), _f(ref.ap_mask), _f(ref.miou),
                           _f(ref.dense_latency_ms)]))
    return lines


def census_table(rows: list[dict]) -> list[str]:
    """Core ML op counts of the exported models, per run (variants differ here first)."""
    with_census = [r for r in rows if r["census_ops"] or r["census_ops_total"]]
    if not with_census:
        return []
    models = sorted({m for r in with_census for m in (*r["census_ops"], *r["census_ops_total"])})
    lines = ["", "## All runs: Core ML op census", "",
             "MIL operations without `const`, the same for any weights of a network; in brackets with `const`, "
             "which Core ML merges where weight values are equal, so that total depends on the weights.", "",
             "| run | variant | " + " | ".join(models) + " |", "|" + "---|" * (2 + len(models))]
    for r in with_census:
        cells = [f"{_f(r['census_ops'].get(m), 0)} ({_f(r['census_ops_total'].get(m), 0)})" for m in models]
        lines.append(f"| {r['name']} | {r['variant']} | " + " | ".join(cells) + " |")
    return lines


def pareto_section(backend: str, image: str, points: list[dict], rows: list[dict]) -> list[str]:
    front = [p["run"] for p in points if p["on_front"]]
    hosts = "; ".join(sorted({_host(r, backend) for r in rows if backend in r["latency_ms"]})) or "host not recorded"
    return ["", f"### Accuracy vs latency: {backend}", "", f"![accuracy vs latency on {backend}]({image})", "",
            f"Left: our runs measured on `{backend}` ({hosts}), Pareto front: {', '.join(front) or '–'}. Right: the "
            "paper's Tables 3 and 18 (iPhone 13, Core ML, ImageNet-1K), reference figures not measured here."]


def field_section(field: dict | None, manifest: dict | None) -> list[str]:
    """The measured field (`make field`), when it has run: per backend its front and rank agreement.

    Not an input DVC tracks for the report (the field is off the default `dvc repro`): the
    section names the field's own MLflow run so a reader can tell which measurement it shows.
    """
    if not field or not manifest:
        return []
    lines = ["", "## The measured field (the paper's networks timed on this host)", "",
             f"From `make field` (MLflow run `{manifest.get('mlflow_run_id')}`; rerun `make report` after it to refresh "
             "this section). Top-1 is the paper's; latency is ours, batch 1. Every row: `artifacts/field/field.md`.", ""]
    for b, s in field["backends"].items():
        rho = s.get("spearman_vs_iphone13")
        lines += [f"- **{b}**: front {', '.join(s['front']) or 'none'}; iFormer on it: "
                  f"{', '.join(s['iformer_on_front']) or 'none'}; Spearman vs iPhone 13 "
                  f"{'n/a' if rho is None else f'{rho:.2f}'} over {s['pairs']} networks"]
        if s["timed"]:
            lines += ["", f"![measured front on {b}](field_front_{b}.png)", ""]
    return lines
