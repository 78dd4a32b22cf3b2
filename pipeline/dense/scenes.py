"""The embedded dense default: scenes composed from scikit-learn's bundled digits.

Each scene is a dark canvas with a few upscaled digit scans placed without
overlap; each digit is an instance (class = its digit, pixel mask = the scan's
bright pixels, box = the mask's extent). The same scenes are written twice:
in COCO layout (`coco/annotations/instances_{train,val}2017.json`, masks as
RLE) and in ADE20K layout (`ade20k/images/{training,validation}/*.jpg`,
`ade20k/annotations/.../*.png`, value 0 unused as in ADE20K, 1 = background,
2..11 = digits 0..9, read with reduce-zero-label). Deterministic for a seed;
no network (the digits ship inside scikit-learn, as for classification).
Validation scenes use a disjoint fifth of the scans.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_CLASSES = tuple(str(d) for d in range(10))
SEG_CLASSES = ("background", *DIGIT_CLASSES)
MASK_THRESHOLD = 64  # a pixel of an upscaled scan belongs to the digit above this value
SPLITS = {"train": ("train2017", "training"), "val": ("val2017", "validation")}


@dataclass
class Scene:
    image: np.ndarray                  # (S, S) uint8
    instances: list[tuple[int, np.ndarray]]  # (digit, bool mask (S, S))


def _scan(pixels: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray((pixels / 16.0 * 255.0).round().astype(np.uint8), mode="L")
    return np.asarray(img.resize((size, size), Image.BICUBIC))


def compose(n: int, size: int, per_scene: tuple[int, int], digit_size: tuple[int, int], seed: int,
            split: str) -> list[Scene]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pool = np.arange(len(digits.target))
    pool = pool[pool % 5 == 0] if split == "val" else pool[pool % 5 != 0]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    scenes = []
    for _ in range(n):
        canvas = rng.normal(12.0, 6.0, (size, size)).clip(0, 255)
        occupied = np.zeros((size, size), bool)
        instances = []
        for _ in range(int(rng.integers(per_scene[0], per_scene[1] + 1))):
            for _attempt in range(20):
                side = int(rng.integers(digit_size[0], digit_size[1] + 1))
                y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
                if not occupied[max(y - 2, 0):y + side + 2, max(x - 2, 0):x + side + 2].any():
                    break
            else:
                continue  # no room left in this scene
            i = int(rng.choice(pool))
            patch = _scan(digits.images[i], side).astype(np.float64) * rng.uniform(0.7, 1.0)
            mask = np.zeros((size, size), bool)
            mask[y:y + side, x:x + side] = patch > MASK_THRESHOLD
            if not mask.any():
                continue
            region = canvas[y:y + side, x:x + side]
            canvas[y:y + side, x:x + side] = np.maximum(region, patch)
            occupied[y:y + side, x:x + side] = True
            instances.append((int(digits.target[i]), mask))
        scenes.append(Scene(canvas.round().astype(np.uint8), instances))
    return scenes


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def coco_annotations(scenes: list[Scene], image_dir: str) -> dict:
    images, annotations = [], []
    for img_id, scene in enumerate(scenes, start=1):
        h, w = scene.image.shape
        images.append({"id": img_id, "file_name": f"{img_id:06d}.jpg", "height": h, "width": w})
        for digit, mask in scene.instances:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            box = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": digit + 1,
                                "bbox": box, "area": int(mask.sum()), "iscrowd": 0, "segmentation": _rle(mask)})
    categories = [{"id": i + 1, "name": name, "supercategory": "digit"} for i, name in enumerate(DIGIT_CLASSES)]
    return {"info": {"description": f"digit scenes ({image_dir})"}, "images": images,
            "annotations": annotations, "categories": categories}


def label_map(scene: Scene) -> np.ndarray:
    labels = np.ones(scene.image.shape, np.uint8)  # 1 = background (0 stays unused, ADE20K's "other")
    for digit, mask in scene.instances:
        labels[mask] = digit + 2
    return labels


def write(out: Path, *, train: int, val: int, size: int, per_scene: tuple[int, int],
          digit_size: tuple[int, int], seed: int) -> dict:
    """Write both layouts under `out/coco` and `out/ade20k`; returns per-split counts."""
    counts = {}
    for split, n in (("train", train), ("val", val)):
        coco_split, ade_split = SPLITS[split]
        scenes = compose(n, size, per_scene, digit_size, seed, split)
        coco_dir = out / "coco" / coco_split
        ade_img, ade_ann = out / "ade20k" / "images" / ade_split, out / "ade20k" / "annotations" / ade_split
        for d in (coco_dir, ade_img, ade_ann):
            d.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(scenes, start=1):
            rgb = Image.fromarray(scene.image, mode="L").convert("RGB")
            rgb.save(coco_dir / f"{i:06d}.jpg", quality=95)
            rgb.save(ade_img / f"{i:06d}.jpg", quality=95)
            Image.fromarray(label_map(scene), mode="L").save(ade_ann / f"{i:06d}.png")
        ann_dir = out / "coco" / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"instances_{coco_split}.json").write_text(json.dumps(coco_annotations(scenes, coco_split)))
        counts[split] = {"scenes": n, "instances": sum(len(s.instances) for s in scenes)}
    return counts
