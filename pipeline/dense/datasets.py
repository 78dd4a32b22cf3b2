"""Validation of the dense data layouts, before any training starts.

COCO layout under a root: `annotations/instances_{train,val}2017.json` and the
images in `{train,val}2017/`. ADE20K layout: `images/{training,validation}/*.jpg`
with `annotations/{training,validation}/*.png` label maps of the same name.

Broken data raises `PipelineError` naming the file (and annotation, image or
value) at fault: every field the stages read is type- and value-checked (ids
integers, sizes positive integers, boxes and polygon coordinates finite numbers,
`file_name` a file under its split folder, `..` resolved), and every image is
decoded (`verify: decode`, as the classification `prepare` does) or its header
checked (`header`). What mmdet itself skips by standard -- crowd regions, empty
boxes, annotations without a valid polygon (fewer than 3 points), training
images without objects -- is counted and reported instead.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ..core import integrity
from ..core import layout
from ..errors import PipelineError

COCO_SPLITS = ("train2017", "val2017")
ADE_SPLITS = ("training", "validation")
IGNORE = 255
EDGE_TOLERANCE = 1.0  # pixels a box or polygon may stick out of its image (rounding)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (not a bool, a string or NaN)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_picture(path: Path, img: dict | None, verify: str, where: str) -> None:
    """The image decodes (`verify`: decode; header: PIL's `verify()`) and, for a COCO entry `img`, has the
    size it records."""
    if verify == "none":
        return
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify() if verify == "header" else im.load()
    except Exception as err:  # PIL raises many types for a broken file
        raise PipelineError(f"{where}: {path} is not a readable image ({type(err).__name__}: {str(err)[:140]})") \
            from None
    if img is not None and size != (img["width"], img["height"]):
        raise PipelineError(f"{where}: image {img['id']} ({path.name}) is {size[0]}x{size[1]}, "
                            f"but its entry says {img['width']}x{img['height']}")


def coco_annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def _load_coco(path: Path, field: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{field}: {path} does not exist (expected a COCO instances file)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{field}: {path} is not JSON ({err})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise PipelineError(f"{field}: {path} is not a COCO instances file (no '{key}' list)")
    return data


def _categories(data: dict, path: Path, field: str) -> dict[int, str]:
    cats: dict[int, str] = {}
    for c in data["categories"]:
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0 or not isinstance(c.get("name"), str):
            raise PipelineError(f"{field}: {path}: category {c!r} needs an integer id >= 0 and a name")
        if cid in cats:
            raise PipelineError(f"{field}: {path}: category id {cid} appears twice")
        cats[cid] = c["name"]
    if not cats:
        raise PipelineError(f"{field}: {path}: 'categories' is empty")
    return cats


def _check_segmentation(seg, ann_id: int, img: dict, path: Path, field: str) -> bool:
    """True if the annotation has a usable mask; raises on masks outside the image."""
    w, h = img["width"], img["height"]
    if isinstance(seg, dict):
        counts = seg.get("counts")
        if not (isinstance(counts, str) or isinstance(counts, list) and all(_is_int(c) for c in counts)):
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has RLE counts {counts!r:.40}, "
                                "neither a string nor a list of integers")
        if not isinstance(seg.get("size", []), list) or list(seg.get("size", [])) != [h, w]:
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has an RLE mask of size "
                                f"{seg.get('size')}, but image {img['id']} is {h}x{w}")
        return True
    if not isinstance(seg, list):
        raise PipelineError(f"{field}: {path}: annotation {ann_id} has a segmentation that is neither polygons nor RLE")
    bad = next((p for p in seg if not isinstance(p, list) or not all(_is_number(v) for v in p)), None)
    if bad is not None:
        raise PipelineError(f"{field}: {path}: annotation {ann_id} has a polygon {bad!r:.60} whose coordinates "
                            "are not all finite numbers")
    usable = [p for p in seg if isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6]
    for poly in usable:
        xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
        if (xs.min() < -EDGE_TOLERANCE or ys.min() < -EDGE_TOLERANCE
                or xs.max() > w + EDGE_TOLERANCE or ys.max() > h + EDGE_TOLERANCE):
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has a polygon outside its "
                                f"{w}x{h} image {img['id']} (x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g})")
    return bool(usable)


def check_coco_split(root: Path, split: str, field: str, categories: dict[int, str] | None = None,
                     verify: str = "decode") -> dict:
    """Validate one split (images checked as `verify` says); returns counts (images, instances, skipped by
    reason) and categories."""
    root = Path(root)
    path = coco_annotation_file(root, split)
    data = _load_coco(path, field)
    cats = _categories(data, path, field)
    if categories is not None and cats != categories:
        raise PipelineError(f"{field}: {path}: categories differ from the training split's "
                            f"({len(cats)} vs {len(categories)}; ids {sorted(set(cats) ^ set(categories))[:5]} differ)")
    images: dict[int, dict] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "width", "height")):
            raise PipelineError(f"{field}: {path}: image entry {img!r:.80} lacks id/file_name/width/height")
        if not _is_int(img["id"]):
            raise PipelineError(f"{field}: {path}: image id {img['id']!r:.40} is not an integer")
        if img["id"] in images:
            raise PipelineError(f"{field}: {path}: image id {img['id']} appears twice")
        w, h = img["width"], img["height"]
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            raise PipelineError(f"{field}: {path}: image {img['id']} has width {w!r:.20} and height {h!r:.20}, "
                                "not positive integers")
        name = img["file_name"]
        if not isinstance(name, str) or not name or not layout.inside(root / split / name, root / split):
            raise PipelineError(f"{field}: {path}: image {img['id']} has file_name {name!r:.80}, not a file "
                                f"under {root / split}")
        images[img["id"]] = img
    if not images:
        raise PipelineError(f"{field}: {path} lists no images")
    missing = [img["file_name"] for img in images.values() if not (root / split / img["file_name"]).is_file()]
    if missing:
        raise PipelineError(f"{field}: {len(missing)} of {len(images)} images listed in {path} are missing "
                            f"from {root / split}; first: {missing[0]}")
    for img in images.values():
        _check_picture(root / split / img["file_name"], img, verify, f"{field}: {path}")
    skipped: Counter = Counter()
    with_objects: set = set()
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not _is_int(ann_id):
            raise PipelineError(f"{field}: {path}: annotation {ann!r:.80} has no integer id")
        for key in ("image_id", "category_id"):
            if not _is_int(ann.get(key)):
                raise PipelineError(f"{field}: {path}: annotation {ann_id} has {key} {ann.get(key)!r:.40}, "
                                    "not an integer")
        if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), bool):
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has iscrowd {ann.get('iscrowd')!r:.20}, "
                                "not 0 or 1")
        img = images.get(ann.get("image_id"))
        if img is None:
            raise PipelineError(f"{field}: {path}: annotation {ann_id} refers to image {ann.get('image_id')}, "
                                "which 'images' does not list")
        if ann.get("category_id") not in cats:
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has category_id {ann.get('category_id')}, "
                                f"absent from 'categories' (ids {min(cats)}..{max(cats)})")
        if ann.get("iscrowd", 0):
            skipped["crowd"] += 1
            continue
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has bbox {box!r:.80}, not [x, y, w, h] "
                                "of finite numbers")
        if "area" in ann and not _is_number(ann["area"]):
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has area {ann['area']!r:.20}, "
                                "not a finite number")
        x, y, bw, bh = box
        if bw < 1 or bh < 1 or ann.get("area", 1) <= 0:
            skipped["empty"] += 1
            continue
        if x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE or x + bw > img["width"] + EDGE_TOLERANCE \
                or y + bh > img["height"] + EDGE_TOLERANCE:
            raise PipelineError(f"{field}: {path}: annotation {ann_id} has bbox {box} outside its "
                                f"{img['width']}x{img['height']} image {img['id']}")
        if "segmentation" in ann and not _check_segmentation(ann["segmentation"], ann_id, img, path, field):
            skipped["invalid_polygon"] += 1
            continue
        with_objects.add(img["id"])
    instances = len(data["annotations"]) - sum(skipped.values())
    return {"file": str(path.relative_to(root)), "sha256": integrity.sha256(path), "images": len(images),
            "instances": instances,
            "images_without_objects": len(images) - len(with_objects), "skipped": dict(skipped),
            "categories": cats}


def check_coco(root: Path, field: str, verify: str = "decode") -> dict:
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{field}: {root} does not exist or is not a directory")
    train = check_coco_split(root, COCO_SPLITS[0], field, verify=verify)
    val = check_coco_split(root, COCO_SPLITS[1], field, train["categories"], verify)
    if train["instances"] == 0:
        raise PipelineError(f"{field}: {train['file']} has no usable annotations")
    classes = [train["categories"][k] for k in sorted(train["categories"])]
    for split in (train, val):
        del split["categories"]
    return {"classes": classes, "splits": {"train": train, "val": val}}


def ade_pairs(root: Path, split: str, field: str) -> list[tuple[Path, Path]]:
    img_dir, ann_dir = Path(root) / "images" / split, Path(root) / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise PipelineError(f"{field}: {d} is missing (expected images/{split}/*.jpg and annotations/{split}/*.png)")
    images = {p.stem: p for p in img_dir.glob("*.jpg")}
    labels = {p.stem: p for p in ann_dir.glob("*.png")}
    if not images and not labels:
        raise PipelineError(f"{field}: {img_dir} and {ann_dir} hold no .jpg / .png files")
    for have, lack, what in ((images, labels, ann_dir / "<name>.png"), (labels, images, img_dir / "<name>.jpg")):
        unmatched = sorted(set(have) - set(lack))
        if unmatched:
            raise PipelineError(f"{field}: {len(unmatched)} files in {have[unmatched[0]].parent} have no partner "
                                f"{what}; first: {have[unmatched[0]].name}")
    return [(images[k], labels[k]) for k in sorted(images)]


def check_label_map(image: Path, label: Path, num_classes: int, field: str, verify: str = "decode") -> np.ndarray:
    """Pixel counts per raw value of one label map; raises on a bad map or image (checked as `verify` says)."""
    _check_picture(image, None, verify, field)
    try:
        with Image.open(image) as im:
            size = im.size
        with Image.open(label) as lm:
            if lm.mode not in ("L", "P"):
                raise PipelineError(f"{field}: {label} is a {lm.mode} image, not a single-channel label map")
            values = np.asarray(lm)
    except PipelineError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise PipelineError(f"{field}: {label} or {image.name} is unreadable ({type(err).__name__}: {err})") from None
    if values.shape[::-1] != size:
        raise PipelineError(f"{field}: {label} is {values.shape[1]}x{values.shape[0]}, "
                            f"but {image.name} is {size[0]}x{size[1]}")
    counts = np.bincount(values.ravel(), minlength=256)
    bad = [int(v) for v in np.nonzero(counts)[0] if num_classes < v != IGNORE]
    if bad:
        raise PipelineError(f"{field}: {label} has label values {bad[:5]} outside 0..{num_classes} "
                            f"(0 = unlabelled, {IGNORE} = ignore)")
    return counts


def check_ade(root: Path, num_classes: int, field: str, verify: str = "decode") -> dict:
    """Validate both splits; `num_classes` excludes the unlabelled value 0 (reduce-zero-label)."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{field}: {root} does not exist or is not a directory")
    splits = {}
    for name, split in zip(("train", "val"), ADE_SPLITS):
        pairs = ade_pairs(root, split, field)
        counts = sum(check_label_map(img, lab, num_classes, field, verify) for img, lab in pairs)
        splits[name] = {"images": len(pairs), "labelled_pixels": int(counts[1:num_classes + 1].sum()),
                        "unlabelled_pixels": int(counts[0] + counts[IGNORE]),
                        # pixels per class after reduce-zero-label (raw value v is class v - 1)
                        "class_pixels": [int(c) for c in counts[1:num_classes + 1]]}
    return {"splits": splits}
