"""Data: the digits default, real ImageFolder trees, odd and broken images."""
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.classify.datasets import Prepared, load_image
from pipeline.classify.prepare import check_prepare, list_imagefolder, make_digits, write_listing
from pipeline.config import Config
from pipeline.errors import PipelineError


def test_digits_are_real_stratified_and_upsampled(tmp_path):
    listing = make_digits(tmp_path, 64, 0.2, seed=0)
    assert len(listing.samples["train"]) + len(listing.samples["val"]) == 1797
    labels = [y for _, y in listing.samples["val"]]
    assert set(labels) == set(range(10)) and min(np.bincount(labels)) >= 30
    img = load_image(listing.root / listing.samples["train"][0][0])
    assert img.size == (64, 64) and img.mode == "RGB"
    again = make_digits(tmp_path / "again", 64, 0.2, seed=0)
    assert again.fingerprint == listing.fingerprint and again.samples == listing.samples
    other = make_digits(tmp_path / "other", 64, 0.2, seed=1)
    assert other.fingerprint != listing.fingerprint


def _tree(root, per_class=3, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_odd_modes_are_converted_not_crashed_on(tmp_path):
    root = _tree(tmp_path / "in")
    d = root / "train" / "cat"
    Image.new("L", (16, 16), 128).save(d / "gray.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(d / "rgba.png")
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(d / "deep16.png")
    Image.new("P", (16, 16), 3).save(d / "palette.gif")
    listing = list_imagefolder(root, "decode", max_bad_fraction=0.0)
    assert not listing.bad and len(listing.samples["train"]) == 3 * 2 + 5
    for name in ("gray.png", "rgba.png", "cmyk.jpg", "deep16.png", "palette.gif"):
        img = load_image(d / name)
        assert img.mode == "RGB" and img.size == (16, 16)
    # 16-bit values are scaled, not clipped to white: 40000/65535 of full scale.
    assert abs(int(np.asarray(load_image(d / "deep16.png"))[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
    # A transparent pixel is composited on white.
    assert tuple(np.asarray(load_image(d / "rgba.png"))[0, 0]) == (255, 255, 255)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = _tree(tmp_path / "in", per_class=10)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = root / "train" / "cat" / "0.png"
    (root / "train" / "cat" / "truncated.png").write_bytes(good.read_bytes()[:60])
    listing = list_imagefolder(root, "decode", max_bad_fraction=0.2)
    assert sorted(p for p, _ in listing.bad) == ["train/cat/truncated.png", "train/dog/broken.jpg"]
    assert all(not p.endswith(("broken.jpg", "truncated.png")) for p, _ in listing.samples["train"])
    with pytest.raises(PipelineError, match=r"2 of 42 images are unreadable .* data.max_bad_fraction"):
        list_imagefolder(root, "decode", max_bad_fraction=0.01)


def test_listing_manifest_has_counts_and_fingerprint(tmp_path):
    root = _tree(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    listing = list_imagefolder(root, "header", 0.0)
    manifest = write_listing(listing, out, "imagefolder", relative_root=False)
    manifest["mlflow_run_id"] = "x"
    (out / "manifest.json").write_text(json.dumps(manifest))
    prepared = Prepared.load(out)
    assert prepared.classes == ["cat", "dog"] and manifest["counts"] == {"train": 6, "val": 6}
    assert prepared.samples("val")[0] == ("val/cat/0.png", 0)
    (root / "train" / "cat" / "new.png").write_bytes((root / "train" / "cat" / "0.png").read_bytes())
    assert list_imagefolder(root, "header", 0.0).fingerprint != listing.fingerprint


def _cfg(root):
    return Config.model_validate({"data": {"source": "imagefolder", "root": str(root)}})


def test_bad_trees_fail_naming_the_path(tmp_path):
    with pytest.raises(PipelineError, match="data.root: .*missing.* does not exist"):
        check_prepare(_cfg(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="data.root: .*empty/train is missing"):
        check_prepare(_cfg(tmp_path / "empty"), tmp_path)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    Image.new("RGB", (4, 4)).save(flat / "train" / "a.png")
    with pytest.raises(PipelineError, match="flat/train has no class folders"):
        check_prepare(_cfg(flat), tmp_path)
    extra = _tree(tmp_path / "extra")
    (extra / "val" / "zebra").mkdir()
    Image.new("RGB", (4, 4)).save(extra / "val" / "zebra" / "z.png")
    with pytest.raises(PipelineError, match="val has classes that train does not: zebra"):
        list_imagefolder(extra, "none", 0.0)
    nofiles = _tree(tmp_path / "nofiles", per_class=0)
    with pytest.raises(PipelineError, match="nofiles/train has no readable images"):
        list_imagefolder(nofiles, "none", 0.0)


def test_both_transforms_normalise_with_imagenets_statistics():
    """ImageNet's channel mean and std (the official recipe's, as timm's defaults): what training and
    evaluation apply, and what pretrain records in the weights file for exported models."""
    from pipeline.classify.datasets import build_transforms, normalization
    from pipeline.config import load_config
    from conftest import ROOT

    want = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert normalization() == want
    cfg = load_config(ROOT / "params.yaml")
    for training in (True, False):
        norms = [t for t in build_transforms(cfg, training).transforms if type(t).__name__ == "Normalize"]
        assert len(norms) == 1, (training, build_transforms(cfg, training))
        for key in ("mean", "std"):
            assert [float(v) for v in getattr(norms[0], key)] == pytest.approx(want[key]), (training, key)


def test_paper_randaugment_survives_max_magnitude():
    """timm 1.0.31's posterize crashes on Pillow 13 at magnitude 10; we pin Pillow < 13."""
    import PIL
    from timm.data.auto_augment import rand_augment_transform

    assert int(PIL.__version__.split(".")[0]) < 13
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    # The paper's policy, then the same ops pinned at the top of (and past) the range.
    for policy in ("rand-m9-mstd0.5-inc1", "rand-m10-mstd0.5-inc1", "rand-m10-n4-mstd0-inc1"):
        t = rand_augment_transform(policy, hparams)
        for _ in range(600):
            assert t(img).size == img.size


def test_links_that_loop_or_lead_nowhere_are_named(tmp_path):
    loop = _tree(tmp_path / "loop")
    (loop / "train" / "cat" / "again").symlink_to(loop / "train")  # a folder containing itself
    with pytest.raises(PipelineError, match="data.root: .*loop/train.* symlink loop"):
        list_imagefolder(loop, "none", 0.0)
    self_link = _tree(tmp_path / "self")
    (self_link / "train" / "cat" / "me.png").symlink_to(self_link / "train" / "cat" / "me.png")
    with pytest.raises(PipelineError, match="data.root: .*me.png: Too many levels of symbolic links"):
        list_imagefolder(self_link, "none", 0.0)
    dangling = _tree(tmp_path / "dangling")
    (dangling / "val" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(PipelineError, match=r"data.root: .*gone.png is a link to nothing \('.*nowhere.png'\)"):
        list_imagefolder(dangling, "none", 0.0)


def test_names_that_would_break_the_listing_are_refused_with_a_count(tmp_path):
    root = _tree(tmp_path / "names")
    for name in ("a\nb.png", "c\td.png"):
        Image.new("RGB", (4, 4)).save(root / "train" / "cat" / name)
    with pytest.raises(PipelineError, match=r"data.root: 2 file names contain a tab or line break \(first: 'train/cat/a\\nb.png'\)"):
        list_imagefolder(root, "none", 0.0)
