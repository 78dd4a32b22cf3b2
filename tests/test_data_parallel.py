"""Data-parallel correctness on real Ray Train: 2 workers x batch b reach the weights of 1 worker x batch 2b.

With no random augmentation (full-image crops, no flip, jitter, RandAugment,
erasing, mixup or cutmix), no drop path and no EMA, every sample goes through
the same computation on either side. The shared sampler gives rank r positions
r, r+2, ... of one shuffled order per epoch, so the two ranks' i-th batches
together are the single worker's i-th batch, and DDP's gradient average over
two equal halves is the mean gradient of the whole batch. BatchNorm is the one
layer that mixes samples: in training mode it normalises each rank's half
with that half's statistics (the CPU has no SyncBatchNorm), so the claim holds
with `train.freeze_bn: true` (running statistics, affine part trained), and a
control run without it shows the test can tell the difference.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import TINY, deep_update, make_repo

pytestmark = pytest.mark.slow

DETERMINISTIC = {
    "data": {"image_size": 32, "val_fraction": 0.75},  # ~450 training images: 7 steps of 64 per epoch
    "aug": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "color_jitter": 0.0, "rand_augment": None,
            "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0},
    "model": {"drop_path": 0.0},
    "train": {"epochs": 2, "batch_size": 64, "ema_decay": None, "seed": 0},
    "ray": {"cpus_per_worker": 1.0, "local_num_cpus": 2, "prune_checkpoints": False},
}

#: name: (workers, freeze_bn); each its own Ray Train run in one local Ray.
RUNS = {"one": (1, True), "two": (2, True), "one_batch_bn": (1, False), "two_batch_bn": (2, False)}

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from iformer.models import build_model
    from pipeline.classify import pretrain
    from pipeline.compute import cluster
    from pipeline.config import Config, load_config
    from pipeline.classify.datasets import Prepared

    root = Path.cwd()
    base = load_config(root / "params.yaml").to_dict()
    prepared = Prepared.load(root / "artifacts/prepare")
    runs = json.loads(sys.argv[1])
    torch.manual_seed(base["train"]["seed"])  # what rank 0 starts from (DDP gives it to every rank)
    torch.save(build_model(base["model"]["variant"], prepared.num_classes).state_dict(), root / "init.pt")
    with cluster.session(Config.model_validate(base), root, "pretrain", root / "ray.log"):
        for name, (workers, freeze_bn) in runs.items():
            cfg = Config.model_validate({**base, "ray": {**base["ray"], "num_workers": workers},
                                         "train": {**base["train"], "freeze_bn": freeze_bn}})
            state = pretrain.fit(cfg, root, pretrain.Inputs(prepared, f"dp-{name}", None), None)
            torch.save(state["model"], root / f"{name}.pt")
            print(json.dumps({"name": name, "steps": state["global_step"], "epoch": state["epoch"]}))
""")


def max_abs_diff(a: dict, b: dict) -> float:
    """Over the trained tensors (BatchNorm's running statistics are buffers, not weights)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if a[k].is_floating_point() and "running_" not in k)


def test_two_workers_with_half_batches_reach_the_weights_of_one_worker(tmp_path):
    import copy

    import torch

    repo = make_repo(tmp_path / "repo", deep_update(copy.deepcopy(TINY), copy.deepcopy(DETERMINISTIC)))
    repo.stage("prepare")
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(RUNS)], cwd=repo.path, env=repo.env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    done = {row["name"]: row for row in map(json.loads, (line for line in out.stdout.splitlines()
                                                           if line.startswith("{")))}
    assert set(done) == set(RUNS) and {row["steps"] for row in done.values()} == {14}, done
    assert "rank 0/2" in out.stderr, "the 2-worker runs ran on two Ray Train workers"

    w = {name: torch.load(repo.path / f"{name}.pt", weights_only=True) for name in (*RUNS, "init")}
    moved = max_abs_diff(w["one"], w["init"])
    same = max_abs_diff(w["one"], w["two"])
    control = max_abs_diff(w["one_batch_bn"], w["two_batch_bn"])
    print(f"\nmax |w| change in 14 steps {moved:.3g}; 1x64 vs 2x32, frozen BN: {same:.3g}; "
          f"per-rank BN statistics: {control:.3g}")
    assert moved > 1e-2, "training moved the weights"
    for key in w["one"]:  # buffers too: BN running statistics stay as they were when frozen
        assert torch.allclose(w["one"][key].double(), w["two"][key].double(), rtol=1e-4, atol=1e-5), key
    assert control > 100 * max(same, 1e-7), "without frozen BN the split batch normalises differently"
