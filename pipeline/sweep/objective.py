"""Latency as the sweep's second objective: time each variant once, keep those within budget,
and find the accuracy-latency Pareto front of the trials.

A trial's latency depends on its architecture only (the variant, at
`sweep.latency.size`), not on lr or weight decay, so every variant the search
may draw is timed once, before training, on the machine that drives the
sweep, with nothing training beside it: the deploy form (BN fused, explicit
attention) in eager torch, or exported to ONNX and run by ONNX Runtime, batch
1, with the `latency` section's runs, warm-up and threads (as the latency
stage times the exported models). With `budget_ms`, variants over it are
left out of the search before any trial starts.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..config import Config
from ..deploy import backends, bench
from ..errors import PipelineError

log = logging.getLogger(__name__)


def variants(cfg: Config) -> list[str]:
    """The variants the search may draw: `sweep.space.variant`, else `model.variant`."""
    return list(cfg.sweep.space.variant) or [cfg.model.variant]


def time_variant(variant: str, num_classes: int, cfg: Config, workdir: Path) -> dict:
    """Median/p90 ms (and how it ran) of `variant`'s deploy form on `sweep.latency.backend`."""
    subject = bench.Network(variant, cfg.sweep.latency.size, workdir, num_classes, cfg.export.onnx.opset)
    results, ran = backends.measure(cfg.sweep.latency.backend, {variant: subject}, cfg.latency,
                                    backends.Context(workdir))
    return {**{k: v for k, v in results[variant].items() if k != "samples"}, "ran_on": ran}


def measure(cfg: Config, num_classes: int) -> dict[str, dict]:
    """{variant: {"median", "p90", ..., "ran_on"}} for every variant the search may draw."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="iformer-sweep-latency-") as tmp:
        for variant in variants(cfg):
            out[variant] = time_variant(variant, num_classes, cfg, Path(tmp))
            log.info("%s on %s at %d px: median %.2f ms", variant, cfg.sweep.latency.backend,
                     cfg.sweep.latency.size, out[variant]["median"])
    return out


def within_budget(cfg: Config, timed: dict[str, dict]) -> list[str]:
    """The variants no slower than `sweep.latency.budget_ms` (all of them without a budget)."""
    budget = cfg.sweep.latency.budget_ms
    if budget is None:
        return list(timed)
    kept = [v for v, t in timed.items() if t["median"] <= budget]
    for v in timed:
        if v not in kept:
            log.info("%s left out: %.2f ms is over the %.2f ms budget", v, timed[v]["median"], budget)
    if not kept:
        slowest = ", ".join(f"{v} {t['median']:.2f} ms" for v, t in timed.items())
        raise PipelineError(f"sweep.latency.budget_ms: every variant the sweep may try is over "
                            f"{budget:g} ms on {cfg.sweep.latency.backend} ({slowest})")
    return kept


def front(rows: list[dict], metric: str) -> list[dict]:
    """The trials no other trial beats on both lower latency and higher `metric`, fastest first."""
    from ..core.fronts import pareto_front

    scored = [r for r in rows if r.get("latency_ms") is not None and r.get(metric) is not None]
    idx = pareto_front([(r["latency_ms"], r[metric]) for r in scored])
    return sorted((scored[i] for i in idx), key=lambda r: r["latency_ms"])


def plot(rows: list[dict], on_front: list[dict], metric: str, backend: str, path: Path) -> None:
    """The trials' accuracy against latency, the front drawn through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    scored = [r for r in rows if r.get("latency_ms") is not None and r.get(metric) is not None]
    ax.scatter([r["latency_ms"] for r in scored], [r[metric] for r in scored], color="0.5", label="trials")
    ax.plot([r["latency_ms"] for r in on_front], [r[metric] for r in on_front], "o-", color="tab:red",
            label="Pareto front")
    for r in scored:
        ax.annotate(r["values"].get("model.variant", r["trial"]), (r["latency_ms"], r[metric]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=f"latency on {backend} (ms, batch 1)", ylabel=metric, title="Sweep: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
