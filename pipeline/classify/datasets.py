"""What training and evaluation read: the prepared sample lists, images as RGB, timm's transforms.

`Prepared` is the `prepare` stage's output loaded (`classify.prepare` writes it);
`ImageListDataset` yields (image, label) from one split of it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core import integrity
from ..core.outputs import read_stage_manifest
from ..errors import PipelineError


# -- loading any image as RGB -------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert grayscale, palette, alpha, CMYK, 16-bit and float images to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        if img.mode in ("I", "F") and hi <= 255 and lo >= 0:
            lo, hi = 0.0, 255.0
        scaled = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def check_image(path: Path, mode: str) -> str | None:
    """None if the image is usable under `mode`, else the reason it is not."""
    if mode == "none":
        return None
    try:
        with Image.open(path) as img:
            if mode == "header":
                img.verify()
            else:
                img.load()
                to_rgb(img)
    except Exception as err:  # PIL raises many types for bad files
        return f"{type(err).__name__}: {err}"
    return None


@dataclass
class Prepared:
    """The prepare stage's output, loaded."""

    dir: Path
    manifest: dict

    @classmethod
    def load(cls, dir: Path) -> "Prepared":
        path = Path(dir) / "manifest.json"
        if not path.is_file():
            raise PipelineError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
        prepared = cls(Path(dir), read_stage_manifest("prepare", Path(dir), path))
        # the listing (and the images the stage wrote itself) must be what it recorded
        for split, digest in prepared.manifest.get("listing_sha256", {}).items():
            integrity.verify(prepared.dir / f"{split}.tsv", digest, "prepare")
        integrity.verify(prepared.root, prepared.manifest.get("images_sha256"), "prepare")
        return prepared

    @property
    def root(self) -> Path:
        r = Path(self.manifest["root"])
        return r if r.is_absolute() else self.dir / r

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def samples(self, split: str) -> list[tuple[str, int]]:
        rows = []
        with open(self.dir / f"{split}.tsv") as f:
            for line in f:
                rel, label = line.rstrip("\n").rsplit("\t", 1)
                rows.append((rel, int(label)))
        return rows


class ImageListDataset:
    """(image, label) from a prepared sample list; any image mode comes out RGB."""

    def __init__(self, prepared: Prepared, split: str, transform=None):
        self.root = prepared.root
        self.samples = prepared.samples(split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        rel, label = self.samples[i]
        try:
            img = load_image(self.root / rel)
        except Exception as err:  # PIL raises many types; the file changed since prepare checked it
            raise PipelineError(f"{self.root / rel}: unreadable image ({type(err).__name__}: {str(err)[:160]}); "
                                "it was readable when prepare listed it: restore it, or rerun "
                                "`dvc repro --force prepare` to list only readable images") from None
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def normalization() -> dict:
    """ImageNet's channel mean and std (timm's defaults, as the official iFormer trains): what the
    transforms normalise with, and what the weights file records for an exported model to apply."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}


def build_transforms(cfg, training: bool):
    """timm's transform pipeline for the configured recipe (train or eval)."""
    from timm.data import create_transform

    a = cfg.aug
    if training:
        return create_transform(
            cfg.data.image_size,
            is_training=True,
            scale=tuple(a.scale),
            ratio=tuple(a.ratio),
            hflip=a.hflip,
            auto_augment=a.rand_augment,
            color_jitter=a.color_jitter or None,
            interpolation=a.interpolation,
            re_prob=a.re_prob,
            re_mode="pixel",
            re_count=1,
            **normalization(),
        )
    return create_transform(
        cfg.data.image_size, is_training=False, interpolation=a.interpolation, crop_pct=a.crop_pct, **normalization()
    )
