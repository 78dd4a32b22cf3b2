"""The `field` stage (`stages/field.py`): the paper's comparison (Fig. 1, Table 3) measured on this host, no training.

Each network of `field.networks` (default: every Table 3 row timm has, at the
paper's resolution for that row, and iFormer T/S/M/L) goes through the
deployment path of `pipeline.deploy.bench` (the latency stage's backends) on
each backend of `field.backends`. Accuracy is the paper's ImageNet-1K top-1 for
the row, labelled as such: nothing is trained here. Per backend: the measured
Pareto front (the paper's top-1 against our latency), whether iFormer is on
it, and how well the backend ranks the networks as the paper's iPhone 13 did
(Spearman's rank correlation, and the networks that move most in rank).

Writes `artifacts/field/`: `field.json` (every row, what ran it, every
reason a network could not run), `field.md`, one `front_<backend>.png` per
backend; and `metrics/field.json`. Off the default `dvc repro` (it times about
30 networks on three backends): `make field` = `dvc repro field/dvc.yaml`.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from iformer.reference import BASELINES, FIELD_IFORMERS, PAPER

from ..config import Config
from ..core import console
from ..core.fronts import pareto_front, ranks, spearman
from ..core.outputs import Outputs
from ..deploy import bench
from ..deploy.backends import check_threads
from ..errors import PipelineError
from ..tracking.runs import StageRun

log = logging.getLogger(__name__)
STAGE = "field"


def paper_rows() -> dict[str, dict]:
    """timm name -> the paper's row for it: name, resolution, params, GMACs, iPhone 13 ms, top-1."""
    rows = {b.timm: {"paper_name": b.model, "size": b.resolution, "paper_params_m": b.params_m,
                     "paper_gmacs": b.gmacs, "iphone13_ms": b.latency_ms, "paper_top1": b.top1}
            for b in BASELINES if b.timm}
    for v in FIELD_IFORMERS:
        r = PAPER[v]
        rows[v] = {"paper_name": f"iFormer-{v.split('_')[1].upper()}", "size": 224, "paper_params_m": r.params_m,
                   "paper_gmacs": r.gmacs, "iphone13_ms": r.latency_ms, "paper_top1": r.top1}
    return rows


@dataclass
class Inputs:
    networks: list[tuple[str, int]]  # (timm name, input side)
    paper: dict[str, dict]


def check(cfg: Config, root: Path) -> Inputs:
    import timm

    fcfg = cfg.field
    check_threads(fcfg.threads, "field.threads")
    paper = paper_rows()
    names = fcfg.networks or list(paper)
    known = set(timm.list_models())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PipelineError(f"field.networks: {', '.join(unknown)} not in timm {timm.__version__} "
                            "(`python -c \"import timm; print(timm.list_models('NAME*'))\"` lists names)")
    return Inputs([(n, paper.get(n, {}).get("size", 224)) for n in names], paper)


def latency(row: dict, backend: str | None) -> float | None:
    """The row's median ms on `backend`, or the paper's iPhone 13 figure for None; None if there is none."""
    return row["backends"].get(backend, {}).get("median") if backend else row.get("iphone13_ms")


def backend_summary(rows: list[dict], backend: str) -> dict:
    """The measured front and the rank agreement with the paper's iPhone 13 on one backend."""
    timed = [r for r in rows if latency(r, backend) is not None and r.get("paper_top1") is not None]
    pts = [(latency(r, backend), r["paper_top1"]) for r in timed]
    front = [timed[i]["model"] for i in pareto_front(pts)]
    both = [r for r in timed if latency(r, None) is not None]
    ours, phone = [latency(r, backend) for r in both], [latency(r, None) for r in both]
    ro, rp = ranks(ours), ranks(phone)
    moves = sorted(({"model": r["model"], "rank_here": a, "rank_iphone13": b, "moved": a - b}
                    for r, a, b in zip(both, ro, rp)), key=lambda m: -abs(m["moved"]))
    return {"timed": len(timed), "front": front, "iformer_on_front": [m for m in front if m.startswith("iformer")],
            "spearman_vs_iphone13": spearman(ours, phone), "pairs": len(both), "moved_most": moves[:5]}


def plot_front(rows: list[dict], backend: str, summary: dict, path: Path) -> None:
    """Paper top-1 against our latency on `backend` (iFormer highlighted, the measured front drawn), beside
    the same networks at the paper's iPhone 13 latency with the paper's front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, title in ((panels[0], backend, f"measured here: {backend} (ms, batch 1)"),
                           (panels[1], None, "paper: iPhone 13, Core ML (ms)")):
        got = [(r, latency(r, key)) for r in rows if r.get("paper_top1") is not None and latency(r, key) is not None]
        pts = [(lat, r["paper_top1"]) for r, lat in got]
        iformer = [r["model"].startswith("iformer") for r, _ in got]
        for flag, style in ((False, dict(color="0.45", marker="s", s=20, label="other networks (Table 3)")),
                            (True, dict(color="tab:red", marker="*", s=120, label="iFormer"))):
            sel = [p for p, f in zip(pts, iformer) if f == flag]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], zorder=3, **style)
        front = sorted(pts[i] for i in pareto_front(pts))
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="tab:blue", alpha=0.6, label="Pareto front")
        for (r, lat), (x, y) in zip(got, pts):
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set(xlabel=f"latency, {title}", ylabel="ImageNet-1K top-1, the paper's (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    rho = summary["spearman_vs_iphone13"]
    fig.suptitle(f"Fig. 1 measured on {backend}: Spearman vs iPhone 13 "
                 f"{'n/a' if rho is None else f'{rho:.2f}'} over {summary['pairs']} networks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict], names: list[str], summaries: dict, wall_s: float) -> str:
    lines = ["# The measured field", "",
             "Top-1 is the paper's ImageNet-1K figure for each network (nothing trained here); latency is measured "
             f"on this host, batch 1, median (p90) in ms. {len(rows)} networks in {wall_s / 60:.1f} min.", ""]
    for b in names:
        s = summaries[b]
        rho = s["spearman_vs_iphone13"]
        lines += [f"## {b}", "", f"![front on {b}](front_{b}.png)", "",
                  f"- On the measured front: {', '.join(s['front']) or 'none'}",
                  f"- iFormer on it: {', '.join(s['iformer_on_front']) or 'none'}",
                  f"- Spearman rank correlation with the paper's iPhone 13 latencies: "
                  f"{'n/a' if rho is None else f'{rho:.3f}'} over {s['pairs']} networks",
                  "- Moved most in rank (here vs iPhone 13): " + ", ".join(
                      f"{m['model']} {m['rank_iphone13']:g} → {m['rank_here']:g}" for m in s["moved_most"]), ""]
    lines += ["## Every network", "", bench.table(rows, names), "", "Paper figures beside them:", "",
              "| network | paper row | size | paper top-1 | iPhone 13 ms | paper params (M) | paper GMACs |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('paper_name', '-')} | {r['size']} | {r.get('paper_top1', '-')} | "
                     f"{r.get('iphone13_ms') if r.get('iphone13_ms') is not None else 'Failed'} | "
                     f"{r.get('paper_params_m', '-')} | {r.get('paper_gmacs', '-')} |")
    return "\n".join(lines) + "\n"


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    fcfg = cfg.field
    names = list(fcfg.backends)
    start = time.monotonic()
    settings = bench.Settings(fcfg.runs, fcfg.warmup, fcfg.threads, fcfg.compute_units, fcfg.device)
    with tempfile.TemporaryDirectory(prefix="iformer-field-") as tmp:
        rows = bench.time_all(inputs.networks, names, settings, Path(tmp), say=lambda s: console.say(STAGE, s))
    wall = time.monotonic() - start
    for r in rows:
        r.update({k: v for k, v in inputs.paper.get(r["model"], {}).items() if k != "size"})
    summaries = {b: backend_summary(rows, b) for b in names}
    outputs = Outputs.begin(STAGE, root)
    for b in names:
        if summaries[b]["timed"]:
            plot_front(rows, b, summaries[b], outputs.dir / f"front_{b}.png")
    (outputs.dir / "field.json").write_text(json.dumps({"rows": rows, "backends": summaries}, indent=2) + "\n")
    (outputs.dir / "field.md").write_text(markdown(rows, names, summaries, wall))
    # A backend with fewer than 3 timed networks has no correlation: left out, not a NaN.
    per = {b: {"timed": s["timed"], "front": len(s["front"]), "iformer_on_front": len(s["iformer_on_front"]),
               **({} if s["spearman_vs_iphone13"] is None else {"spearman_vs_iphone13": s["spearman_vs_iphone13"]})}
           for b, s in summaries.items()}
    mpath = outputs.metrics({"networks": len(rows), "wall_s": round(wall, 1), **per})
    mlflow.log_metrics({f"field.{b}.{k}": v for b, m in per.items() for k, v in m.items()})
    mlflow.log_metric("field.wall_s", wall)
    mlflow.set_tags({f"field.front.{b}": ", ".join(s["front"])[:5000] for b, s in summaries.items()})
    mlflow.log_artifacts(str(outputs.dir), "field")
    mlflow.log_text(mpath.read_text(), f"metrics/{STAGE}.json")
    outputs.manifest(srun, networks=[n for n, _ in inputs.networks], backends=names, runs=fcfg.runs,
                     warmup=fcfg.warmup, threads=fcfg.threads)
    outputs.commit()
    log.info("%d networks in %.0f s; %s", len(rows), wall, "; ".join(
        f"{b}: front {', '.join(s['front'])}" for b, s in summaries.items()))
