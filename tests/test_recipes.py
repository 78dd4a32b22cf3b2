"""The paper's ImageNet recipes (Table 9 + per-variant settings) as presets."""
import subprocess
import sys

import pytest
import yaml

from pipeline.errors import PipelineError
from conftest import ROOT
from pipeline.config import load_config
from pipeline.config.apply import build
from pipeline.config.recipes import RECIPES

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
                          "-S", "train.batch_size=1024", "--params", str(params)],
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


# The official v0.9 release files (github.com/ChuanyangZheng/iFormer/releases/tag/v0.9), as timm's
# pretrained configs name them: plain for T, S, M, L, H; distilled for M, L, L2.
RELEASE_FILES = {"iformer_t": "iFormer_t.pth", "iformer_s": "iFormer_s.pth", "iformer_m": "iFormer_m.pth",
                 "iformer_l": "iFormer_l.pth", "iformer_h": "iFormer_h.pth",
                 "iformer_m_distilled": "iFormer_m_distill.pth", "iformer_l_distilled": "iFormer_l_distill.pth",
                 "iformer_l2_distilled": "iFormer_l2_distill.pth"}


@pytest.mark.parametrize("arch", sorted(RELEASE_FILES))
def test_release_recipes_evaluate_the_official_weights_as_timm_does(arch):
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(f"{arch}.in1k")
    assert pretrained.url.endswith("/" + RELEASE_FILES[arch]), "the file the recipe expects is the release's"
    variant = arch.removesuffix("_distilled")
    name = f"{variant}_distill_release" if arch.endswith("_distilled") else f"{variant}_release"
    cfg = build(name, overrides={"data.root": "/data/imagenet"})
    assert cfg.model.variant == variant and str(cfg.model.weights) == f"weights/{RELEASE_FILES[arch]}"
    assert cfg.train.epochs == 0, "passed through unchanged"
    assert not cfg.distill.enabled, "a distilled release brings its own head; nothing trains"
    assert (cfg.data.image_size, cfg.aug.crop_pct, cfg.aug.interpolation) == (
        pretrained.input_size[-1], pretrained.crop_pct, pretrained.interpolation)
    assert cfg.layer_scale == (1e-6 if variant == "iformer_h" else 0.0)


@pytest.mark.slow
def test_release_recipe_command_names_its_weights_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    for split in ("train", "val"):
        (tmp_path / "in1k" / split / "n01440764").mkdir(parents=True)

    def apply(*extra):
        return subprocess.run([sys.executable, "-m", "pipeline.recipes", "iformer_m_release", "--data-root",
                               str(tmp_path / "in1k"), "--params", str(params), *extra], capture_output=True, text=True)

    missing = apply()
    assert missing.returncode == 2 and missing.stderr.startswith(
        f"error: model.weights: {tmp_path / 'weights/iFormer_m.pth'} does not exist")
    outside = tmp_path / "elsewhere.pth"
    outside.write_bytes(b"x")
    refused = apply("--weights", str(outside))
    assert refused.returncode == 2 and "is outside" in refused.stderr and "copy or link it into weights/" in refused.stderr
    assert params.read_text() == (ROOT / "params.yaml").read_text(), "refused applies leave the file alone"

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mine.pth").write_bytes(b"x")  # its contents are the pretrain stage's to check
    ok = apply("--weights", "weights/mine.pth")
    assert ok.returncode == 0, ok.stderr
    assert "weights/mine.pth passed through" in ok.stdout
    cfg = load_config(params)
    assert (cfg.recipe, str(cfg.model.weights), cfg.train.epochs) == ("iformer_m_release", "weights/mine.pth", 0)
    listed = subprocess.run([sys.executable, "-m", "pipeline.recipes", "--list"], capture_output=True, text=True)
    assert {"iformer_m_release", "iformer_l2_distill_release"} <= set(listed.stdout.split())
