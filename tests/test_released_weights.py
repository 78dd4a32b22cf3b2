"""Released iFormer weights through the pipeline, checked against timm loading the same file.

The files are written here in the official v0.9 format: `{"model": state dict,
"args": argparse.Namespace, numpy scalars, ...}` with the official code's
parameter names (ChuanyangZheng/iFormer `models/iformer.py`), made from timm's
by the inverse of timm's `checkpoint_filter_fn` written below, and numpy scalars
pickled under numpy 1's name as the releases have them.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.iformer import checkpoint_filter_fn

from conftest import deep_update
from pipeline.core import checkpoint
from pipeline.classify import pretrain
from pipeline.config import load_config
from pipeline.errors import PipelineError

# -- the official format, written from a timm model ---------------------------------------------
#: The official block classes and the name of their residual branch (`token_channel_mixer` for
#: ConvBlock and SHMABlock, `channel_mixer` for FFN2d; RepCPE's is `cpe`, as in timm).
OFFICIAL_BRANCH = {"ConvBlock": "token_channel_mixer", "SHMABlock": "token_channel_mixer", "FFN": "channel_mixer",
                   "RepCPE": "cpe"}
OFFICIAL_STEM = {"stem.conv1.": "downsample_layers.0.0.", "stem.conv2.": "downsample_layers.0.2.conv_exp_bn1.",
                 "stem.conv3.": "downsample_layers.0.2.conv_pwl_bn2."}


def official_key(model, key: str) -> str:
    """timm's parameter name -> the official code's (the inverse of timm's checkpoint_filter_fn)."""
    for timm_head, official in (("head.head_dist.", "classifier.classifier_dist."), ("head.head.", "classifier.classifier.")):
        if key.startswith(timm_head):
            return official + key[len(timm_head):]
    for timm_stem, official in OFFICIAL_STEM.items():
        if key.startswith(timm_stem):
            return official + key[len(timm_stem):]
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.(.*)", key)
    if m:  # use_bn downsampling: nn.Sequential(Conv2d_BN)
        return f"downsample_layers.{m[1]}.0.{m[2]}"
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(mixer|cpe)\.(.*)", key)
    assert m, f"no official name for {key}"
    stage, block, rest = int(m[1]), int(m[2]), m[4]
    branch = OFFICIAL_BRANCH[type(model.stages[stage].blocks[block]).__name__]
    rest = re.sub(r"^module\.", "m.", rest)  # the official Residual holds its branch as `m`
    return f"stages.{stage}.{block}.block.{branch}.{rest}"


def official_state_dict(model) -> dict:
    return {official_key(model, k): v.clone() for k, v in model.state_dict().items()}


class Numpy1Pickler(pickle._Pickler):
    """Writes numpy scalars as numpy 1 did (`numpy.core.multiarray.scalar`), as the v0.9 releases hold them."""

    SCALAR = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar

    def save_global(self, obj, name=None):
        if obj is self.SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


class numpy1_pickle:  # the `pickle_module` torch.save takes
    __name__ = "pickle"
    Pickler = Numpy1Pickler


def randomised(model, seed: int = 0):
    """`model` with random, well-scaled weights everywhere (BatchNorm statistics and layer scale too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or name.endswith("bn.weight") or name.endswith("gamma"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(0.01 * torch.randn(t.shape, generator=g))
            else:  # unit gain: features that neither explode nor forget the input over the blocks
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
    return model.eval()


def write_release(path: Path, model, arch: str) -> Path:
    """`model`'s weights as an official release file: names, training arguments, numpy scalars."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "model": official_state_dict(model),
        "epoch": 299,
        "args": argparse.Namespace(model=arch, input_size=224, lr=4e-3, batch_size=256, drop_path=0.0,
                                   model_ema=False, distillation_type="none"),
        "max_accuracy": np.float64(80.42),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    torch.save(body, path, pickle_module=numpy1_pickle)
    return path


def pickled_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    out = set()
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name == "GLOBAL":
            out.add(arg.replace(" ", "."))
    return out


def timm_from_file(arch: str, path: Path, num_classes: int, **kwargs):
    """timm's own loading of the release (its registry, its filter, its allow-list)."""
    return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes), **kwargs).eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the format itself -------------------------------------------------------------------------
def test_the_inverse_key_map_gives_the_official_names_and_timm_maps_them_back(tmp_path):
    model = timm.create_model("iformer_m", num_classes=10, distillation=True, layer_scale_init_value=1e-6)
    official = official_state_dict(model)
    # Names read off the official iFormer_m (block list: stage 3 has 9 ConvBlocks, then RepCPE,
    # SHMABlock, FFN2d x 4, a ConvBlock, x 2; `use_bn` downsampling; `Classfier` head).
    for key in ("downsample_layers.0.0.c.weight", "downsample_layers.0.2.conv_exp_bn1.bn.running_var",
                "downsample_layers.0.2.conv_pwl_bn2.c.weight", "downsample_layers.3.0.c.weight",
                "stages.0.1.block.token_channel_mixer.m.0.c.weight", "stages.2.9.block.cpe.m.c.weight",
                "stages.2.10.block.token_channel_mixer.m.v_gate.c.weight",
                "stages.2.10.block.token_channel_mixer.gamma", "stages.2.11.block.channel_mixer.m.2.bn.bias",
                "stages.2.21.block.token_channel_mixer.m.3.c.weight", "stages.3.1.block.token_channel_mixer.m.proj.c.weight",
                "classifier.classifier.l.weight", "classifier.classifier_dist.bn.running_mean"):
        assert key in official, key
    assert not any(k.startswith(("stem.", "head.")) or ".blocks." in k or ".mixer." in k for k in official)
    assert checkpoint_filter_fn({"model": official}, None).keys() == model.state_dict().keys()

    path = write_release(tmp_path / "iFormer_m.pth", model, "iFormer_m")
    found = pickled_globals(path)
    assert {"argparse.Namespace", "numpy.core.multiarray.scalar", "numpy.dtype"} <= found
    with pytest.raises(pickle.UnpicklingError):  # torch's defaults refuse it: the globals must be lent
        torch.load(path, weights_only=True)


def test_timm_state_dicts_are_released_weights_too(tmp_path):
    from safetensors.torch import save_file

    model = randomised(timm.create_model("iformer_t", num_classes=1000))
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    save_file(model.state_dict(), str(tmp_path / "timm.safetensors"))
    for name in ("timm.pth", "timm.safetensors"):
        release = checkpoint.check_release(tmp_path / name, name, variant="iformer_t", layer_scale=0.0, num_classes=10,
                                           classes=[str(i) for i in range(10)], pass_through=False)
        assert (release.format, release.num_classes, release.distillation) == ("timm", 1000, False)
        assert release.state is None, "fine-tuned: the workers read the file themselves"


@pytest.mark.slow
def test_a_release_with_layer_scale_loads_as_timm_loads_it(tmp_path):
    """The load path H takes (a gamma per residual branch), on M with layer scale: H itself is 99 M parameters."""
    from iformer.models import build_model

    model = randomised(timm.create_model("iformer_m", num_classes=10, layer_scale_init_value=1e-6))
    path = write_release(tmp_path / "weights" / "iFormer_m_ls.pth", model, "iFormer_m")
    classes = [str(i) for i in range(10)]
    release = checkpoint.check_release(path, "weights/iFormer_m_ls.pth", variant="iformer_m", layer_scale=1e-6,
                                       num_classes=10, classes=classes, pass_through=True)
    assert (release.format, release.num_classes, release.distillation) == ("official", 10, False)
    ours = build_model("iformer_m", 10, layer_scale=1e-6)
    ours.load_state_dict(release.state, strict=True)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = timm_from_file("iformer_m", path, 10, layer_scale_init_value=1e-6)(x)
        torch.testing.assert_close(ours.eval()(x), want, rtol=0, atol=0)
    gammas = [k for k in release.state if k.endswith(".gamma")]
    assert len(gammas) == 26 and all(not torch.all(release.state[k] == 1e-6) for k in gammas)
    with pytest.raises(PipelineError, match=r"model.weights: .* has layer scale .* set model.layer_scale to 1e-06"):
        checkpoint.check_release(path, "x", variant="iformer_m", layer_scale=0.0, num_classes=10, classes=classes,
                                 pass_through=True)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_release_with_a_new_head_and_learns(prepared_repo):
    """A 1000-class release on the 10 digits: the head starts afresh, everything else is the file's."""
    from torch.utils.data import DataLoader

    from pipeline.config import Config
    from pipeline.classify.datasets import ImageListDataset, Prepared, build_transforms
    from pipeline.classify.worker import build_components, start_from_weights, train_one_epoch

    release = randomised(timm.create_model("iformer_t", num_classes=1000))
    path = write_release(prepared_repo.path / "weights" / "iFormer_t_1k.pth", release, "iFormer_t")
    cfg = Config.model_validate({"model": {"weights": "weights/iFormer_t_1k.pth"}, "data": {"image_size": 32},
                                 "train": {"epochs": 4, "batch_size": 32, "ema_decay": 0.9},
                                 "optim": {"base_lr": 1e-3}, "aug": {"color_jitter": 0.0}})
    prepared = Prepared.load(prepared_repo.path / "artifacts/prepare")
    data = ImageListDataset(prepared, "train", build_transforms(cfg, training=True))
    loader = DataLoader(torch.utils.data.Subset(data, range(256)), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0), drop_last=True)
    torch.manual_seed(0)
    c = build_components(cfg, 10, torch.device("cpu"), len(loader))
    assert start_from_weights(c, path) == ["head.head"]
    ours = c.bare.state_dict()
    want = release.state_dict()
    body = [k for k in want if not k.startswith("head.")]
    assert len(body) > 300
    for k in body:
        torch.testing.assert_close(ours[k], want[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(c.ema.module.state_dict()[k], want[k], rtol=0, atol=0, msg=f"EMA {k}")
    assert ours["head.head.l.weight"].shape == (10, 256)
    torch.set_num_threads(1)
    losses = [train_one_epoch(c, loader, cfg, torch.device("cpu"), e, e * len(loader))[0]["train_loss"]
              for e in range(cfg.train.epochs)]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_bad_releases_fail_in_one_line_before_any_run(prepared_repo, tmp_path):
    repo = prepared_repo
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    weights = repo.path / "weights"
    weights.mkdir(exist_ok=True)
    t = randomised(timm.create_model("iformer_t", num_classes=10))
    torch.save({"model": official_state_dict(t), "args": Payload()}, weights / "evil.pth")
    write_release(weights / "iFormer_s.pth", randomised(timm.create_model("iformer_s", num_classes=10)), "iFormer_s")
    write_release(weights / "iFormer_t_1k.pth", randomised(timm.create_model("iformer_t", num_classes=1000)), "iFormer_t")
    (tmp_path / "outside.pth").write_bytes((weights / "iFormer_s.pth").read_bytes())
    before = len(repo.runs())

    def passed_through(name: str) -> dict:
        return {"model": {"weights": name}, "train": {"epochs": 0, "resume_from": None}}

    refused = [  # through the stage's command: one `error:` line, exit 2
        (passed_through("weights/evil.pth"),
         f"model.weights: {weights / 'evil.pth'} is refused: it asks for the Python global posix.system"),
        (passed_through("weights/iFormer_s.pth"),
         f"model.weights: {weights / 'iFormer_s.pth'} is not an iformer_t checkpoint (its shapes fit iformer_s)"),
        (passed_through("weights/iFormer_t_1k.pth"),
         f"model.weights: {weights / 'iFormer_t_1k.pth'} has a 1000-class head, but the prepared data has 10 classes"),
    ]
    checked = [  # the same check, called directly
        (passed_through("weights/missing.pth"), f"model.weights: {weights / 'missing.pth'} does not exist"),
        (passed_through(str(tmp_path / "outside.pth")), f"model.weights: {tmp_path / 'outside.pth'} is outside"),
        ({"model": {"weights": None}, "train": {"epochs": 1, "resume_from": str(weights / "iFormer_s.pth")}},
         f"train.resume_from: {weights / 'iFormer_s.pth'} holds weights (official iFormer release), not a training "
         "state; to start from weights, put the file in weights/ and set model.weights"),
    ]
    try:
        for over, needle in refused:
            repo.set_params(over)
            out = repo.stage_error("pretrain", needle)
            assert "Ray" not in out.stderr.split("error:")[0], "refused before Ray start-up"
        assert len(repo.runs()) == before, "a refused stage leaves no MLflow run"
        assert not marker.exists(), "the pickle's code never ran"
        assert not (repo.path / "artifacts/pretrain/manifest.json").exists()
        for over, needle in checked:
            repo.set_params(over)
            with pytest.raises(PipelineError) as err:
                pretrain.check(load_config(repo.path / "params.yaml"), repo.path)
            assert needle in str(err.value) and "\n" not in str(err.value)
    finally:
        repo.set_params({"model": {"weights": None}, "train": {"epochs": 2, "resume_from": None}})


# -- through the stages ---------------------------------------------------------------------------
def _val_batch(repo, size: int):
    """The prepared validation images as timm's eval transform makes them (its pretrained-cfg crop)."""
    from PIL import Image
    from timm.data import create_transform

    from pipeline.classify.datasets import Prepared

    prepared = Prepared.load(repo.path / "artifacts/prepare")
    transform = create_transform(size, is_training=False, crop_pct=0.875, interpolation="bicubic")
    samples = prepared.samples("val")
    images = torch.stack([transform(Image.open(prepared.root / rel).convert("RGB")) for rel, _ in samples])
    return images, torch.tensor([label for _, label in samples])


PASS_THROUGH = {"train": {"epochs": 0}, "aug": {"crop_pct": 0.875, "interpolation": "bicubic"},
                "export": {"classifier_sizes": [], "backbone_size": None}}


@pytest.mark.slow
def test_an_official_release_passes_through_pretrain_evaluate_and_export_as_timm_computes_it(prepared_repo):
    import onnxruntime as ort

    repo = prepared_repo
    path = write_release(repo.path / "weights" / "iFormer_t.pth",
                         randomised(timm.create_model("iformer_t", num_classes=10), seed=3), "iFormer_t")
    repo.set_params(deep_update({"model": {"variant": "iformer_t", "weights": "weights/iFormer_t.pth"}}, PASS_THROUGH))
    try:
        pre = repo.stage("pretrain")
        assert "Ray" not in pre.stderr, "nothing trains, so no Ray starts"
        ev = repo.stage("evaluate")
        repo.stage("export")
    finally:
        repo.set_params({"model": {"weights": None}, "train": {"epochs": 2}})

    source = {"path": "weights/iFormer_t.pth", "sha256": sha256(path), "format": "official", "mode": "passed through"}
    weights = checkpoint.load_weights(repo.path / "artifacts/pretrain/model.pt", expect_variant="iformer_t")
    assert weights["source"] == source and weights["epochs"] == 0 and not weights["distillation"]
    assert weights["classes"] == [str(i) for i in range(10)]
    manifests = {s: json.loads((repo.path / f"artifacts/{s}/manifest.json").read_text()) for s in ("pretrain", "evaluate")}
    assert manifests["pretrain"]["source"] == source and manifests["evaluate"]["weights_source"] == source
    tags = repo.mlflow_client().get_run(manifests["evaluate"]["mlflow_run_id"]).data.tags
    assert tags["iformer.weights_source.sha256"] == source["sha256"]
    assert "weights/iFormer_t.pth (official iFormer release" in ev.stderr

    ref = timm_from_file("iformer_t", path, 10)
    images, targets = _val_batch(repo, 32)
    with torch.no_grad():
        want = ref(images)
    predicted = want.argmax(1)
    assert len(set(predicted.tolist())) > 2, "random weights that tell images apart"
    # evaluate's predictions are timm's: its confusion matrix, image by image
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (targets.numpy(), predicted.numpy()), 1)
    np.testing.assert_array_equal(np.loadtxt(repo.path / "artifacts/evaluate/confusion_matrix.csv", delimiter=",",
                                             dtype=np.int64), confusion)
    metrics = json.loads((repo.path / "metrics/evaluate.json").read_text())
    assert metrics["top1"] == pytest.approx(float((predicted == targets).float().mean()), abs=1e-9)
    assert metrics["top5"] == pytest.approx(float(want.topk(5, 1).indices.eq(targets[:, None]).any(1).float().mean()),
                                            abs=1e-9)
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(want, targets)), rel=1e-5)
    # the exported ONNX computes timm's logits
    session = ort.InferenceSession(str(repo.path / "artifacts/export/classifier_32.onnx"),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: images[i:i + 1].numpy()})[0] for i in range(0, 64)])
    np.testing.assert_allclose(got, want[:64].numpy(), rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))


@pytest.mark.slow
def test_a_distilled_release_keeps_its_distillation_head(prepared_repo):
    repo = prepared_repo
    path = write_release(repo.path / "weights" / "iFormer_m_distill.pth",
                         randomised(timm.create_model("iformer_m", num_classes=10, distillation=True), seed=5),
                         "iFormer_m")
    repo.set_params(deep_update({"model": {"variant": "iformer_m", "weights": "weights/iFormer_m_distill.pth"}},
                                PASS_THROUGH))
    try:
        repo.stage("pretrain")
    finally:
        repo.set_params({"model": {"variant": "iformer_t", "weights": None}, "train": {"epochs": 2}})
    weights = checkpoint.load_weights(repo.path / "artifacts/pretrain/model.pt", expect_variant="iformer_m")
    assert weights["distillation"] and any(k.startswith("head.head_dist.") for k in weights["state_dict"])
    ours = checkpoint.build_from_weights(weights)
    images, _ = _val_batch(repo, 32)
    with torch.no_grad():
        want = timm_from_file("iformer_m_distilled", path, 10)(images[:32])
        torch.testing.assert_close(ours(images[:32]), want, rtol=0, atol=0)


@pytest.mark.slow
def test_fine_tuning_a_1000_class_release_on_digits_in_the_stage(prepared_repo):
    """The stage's Ray workers start from the file (loss falling from it: the in-process test above)."""
    repo = prepared_repo
    release = randomised(timm.create_model("iformer_t", num_classes=1000), seed=7)
    path = write_release(repo.path / "weights" / "iFormer_t_1k.pth", release, "iFormer_t")
    repo.set_params({"model": {"variant": "iformer_t", "weights": "weights/iFormer_t_1k.pth"},
                     "train": {"epochs": 1, "resume_from": None}})
    try:
        out = repo.stage("pretrain")
    finally:
        repo.set_params({"model": {"weights": None}, "train": {"epochs": 2}})
    assert "from released weights weights/iFormer_t_1k.pth (head.head initialised afresh)" in out.stderr
    weights = checkpoint.load_weights(repo.path / "artifacts/pretrain/model.pt", expect_variant="iformer_t")
    assert weights["num_classes"] == 10 and weights["epochs"] == 1
    assert weights["source"] == {"path": "weights/iFormer_t_1k.pth", "sha256": sha256(path), "format": "official",
                                 "mode": "fine-tuned"}
    # One epoch of AdamW moves each weight by about the summed learning rate (~0.02): the trained body
    # still points where the release's does, and nowhere near a fresh network's.
    body = [k for k, p in release.named_parameters() if not k.startswith("head.") and p.ndim > 1]  # conv kernels

    def flat(state):
        return torch.cat([state[k].flatten() for k in body])

    fresh = timm.create_model("iformer_t", num_classes=10).state_dict()
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(flat(weights["state_dict"]), flat(release.state_dict()), dim=0)) > 0.9
    assert abs(float(cosine(flat(fresh), flat(release.state_dict()), dim=0))) < 0.1
