"""The `prepare_dense` stage: the detection and segmentation data, described and checked.

A stage of its own (not part of `prepare`) because its inputs are the
`detection.data` / `segmentation.data` sections: changing the classification
data does not regenerate the scenes, and the reverse. With `source: digits` it
writes the embedded scenes (`pipeline/dense/scenes.py`) under
`artifacts/prepare_dense/{coco,ade20k}`; with `coco` / `ade20k` it validates
the data under `root` (`pipeline/dense/datasets.py`) before any MLflow run and
records where it is. `manifest.json` tells the fine-tuning stages where each
data set lives, its classes, counts, skips and per-class pixel counts.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from ..core import integrity, layout
from ..core.outputs import Outputs
from ..errors import PipelineError
from ..tracking.runs import StageRun
from . import datasets, scenes

log = logging.getLogger(__name__)
STAGE = "prepare_dense"
ADE20K_CLASSES = 150


def _palette(n: int) -> list[list[int]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [[0, 0, 0]] + [[int(255 * c) for c in cmap(i % 20)[:3]] for i in range(n - 1)]


def _root(path: Path, root: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


def check(cfg: Config, root: Path) -> dict:
    """Validate user data now (exit 2 before any run); digits are validated after writing."""
    found = {}
    det, seg = cfg.detection.data, cfg.segmentation.data
    if det.source == "coco":
        found["detection"] = datasets.check_coco(_root(det.root, root), "detection.data.root", det.verify)
    if seg.source == "ade20k":
        found["segmentation"] = datasets.check_ade(_root(seg.root, root), ADE20K_CLASSES, "segmentation.data.root",
                                                   seg.verify)
    return found


def _ade20k_meta() -> tuple[list[str], list]:
    from mmseg.datasets import ADE20KDataset

    return list(ADE20KDataset.METAINFO["classes"]), [list(p) for p in ADE20KDataset.METAINFO["palette"]]


def run(cfg: Config, root: Path, found: dict, srun: StageRun) -> None:
    import mlflow

    outputs = Outputs.begin(STAGE, root)
    out = outputs.dir
    det, seg = cfg.detection.data, cfg.segmentation.data
    manifest: dict = {}
    if det.source == "digits" or seg.source == "digits":
        counts = scenes.write(out, train=det.train_scenes, val=det.val_scenes, size=det.scene_size,
                              per_scene=tuple(det.digits_per_scene), digit_size=tuple(det.digit_size), seed=det.seed)
        log.info("digit scenes: %d train / %d val (%d / %d digits), %dpx", counts["train"]["scenes"],
                 counts["val"]["scenes"], counts["train"]["instances"], counts["val"]["instances"], det.scene_size)
    if det.source == "digits":
        try:
            summary = datasets.check_coco(out / "coco", "detection.data")
        except PipelineError as err:  # the generator's own output: a bug, not bad input
            raise RuntimeError(f"generated digit scenes fail validation: {err}") from None
        manifest["detection"] = {"source": "digits", "root": "coco", **summary}
    else:
        manifest["detection"] = {"source": "coco", "root": str(_root(det.root, root)), **found["detection"]}
    if seg.source == "digits":
        summary = datasets.check_ade(out / "ade20k", len(scenes.SEG_CLASSES), "segmentation.data")
        manifest["segmentation"] = {"source": "digits", "root": "ade20k", "dataset": "BaseSegDataset",
                                    "classes": list(scenes.SEG_CLASSES),
                                    "palette": _palette(len(scenes.SEG_CLASSES)), **summary}
    else:
        classes, palette = _ade20k_meta()
        manifest["segmentation"] = {"source": "ade20k", "root": str(_root(seg.root, root)),
                                    "dataset": "ADE20KDataset", "classes": classes, "palette": palette,
                                    **found["segmentation"]}
    for task in ("detection", "segmentation"):
        entry = manifest[task]
        if entry["source"] == "digits":  # written here: the fine-tuning stages verify every file
            entry["sha256"] = integrity.tree_sha256(out / entry["root"])
        for split, numbers in entry["splits"].items():
            mlflow.log_metrics({f"{task}.{split}.{k}": v for k, v in numbers.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        skipped = {k: v for s in entry["splits"].values() for k, v in s.get("skipped", {}).items()}
        if skipped:
            log.warning("%s: skipped annotations (mmdet skips them too): %s", task, skipped)
    mlflow.log_dict(manifest, "prepare_dense/manifest.json")
    outputs.manifest(srun, **manifest)
    outputs.commit()


def load(root: Path, task: str) -> dict:
    """The prepare_dense entry of `task`, with `root` made absolute."""
    import json

    path = layout.manifest_path(STAGE, root)
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run the {STAGE} stage first (dvc repro {STAGE})")
    entry = dict(json.loads(path.read_text())[task])
    data_root = Path(entry["root"])
    entry["root"] = str(data_root if data_root.is_absolute() else path.parent / data_root)
    if Path(entry["root"]).is_dir():  # what prepare_dense recorded: the annotation files, or all it wrote
        integrity.verify(Path(entry["root"]), entry.get("sha256"), STAGE)
        for split in entry.get("splits", {}).values():
            if "file" in split:
                integrity.verify(Path(entry["root"]) / split["file"], split.get("sha256"), STAGE)
    return entry
