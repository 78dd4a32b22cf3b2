"""Dense data: the embedded digit scenes, and bad COCO / ADE20K input named clearly."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from iformer.dense.backbone import IFormerBackbone
from pipeline.core import checkpoint
from pipeline.dense import datasets, scenes
from pipeline.errors import PipelineError

FIELD = "detection.data.root"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    counts = scenes.write(out, train=6, val=4, size=64, per_scene=(1, 3), digit_size=(18, 26), seed=3)
    return out, counts


@pytest.fixture
def coco(generated, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(generated[0] / "coco", root)
    return root


@pytest.fixture
def ade(generated, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(generated[0] / "ade20k", root)
    return root


def test_scenes_are_deterministic_and_both_layouts_agree(generated, tmp_path):
    out, counts = generated
    again = scenes.write(tmp_path, train=6, val=4, size=64, per_scene=(1, 3), digit_size=(18, 26), seed=3)
    assert again == counts and counts["train"]["instances"] >= 6
    for rel in ("coco/annotations/instances_val2017.json", "ade20k/annotations/validation/000002.png"):
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes()
    from pycocotools import mask as mask_utils

    ann = json.loads((out / "coco/annotations/instances_val2017.json").read_text())
    for img in ann["images"]:
        labels = np.asarray(Image.open(out / "ade20k/annotations/validation" / img["file_name"].replace(".jpg", ".png")))
        painted = np.ones_like(labels)
        for a in (a for a in ann["annotations"] if a["image_id"] == img["id"]):
            mask = mask_utils.decode(a["segmentation"]).astype(bool)
            ys, xs = np.nonzero(mask)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert a["area"] == mask.sum()
            painted[mask] = a["category_id"] + 1  # category id d+1 <-> label value d+2
        np.testing.assert_array_equal(painted, labels)
    summary = datasets.check_coco(out / "coco", FIELD)
    assert summary["classes"] == list(scenes.DIGIT_CLASSES)
    assert summary["splits"]["val"]["skipped"] == {} and summary["splits"]["val"]["instances"] == counts["val"]["instances"]
    seg = datasets.check_ade(out / "ade20k", len(scenes.SEG_CLASSES), "segmentation.data.root")
    assert seg["splits"]["val"]["images"] == 4 and sum(seg["splits"]["val"]["class_pixels"]) == 4 * 64 * 64


def _edit(root, split, change):
    path = datasets.coco_annotation_file(root, split)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _first_ann(data):
    return data["annotations"][0]


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.pop("annotations"), "is not a COCO instances file (no 'annotations' list)"),
    (lambda d: _first_ann(d).update(category_id=42), "has category_id 42, absent from 'categories'"),
    (lambda d: d["categories"].append(dict(d["categories"][0])), "category id 1 appears twice"),
    (lambda d: d["categories"].append({"id": "x", "name": "x"}), "needs an integer id"),
    (lambda d: _first_ann(d).update(image_id=999), "refers to image 999"),
    (lambda d: _first_ann(d).update(segmentation=[[1, 1, 90, 1, 90, 9]]), "has a polygon outside its 64x64 image"),
    (lambda d: _first_ann(d).update(bbox=[50, 50, 30, 30]), "has bbox [50, 50, 30, 30] outside"),
    (lambda d: _first_ann(d)["segmentation"].update(size=[32, 32]), "has an RLE mask of size [32, 32]"),
    (lambda d: d["images"].append({"id": 77, "file_name": "nowhere.jpg", "width": 64, "height": 64}),
     "1 of 7 images listed in"),
])
def test_broken_coco_names_file_and_culprit(coco, change, needle):
    path = _edit(coco, "train2017", change)
    with pytest.raises(PipelineError) as err:
        datasets.check_coco(coco, FIELD)
    msg = str(err.value)
    assert msg.startswith(f"{FIELD}: ") and needle in msg and "\n" not in msg
    assert str(path) in msg or "nowhere.jpg" in msg


def test_missing_or_unreadable_annotation_files(coco):
    datasets.coco_annotation_file(coco, "val2017").write_text("{not json")
    with pytest.raises(PipelineError, match=r"instances_val2017.json is not JSON"):
        datasets.check_coco(coco, FIELD)
    datasets.coco_annotation_file(coco, "val2017").unlink()
    with pytest.raises(PipelineError, match=r"instances_val2017.json does not exist"):
        datasets.check_coco(coco, FIELD)


def test_val_categories_must_match_train(coco):
    _edit(coco, "val2017", lambda d: d["categories"].pop())
    with pytest.raises(PipelineError, match="categories differ from the training split's"):
        datasets.check_coco(coco, FIELD)


def test_crowd_empty_and_degenerate_annotations_are_counted_skips(coco):
    def change(d):
        a, b, c = d["annotations"][:3]
        a["iscrowd"] = 1
        b["bbox"] = [3, 3, 0, 5]
        c["segmentation"] = [[1, 1, 5, 5]]  # two points: not a polygon
    _edit(coco, "train2017", change)
    summary = datasets.check_coco(coco, FIELD)["splits"]["train"]
    assert summary["skipped"] == {"crowd": 1, "empty": 1, "invalid_polygon": 1}


def test_broken_ade_names_file_and_culprit(ade):
    field = "segmentation.data.root"
    n = len(scenes.SEG_CLASSES)
    label = ade / "annotations/training/000001.png"
    original = label.read_bytes()
    values = np.asarray(Image.open(label)).copy()
    values[0, 0] = 255  # ignore is fine
    Image.fromarray(values).save(label)
    datasets.check_ade(ade, n, field)
    values[0, 1] = 40
    Image.fromarray(values).save(label)
    with pytest.raises(PipelineError, match=rf"{label} has label values \[40\] outside 0..{n}"):
        datasets.check_ade(ade, n, field)
    Image.fromarray(np.stack([values] * 3, -1)).save(label)
    with pytest.raises(PipelineError, match="is a RGB image, not a single-channel label map"):
        datasets.check_ade(ade, n, field)
    Image.fromarray(values[:32]).save(label)
    with pytest.raises(PipelineError, match="000001.png is 64x32, but 000001.jpg is 64x64"):
        datasets.check_ade(ade, n, field)
    label.unlink()
    with pytest.raises(PipelineError, match=r"1 files in .*images/training have no partner .*: 000001.jpg"):
        datasets.check_ade(ade, n, field)
    label.write_bytes(original)
    datasets.check_ade(ade, n, field)
    shutil.rmtree(ade / "annotations/validation")
    with pytest.raises(PipelineError, match="annotations/validation is missing"):
        datasets.check_ade(ade, n, field)


# -- at the stage command line: exit 2, one line, no MLflow run -------------------------------------
@pytest.fixture(scope="module")
def dense_repo(tmp_path_factory):
    from conftest import make_repo

    return make_repo(tmp_path_factory.mktemp("dense") / "repo")


def test_prepare_dense_rejects_broken_coco_before_any_run(dense_repo, coco):
    _edit(coco, "val2017", lambda d: _first_ann(d).update(category_id=0))
    dense_repo.set_params({"detection": {"data": {"source": "coco", "root": str(coco)}}})
    try:
        dense_repo.stage_error("prepare_dense", "detection.data.root: ")
    finally:
        dense_repo.set_params({"detection": {"data": {"source": "digits", "root": None}}})
    assert not (dense_repo.path / "artifacts/prepare_dense").exists()
    assert dense_repo.runs() == []


def test_finetune_needs_its_inputs(dense_repo):
    from pipeline.config import load_config
    from pipeline.dense import finetune

    dense_repo.stage_error("finetune_coco", "run the prepare_dense stage first")  # the stage's contract, once
    dense_repo.stage("prepare_dense")

    def refused(*needles: str) -> None:  # the stage's own check, in-process (a stage start is ~6 s)
        with pytest.raises(PipelineError) as err:
            finetune.check_stage("finetune_ade20k")(load_config(dense_repo.path / "params.yaml"), dense_repo.path)
        assert all(needle in str(err.value) for needle in needles), str(err.value)

    refused("segmentation.backbone.checkpoint: ")  # no pretrain weights yet
    outside = dense_repo.path / "iformer_s.pth"
    torch.save({"model": IFormerBackbone("iformer_s").state_dict()}, outside)
    dense_repo.set_params({"segmentation": {"backbone": {"checkpoint": str(outside)}}})
    refused("so DVC would not see it change; copy or link it into weights/")
    (dense_repo.path / "weights/iformer_s.pth").symlink_to(outside)
    dense_repo.set_params({"segmentation": {"backbone": {"checkpoint": "weights/iformer_s.pth"}}})
    refused("is not an iformer_t checkpoint", "segmentation.backbone.checkpoint")
    weights = dense_repo.path / "artifacts/pretrain/model.pt"
    checkpoint.save_weights(weights, IFormerBackbone("iformer_s").state_dict(), variant="iformer_s", num_classes=10,
                            distillation=False, classes=list("0123456789"), image_size=64, mean=(0,) * 3, std=(1,) * 3)
    dense_repo.set_params({"segmentation": {"backbone": {"checkpoint": "artifacts/pretrain/model.pt"}}})
    refused("holds iformer_s, but model.variant is iformer_t")
    assert not (dense_repo.path / "artifacts/finetune_ade20k").exists()
