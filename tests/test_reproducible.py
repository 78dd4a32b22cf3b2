"""The default run is reproducible, and the README quotes what it reproduces.

Same seed, machine and thread count: pretrain gives the same weights bit for
bit (Python's `random` draws timm's crops and erasing, numpy the mixup, torch
the rest; all seeded per worker). The README's figures are the committed
baseline's (`metrics/*.json`), so re-recording the baseline fails this test
until the README says the same.
"""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
from conftest import ROOT, TINY, deep_update, make_repo


def baseline_sentence(root: Path = ROOT) -> str:
    """The README's sentence quoting the committed baseline, from `metrics/*.json` (report units)."""
    ev = json.loads((root / "metrics/evaluate.json").read_text())
    coco = json.loads((root / "metrics/finetune_coco.json").read_text())
    ade = json.loads((root / "metrics/finetune_ade20k.json").read_text())
    return (f"top-1 {100 * ev['top1']:.2f} %, box AP {100 * coco['bbox_ap']:.1f}, mask AP {100 * coco['segm_ap']:.1f}, "
            f"mIoU {ade['miou']:.2f} (predicting background everywhere: {ade['miou_majority_baseline']:.2f})")


def test_the_readme_quotes_the_committed_baseline():
    readme = (ROOT / "README.md").read_text()
    expected = baseline_sentence()
    assert expected in readme, f"README.md should quote the committed metrics/: {expected!r}"


#: history.csv columns that measure time, not learning.
TIMING = ("epoch_seconds", "img_per_sec", "train_seconds", "val_seconds", "checkpoint_seconds")


def _weights(repo) -> dict:
    import torch

    return torch.load(repo.path / "artifacts/pretrain/model.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_pretrain_twice_with_one_seed_gives_the_same_weights(tmp_path):
    """Random crops, colour jitter and random erasing on, one epoch: bitwise equal, another seed is not."""
    params = deep_update(copy.deepcopy(TINY), {"train": {"epochs": 1}, "aug": {"re_prob": 0.25, "hflip": 0.5}})
    repo = make_repo(tmp_path / "repo", params)
    repo.stage("prepare")
    runs = []
    for seed in (0, 0, 1):
        repo.set_params({"train": {"seed": seed}})
        repo.stage("pretrain")
        with open(repo.path / "artifacts/pretrain/history.csv") as f:
            curves = [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]
        runs.append((_weights(repo), curves))
    (first, curves), (second, curves2), (other, _) = runs
    assert first.keys() == second.keys()
    assert all(first[k].equal(second[k]) for k in first), "the same seed, the same weights"
    assert curves == curves2 and {"train_loss", "val_loss", "val_top1"} <= set(curves[0])
    assert not all(first[k].equal(other[k]) for k in first), "another seed, other weights"
