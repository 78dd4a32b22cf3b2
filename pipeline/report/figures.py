"""The report's figures as PNG files: training curves and accuracy vs latency (Fig. 1 style)."""
from __future__ import annotations

from pathlib import Path

from iformer.reference import BASELINES, PAPER, TABLE18

from ..core.fronts import pareto_front
from .history import classifier_latency


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, validation accuracy (%) and learning rate per epoch."""
    plt = _plt()
    epochs = [int(r["epoch"]) for r in history]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
    a.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    a.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    a.legend()
    b.plot(epochs, [100 * r["val_top1"] for r in history], "o-", label="val top-1")
    b.plot(epochs, [100 * r["val_top5"] for r in history], "o-", label="val top-5")
    if "val_top1_ema" in history[0]:
        b.plot(epochs, [100 * r["val_top1_ema"] for r in history], "o--", label="val top-1 (EMA)")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy", ylim=(0, 100))
    b.legend()
    if "lr" in history[0]:
        c.plot(epochs, [r["lr"] for r in history], "o-")
    c.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="Learning rate")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def label_offsets(points: list[tuple[float, float]], near: tuple[float, float]) -> list[int]:
    """For each point, how many labels of earlier points sit at about its place (within `near` = (dx, dy)):
    the k-th label at a place is drawn k lines lower, so runs at one point do not print over each other."""
    out = []
    for i, (x, y) in enumerate(points):
        out.append(sum(1 for px, py in points[:i] if abs(px - x) <= near[0] and abs(py - y) <= near[1]))
    return out


def accuracy_limits(values: list[float]) -> tuple[float, float]:
    """A top-1 axis around `values` that never passes 100 % nor goes below 0."""
    lo, hi = min(values), max(values)
    pad = max(0.5, 0.1 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


#: The paper panel's latency axis ends here (Table 18 reaches 9.47 ms; the iFormers sit below 2).
PAPER_MAX_MS = 4.0


def plot_pareto(rows: list[dict], backend: str, path: Path) -> list[dict]:
    """Our runs on `backend` with their Pareto front, beside the paper's Table 3 and 18 points (iPhone 13).

    Returns the plotted points of our runs (name, latency, top-1, on_front).
    """
    plt = _plt()
    ours = [(r, classifier_latency(r, backend)) for r in rows]
    ours = [(r, lat) for r, lat in ours if lat is not None and r["top1"] is not None]
    pts = [(lat, r["top1"]) for r, lat in ours]
    front = pareto_front(pts)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6))
    a.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3, label="our runs", clip_on=False)
    if pts:
        a.set_ylim(*accuracy_limits([p[1] for p in pts]))
        xs, (y0, y1) = [p[0] for p in pts], a.get_ylim()
        near = (0.03 * (max(xs) - min(xs) or max(xs) or 1), 0.03 * (y1 - y0))
        for (r, _), (x, y), k in zip(ours, pts, label_offsets(pts, near)):
            a.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 3 - 11 * k), fontsize=8)
    fx = sorted(pts[i] for i in front)
    a.plot([p[0] for p in fx], [p[1] for p in fx], "-", color="tab:blue", alpha=0.6, label="our Pareto front")
    a.set(xlabel=f"latency on {backend} (ms, batch 1)", ylabel="top-1 (%)", title=f"Our runs: {backend}")
    a.legend(loc="lower right", fontsize=8)
    b.scatter([x.latency_ms for x in BASELINES], [x.top1 for x in BASELINES], color="0.55", marker="s", s=18,
              label="paper, other networks (Table 3)")
    shown = [x for x in TABLE18 if x.latency_ms is not None and x.latency_ms <= PAPER_MAX_MS]
    hidden = len(TABLE18) - len(shown)
    b.scatter([x.latency_ms for x in shown], [x.top1 for x in shown], color="0.75", marker="^", s=16,
              label=f"paper, more networks (Table 18; {hidden} failed or beyond {PAPER_MAX_MS:g} ms not shown)")
    paper = [r for r in PAPER.values() if r.latency_ms is not None and r.top1 is not None]
    b.plot([r.latency_ms for r in paper], [r.top1 for r in paper], "*-", color="tab:red", markersize=11,
           label="paper, iFormer (Table 3)")
    for r in paper:
        b.annotate(r.variant, (r.latency_ms, r.top1), textcoords="offset points", xytext=(4, -10), fontsize=8)
    b.set(xlabel="latency on iPhone 13, Core ML (ms)", ylabel="ImageNet-1K top-1 (%)",
          title="Paper figures (not measured here)", xlim=(0.4, PAPER_MAX_MS + 0.1))
    b.legend(loc="lower right", fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Accuracy vs latency (Fig. 1 style): our {backend} measurements beside the paper's iPhone 13 rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [{"run": r["name"], "run_id": r["run_id"], "latency_ms": x, "top1": y, "on_front": i in front}
            for i, ((r, _), (x, y)) in enumerate(zip(ours, pts))]
