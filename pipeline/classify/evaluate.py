"""The `evaluate` stage: the fused (deployment-form) model on the validation split.

Writes `metrics/evaluate.json` (for `dvc metrics` / `dvc exp show`) and
`artifacts/evaluate/` (per-class accuracy, confusion matrix image, manifest).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from iformer.models import build_model, count_params, fused_copy, gmacs

from ..config import Config
from ..core import checkpoint, layout
from ..core.outputs import Outputs
from ..tracking.runs import StageRun
from .datasets import ImageListDataset, Prepared, build_transforms

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    prepared: Prepared
    weights: dict
    weights_path: Path


def check(cfg: Config, root: Path) -> Inputs:
    prepared = Prepared.load(layout.stage_dir("prepare", root))
    path, weights = checkpoint.pretrain_weights(root, classes=prepared.classes)
    return Inputs(prepared, weights, path)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    logits, targets = [], []
    start, seen, total = time.perf_counter(), 0, len(loader.dataset)
    for i, (images, y) in enumerate(loader):
        logits.append(model(images).float())
        targets.append(y)
        seen += len(y)
        if (i + 1) % 10 == 0 or seen == total:
            log.info("evaluated %d/%d images (%.0f img/s)", seen, total, seen / (time.perf_counter() - start))
    return torch.cat(logits), torch.cat(targets)


def summarize(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    k = min(5, num_classes)
    top = logits.topk(k, dim=1).indices
    pred = top[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (targets.numpy(), pred.numpy()), 1)
    support = confusion.sum(axis=1)
    per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    return {
        "top1": float((pred == targets).float().mean()),
        "top5": float(top.eq(targets[:, None]).any(dim=1).float().mean()),
        "loss": float(F.cross_entropy(logits, targets)),
        "num_images": int(targets.numel()),
        "per_class": per_class,
        "confusion": confusion,
    }


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(4 + 0.5 * n, 14), min(3.5 + 0.5 * n, 13)))
    norm = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90 if n > 12 else 0)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised colour, counts)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def params_with_imagenet_head(variant: str) -> int:
    """Parameters of `variant` as the official code builds it for ImageNet (1000 classes, unfused):
    what the paper's Params column counts, for the report's note on a head of another width."""
    with torch.device("meta"):  # shapes only
        return count_params(build_model(variant, 1000))


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    model = checkpoint.build_from_weights(inputs.weights)
    fused = fused_copy(model)
    ds = ImageListDataset(inputs.prepared, "val", build_transforms(cfg, training=False))
    loader = DataLoader(ds, batch_size=cfg.evaluate.batch_size, shuffle=False,
                        num_workers=cfg.data.loader_workers)
    logits, targets = predict(fused, loader)
    s = summarize(logits, targets, inputs.prepared.num_classes)
    with torch.no_grad():  # the fused network must compute what the trained one does
        probe = next(iter(loader))[0][:8]
        fuse_diff = float((model(probe) - fused(probe)).abs().max())
    metrics = {
        "top1": s["top1"], "top5": s["top5"], "loss": s["loss"], "num_images": s["num_images"],
        "params_m": count_params(fused) / 1e6,
        "params_m_1000_classes": params_with_imagenet_head(inputs.weights["variant"]) / 1e6,
        "gmacs_224": gmacs(fused, 224),
        "fuse_max_abs_diff": fuse_diff,
    }
    outputs = Outputs.begin("evaluate", root)
    out = outputs.dir
    classes = inputs.prepared.classes
    per_class = {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, s["per_class"])}
    (out / "per_class_accuracy.json").write_text(json.dumps(per_class, indent=2) + "\n")
    np.savetxt(out / "confusion_matrix.csv", s["confusion"], fmt="%d", delimiter=",")
    plot_confusion(s["confusion"], classes, out / "confusion_matrix.png")
    mpath = outputs.metrics(metrics)

    # One name per quantity: `top1` here, in metrics/evaluate.json and on the parent run.
    mlflow.log_metrics(metrics)
    srun.log_headline({k: metrics[k] for k in ("top1", "top5", "params_m", "gmacs_224")})
    mlflow.log_artifacts(str(out), "evaluate")
    mlflow.log_text(mpath.read_text(), "metrics/evaluate.json")
    source = inputs.weights.get("source")
    mlflow.set_tags(checkpoint.source_tags(source))
    outputs.manifest(srun, metrics=metrics, weights_sha256=checkpoint.sha256(inputs.weights_path),
                     weights_source=source)
    outputs.commit()
    log.info("fused %s: top1 %.4f top5 %.4f loss %.4f on %d images (fuse diff %.2e); weights: %s",
             inputs.weights["variant"], metrics["top1"], metrics["top5"], metrics["loss"], metrics["num_images"],
             fuse_diff, checkpoint.describe_source(source))
