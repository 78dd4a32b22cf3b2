"""The `prepare` stage: list (or, by default, make) the image data set.

Two sources, one output shape (`SOURCES`: one entry per `data.source`). `prepare` writes into `artifacts/prepare/`:
  - `manifest.json`: class names, per-split counts, bad-image report and a
    fingerprint of the file listing (later stages depend on this directory, so
    DVC never rehashes a 1.28 M-file ImageNet tree on each `dvc repro`);
  - `train.tsv`, `val.tsv`: `relative/path<TAB>class_index`, the exact samples;
  - `images/` (embedded default only): the digits data set as PNG files.
What training reads back is `classify.datasets.Prepared`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..core import integrity
from ..errors import PipelineError
from .datasets import check_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val")


@dataclass
class Listing:
    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    bad: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""


def _scan_class_dirs(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise PipelineError(f"data.root: {split_dir} is missing (expected <root>/train/<class>/* and <root>/val/<class>/*)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise PipelineError(f"data.root: {split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    return classes


def _files(class_dir: Path) -> list[tuple[str, int, int]]:
    """Image files below one class folder (recursively, following links): sorted (path, size, mtime).

    A folder reached twice (a symlink loop, or two links to one folder) and a
    link to nothing are errors naming the path: both mean the tree is not what
    its owner thinks it is.
    """
    stack, out, seen = [class_dir], [], set()
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError as err:
            raise PipelineError(f"data.root: {d}: {err.strerror or err} (a symlink loop?)") from None
        if (st.st_dev, st.st_ino) in seen:
            raise PipelineError(f"data.root: {d} leads to a folder already listed (a symlink loop or a duplicate link)")
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=True):
                        stack.append(Path(e.path))
                    elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                        est = e.stat()
                        out.append((e.path, est.st_size, est.st_mtime_ns))
                except FileNotFoundError:
                    raise PipelineError(f"data.root: {e.path} is a link to nothing ({os.readlink(e.path)!r})") from None
                except OSError as err:
                    raise PipelineError(f"data.root: {e.path}: {err.strerror or err} (a symlink loop?)") from None
    return sorted(out)


def list_imagefolder(root: Path, verify: str, max_bad_fraction: float) -> Listing:
    root = Path(root).expanduser()
    if not root.exists():
        raise PipelineError(f"data.root: {root} does not exist")
    if not root.is_dir():
        raise PipelineError(f"data.root: {root} is not a directory")
    train_classes = _scan_class_dirs(root / "train")
    val_classes = _scan_class_dirs(root / "val")
    extra = sorted(set(val_classes) - set(train_classes))
    if extra:
        raise PipelineError(
            f"data.root: {root / 'val'} has classes that train does not: {', '.join(extra[:5])}"
            + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        )
    index = {c: i for i, c in enumerate(train_classes)}
    digest = hashlib.sha256()
    samples: dict[str, list[tuple[str, int]]] = {}
    bad: list[tuple[str, str]] = []
    total = 0
    unlistable: list[str] = []
    for split, classes in (("train", train_classes), ("val", val_classes)):
        rows = []
        for c in classes:
            for path, size, mtime in _files(root / split / c):
                rel = os.path.relpath(path, root)
                if any(ch in rel for ch in "\t\n\r"):
                    unlistable.append(rel)  # would break the one-sample-per-line listing
                    continue
                digest.update(f"{rel}\t{size}\t{mtime}\n".encode())
                total += 1
                reason = check_image(Path(path), verify)
                if reason:
                    bad.append((rel, reason))
                else:
                    rows.append((rel, index[c]))
        if unlistable:
            raise PipelineError(f"data.root: {len(unlistable)} file names contain a tab or line break "
                                f"(first: {unlistable[0]!r}); rename them")
        if not rows:
            raise PipelineError(f"data.root: {root / split} has no readable images")
        samples[split] = rows
    if total and len(bad) / total > max_bad_fraction:
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:3])
        raise PipelineError(
            f"data.root: {len(bad)} of {total} images are unreadable "
            f"({len(bad) / total:.1%} > data.max_bad_fraction {max_bad_fraction:.1%}); first: {shown}"
        )
    return Listing(root, train_classes, samples, bad, digest.hexdigest()[:16])


def make_digits(out_dir: Path, image_size: int, val_fraction: float, seed: int) -> Listing:
    """Write scikit-learn's bundled digits (1,797 real 8x8 scans) as PNGs, upsampled."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # ships inside scikit-learn: no network
    idx = np.arange(len(digits.target))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    classes = [str(c) for c in range(10)]
    root = out_dir / "images"
    digest = hashlib.sha256()
    samples: dict[str, list[tuple[str, int]]] = {}
    for split, ids in (("train", tr), ("val", va)):
        rows = []
        for i in sorted(ids):
            label = int(digits.target[i])
            rel = f"{split}/{label}/{i:04d}.png"
            pixels = (digits.images[i] / 16.0 * 255.0).round().astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BICUBIC)
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            img.save(root / rel)
            digest.update(f"{rel}\t{pixels.tobytes().hex()}\n".encode())
            rows.append((rel, label))
        samples[split] = rows
    return Listing(root, classes, samples, [], digest.hexdigest()[:16])


def write_listing(listing: Listing, out_dir: Path, source: str, relative_root: bool) -> dict:
    for split, rows in listing.samples.items():
        with open(out_dir / f"{split}.tsv", "w") as f:
            f.writelines(f"{rel}\t{label}\n" for rel, label in rows)
    manifest = {
        "source": source,
        # digits images live inside the output directory; a real root is absolute.
        "root": "images" if relative_root else str(listing.root),
        "classes": listing.classes,
        "num_classes": len(listing.classes),
        "counts": {split: len(rows) for split, rows in listing.samples.items()},
        "bad_images": {"count": len(listing.bad), "first": [p for p, _ in listing.bad[:10]]},
        "fingerprint": listing.fingerprint,
        # what the stages after this one verify before reading (`Prepared.load`)
        "listing_sha256": {split: integrity.sha256(out_dir / f"{split}.tsv") for split in listing.samples},
        **({"images_sha256": integrity.tree_sha256(listing.root)} if relative_root else {}),
    }
    return manifest


# -- the sources: one entry per `data.source` -----------------------------------
def _check_imagefolder(d) -> None:
    data_root = Path(d.root).expanduser()
    if not data_root.is_dir():
        raise PipelineError(f"data.root: {data_root} does not exist or is not a directory")
    _scan_class_dirs(data_root / "train")
    _scan_class_dirs(data_root / "val")


@dataclass(frozen=True)
class Source:
    """A data source: what `check` verifies before any run, and how `run` lists it into `out`."""

    check: Callable[[object], None]  # (the `data` section) -> None, or PipelineError
    listing: Callable[[object, Path], Listing]  # (the `data` section, the output dir) -> Listing
    inside_outputs: bool  # its images are written under the output dir (the manifest's root is relative)


#: `data.source` names one of these (a test keeps `pipeline.config`'s list in step).
SOURCES: dict[str, Source] = {
    "digits": Source(lambda d: None, lambda d, out: make_digits(out, d.image_size, d.val_fraction, d.split_seed),
                     inside_outputs=True),
    "imagefolder": Source(_check_imagefolder,
                          lambda d, out: list_imagefolder(Path(d.root), d.verify, d.max_bad_fraction),
                          inside_outputs=False),
}


# -- the stage -----------------------------------------------------------------
def check_prepare(cfg, root: Path) -> None:
    SOURCES[cfg.data.source].check(cfg.data)


def run_prepare(cfg, root: Path, _inputs, srun) -> None:
    import mlflow

    from ..core.outputs import Outputs

    outputs = Outputs.begin("prepare", root)
    out = outputs.dir
    d = cfg.data
    source = SOURCES[d.source]
    listing = source.listing(d, out)
    manifest = write_listing(listing, out, d.source, relative_root=source.inside_outputs)
    if listing.bad:
        log.warning("skipped %d unreadable images; first: %s", len(listing.bad),
                    "; ".join(f"{p} ({r})" for p, r in listing.bad[:5]))
    log.info("%s: %d classes, %d train / %d val images, fingerprint %s", d.source,
             manifest["num_classes"], manifest["counts"]["train"], manifest["counts"]["val"],
             manifest["fingerprint"])
    mlflow.log_metrics({"num_classes": manifest["num_classes"], "train_images": manifest["counts"]["train"],
                        "val_images": manifest["counts"]["val"], "bad_images": len(listing.bad)})
    mlflow.set_tag("iformer.data_fingerprint", manifest["fingerprint"])
    mlflow.log_dict(manifest, "prepare/manifest.json")
    if listing.bad:
        mlflow.log_text("".join(f"{p}\t{r}\n" for p, r in listing.bad), "prepare/bad_images.tsv")
    for split in SPLITS:
        mlflow.log_artifact(str(out / f"{split}.tsv"), "prepare")
    outputs.manifest(srun, **manifest)
    outputs.commit()
