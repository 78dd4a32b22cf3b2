"""Sample predictions of a fine-tuned model, drawn beside the ground truth.

Uses mmdet's / mmseg's own inference APIs and visualizers on the first `n`
validation images (ground truth left, prediction right), enlarged and captioned
(`caption`); the images go to MLflow as the stage's sample artifacts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCORE_THRESHOLD = 0.3


def _model(task: str, mm: dict, weights: Path):
    from mmengine.config import Config as MMConfig

    from .configs import register
    from .mmengine_checkpoints import allow_mmengine_checkpoints

    register()
    allow_mmengine_checkpoints()
    cfg = MMConfig(mm)
    cfg.model.backbone.pretrained = None  # the fine-tuned weights replace it
    if task == "detection":
        from mmdet.apis import init_detector

        return init_detector(cfg, str(weights), device="cpu")
    from mmseg.apis import init_model

    return init_model(cfg, str(weights), device="cpu")


def _detection(model, data: dict, n: int, out: Path) -> list[Path]:
    import mmcv
    import torch
    from mmdet.apis import inference_detector
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData

    ann = json.loads((Path(data["root"]) / "annotations" / "instances_val2017.json").read_text())
    label_of = {c["id"]: i for i, c in enumerate(sorted(ann["categories"], key=lambda c: c["id"]))}
    vis = DetLocalVisualizer(name=f"iformer-samples-{id(out)}")
    vis.dataset_meta = model.dataset_meta
    written = []
    for img in sorted(ann["images"], key=lambda i: i["id"])[:n]:
        path = Path(data["root"]) / "val2017" / img["file_name"]
        pred: DetDataSample = inference_detector(model, str(path))
        objs = [a for a in ann["annotations"] if a["image_id"] == img["id"] and not a.get("iscrowd", 0)]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objs)]
        pred.gt_instances = InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                         labels=torch.tensor([label_of[a["category_id"]] for a in objs]))
        target = out / f"{path.stem}.png"
        vis.add_datasample(path.stem, mmcv.imread(str(path), channel_order="rgb"), pred, draw_gt=True,
                           pred_score_thr=SCORE_THRESHOLD, out_file=str(target))
        written.append(target)
    return written


def _segmentation(model, data: dict, n: int, out: Path) -> list[Path]:
    import mmcv
    import torch
    from mmengine.structures import PixelData
    from mmseg.apis import inference_model
    from mmseg.visualization import SegLocalVisualizer
    from PIL import Image

    vis = SegLocalVisualizer(name=f"iformer-samples-{id(out)}", alpha=0.6)
    vis.dataset_meta = model.dataset_meta
    images = sorted((Path(data["root"]) / "images" / "validation").glob("*.jpg"))[:n]
    written = []
    for path in images:
        pred = inference_model(model, str(path))
        label = np.asarray(Image.open(Path(data["root"]) / "annotations" / "validation" / f"{path.stem}.png"))
        gt = np.where(label == 0, 255, label.astype(np.int64) - 1)  # reduce-zero-label, as in training
        pred.gt_sem_seg = PixelData(data=torch.from_numpy(gt)[None])
        target = out / f"{path.stem}.png"
        vis.add_datasample(path.stem, mmcv.imread(str(path), channel_order="rgb"), pred, draw_gt=True,
                           draw_pred=True, out_file=str(target))
        written.append(target)
    return written


#: The visualizers draw the ground truth left of the prediction.
PANELS = ("ground truth", "prediction")


def caption(path: Path, title: str, scale: int = 2) -> None:
    """Enlarge a side-by-side sample `scale` times and write over each half what it shows."""
    from PIL import Image, ImageDraw

    img = Image.open(path).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    strip = 36
    out = Image.new("RGB", (img.width, img.height + strip), "white")
    out.paste(img, (0, strip))
    draw = ImageDraw.Draw(out)
    half = img.width // len(PANELS)
    for i, text in enumerate(PANELS):
        draw.text((i * half + 6, 3), text, fill="black")
    draw.text((6, 19), title, fill="dimgray")
    out.save(path)


def warm_up(task: str) -> None:
    """What `draw_samples` imports (the registries with our types, the task's inference API and
    visualizer), readied while the stage's driver waits on training (`trainer.fit`'s `warm`)."""
    from .configs import register

    register()
    if task == "detection":
        import mmdet.apis  # noqa: F401
        import mmdet.visualization  # noqa: F401
    else:
        import mmseg.apis  # noqa: F401
        import mmseg.visualization  # noqa: F401


def draw_samples(task: str, mm: dict, weights: Path, data: dict, n: int, out: Path) -> list[Path]:
    if n == 0:
        return []
    out.mkdir(parents=True, exist_ok=True)
    model = _model(task, mm, weights)
    draw = _detection if task == "detection" else _segmentation
    written = draw(model, data, n, out)
    what = "boxes and masks, score >= %.1f" % SCORE_THRESHOLD if task == "detection" else "class per pixel"
    for path in written:
        caption(path, f"{path.stem}: {task} ({what})")
    return written
