"""The paper's ImageNet recipes (Table 9 + per-variant settings) as presets."""
import subprocess
import sys

import pytest
import yaml

from pipeline.errors import PipelineError
from conftest import ROOT
from pipeline.config import load_config
from pipeline.recipes import RECIPES, build

# Table 9 of the paper, per variant: drop path, layer scale, base lr, batch.
TABLE9 = {
    "t": dict(drop_path=0.0, layer_scale=0.0, base_lr=4e-3, batch=4096),
    "s": dict(drop_path=0.0, layer_scale=0.0, base_lr=4e-3, batch=4096),
    "m": dict(drop_path=0.0, layer_scale=0.0, base_lr=4e-3, batch=4096),
    "l": dict(drop_path=0.1, layer_scale=0.0, base_lr=4e-3, batch=4096),
    "h": dict(drop_path=0.6, layer_scale=1e-6, base_lr=8e-3, batch=8192),
}


@pytest.mark.parametrize("v", sorted(TABLE9))
def test_recipe_matches_table9(v):
    cfg = build(f"iformer_{v}", overrides={"data.root": "/data/imagenet"})
    want = TABLE9[v]
    assert cfg.model.variant == f"iformer_{v}"
    assert cfg.model.drop_path == want["drop_path"]
    assert cfg.model.layer_scale == want["layer_scale"]
    assert cfg.optim.base_lr == want["base_lr"] and cfg.optim.base_batch_size == want["batch"]
    assert cfg.train.batch_size == want["batch"] and cfg.lr == pytest.approx(want["base_lr"])
    assert cfg.train.epochs == 300
    assert cfg.train.ema_decay == (0.9999 if v == "h" else None)
    assert cfg.data.image_size == 224
    assert (cfg.optim.name, cfg.optim.weight_decay, tuple(cfg.optim.betas)) == ("adamw", 0.05, (0.9, 0.999))
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs) == ("cosine", 20)
    a = cfg.aug
    assert a.rand_augment == "rand-m9-mstd0.5-inc1"
    assert (a.mixup, a.cutmix, a.re_prob, a.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
    assert a.interpolation == "bicubic"
    assert cfg.optim.clip_grad is None
    assert not cfg.distill.enabled


def test_l2_trains_450_epochs_and_distill_presets():
    assert build("iformer_l2", overrides={"data.root": "/x"}).train.epochs == 450
    d = build("iformer_m_distill", overrides={"data.root": "/x"})
    assert d.distill.enabled and d.distill.teacher == "regnety_160" and d.distill.alpha == 0.5
    assert set(RECIPES) >= {f"iformer_{v}{s}" for v in TABLE9 for s in ("", "_distill")}


def test_lr_scales_linearly_with_actual_batch():
    cfg = build("iformer_m", overrides={"data.root": "/x", "train.batch_size": 512})
    assert cfg.lr == pytest.approx(4e-3 * 512 / 4096)


def test_unknown_recipe():
    with pytest.raises(PipelineError, match="unknown recipe 'iformer_q'"):
        build("iformer_q")


def test_apply_command_rewrites_params_keeping_cluster_settings(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ray": {"address": "ray://head:10001", "num_workers": 8},
                                      "mlflow": {"tracking_uri": "http://mlflow:5000"}}))
    in1k = tmp_path / "in1k"
    for split in ("train", "val"):
        (in1k / split / "n01440764").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "pipeline.recipes", "iformer_l", "--data-root", str(in1k),
                          "--set", "train.batch_size=1024", "--params", str(params)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    written = yaml.safe_load(params.read_text())
    assert written["recipe"] == "iformer_l" and written["data"]["root"] == str(in1k)
    assert written["ray"]["address"] == "ray://head:10001" and written["ray"]["num_workers"] == 8
    assert written["mlflow"]["tracking_uri"] == "http://mlflow:5000"
    assert written["train"]["batch_size"] == 1024 and written["model"]["drop_path"] == 0.1
    bad = subprocess.run([sys.executable, "-m", "pipeline.recipes", "iformer_zz", "--params", str(params)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown recipe 'iformer_zz'" in bad.stderr
    assert yaml.safe_load(params.read_text()) == written, "a failed apply must not touch params.yaml"


def test_apply_keeps_comments_and_refuses_a_missing_data_root(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    bad = subprocess.run([sys.executable, "-m", "pipeline.recipes", "iformer_m", "--data-root", str(tmp_path / "none"),
                          "--params", str(params)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: data.root: ") and "Traceback" not in bad.stderr
    assert params.read_text() == (ROOT / "params.yaml").read_text(), "a refused apply leaves the file alone"

    for split in ("train", "val"):
        (tmp_path / "in1k" / split / "n01440764").mkdir(parents=True)
    ok = subprocess.run([sys.executable, "-m", "pipeline.recipes", "iformer_m", "--data-root", str(tmp_path / "in1k"),
                         "--params", str(params)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    text = params.read_text()
    original = (ROOT / "params.yaml").read_text()
    comments = [line.split("#", 1)[1] for line in original.splitlines() if "#" in line]
    assert all(c in text for c in comments), "every comment of params.yaml survives"
    assert "scale: [0.08, 1.0]" in text and "clip_grad: null" in text
    assert load_config(params).model.variant == "iformer_m"
