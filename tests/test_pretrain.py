"""Pretraining on real Ray Train: DDP over gloo, distillation, EMA, resume, bad input."""
from pathlib import Path

import pytest
import torch

from pipeline.core import checkpoint

pytestmark = pytest.mark.slow

STAGE_DEFAULTS = {
    "train": {"epochs": 1, "ema_decay": None, "resume_from": None, "batch_size": 64},
    "distill": {"enabled": False, "teacher": "regnety_160", "teacher_checkpoint": "teachers/regnety_160.pth"},
    "ray": {"num_workers": 1, "cpus_per_worker": 2.0},
}


def _params(repo, over):
    from conftest import deep_update
    import copy

    repo.set_params(deep_update(copy.deepcopy(STAGE_DEFAULTS), over))


def _teacher(repo, arch="resnet10t", num_classes=10) -> str:
    import timm

    path = repo.path / "teachers" / f"{arch}.pt"
    torch.save(timm.create_model(arch, num_classes=num_classes).state_dict(), path)
    return f"teachers/{arch}.pt"


def test_distilled_ema_training_on_two_gloo_workers(prepared_repo):
    repo = prepared_repo
    _params(repo, {"distill": {"enabled": True, "teacher": "resnet10t", "teacher_checkpoint": _teacher(repo)},
                   "train": {"ema_decay": 0.9}, "ray": {"num_workers": 2, "cpus_per_worker": 1.0}})
    out = repo.stage("pretrain")
    assert "rank 0/2" in out.stderr
    weights = checkpoint.load_weights(repo.path / "artifacts/pretrain/model.pt", expect_variant="iformer_t")
    assert weights["distillation"] and weights["ema"]
    assert (weights["mean"], weights["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "ImageNet's"
    assert any(k.startswith("head.head_dist") for k in weights["state_dict"])
    model = checkpoint.build_from_weights(weights)  # strict reload of what the stage wrote
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    history = (repo.path / "artifacts/pretrain/history.csv").read_text()
    assert "val_top1_ema" in history.splitlines()[0]
    manifest = checkpoint_manifest(repo)
    run = repo.mlflow_client().get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["distill.enabled"] == "True" and run.data.params["ray.num_workers"] == "2"
    hist = repo.mlflow_client().get_metric_history(run.info.run_id, "val_top1")
    assert [m.step for m in hist] == [1], "steps are the 1-based epochs users see"
    assert Path(manifest["ray_storage_path"], manifest["ray_run_name"]).is_dir()


def checkpoint_manifest(repo):
    import json

    return json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())


# Kill and resume: tests/test_runtime.py (a SIGKILLed stage's rerun resumes in the same MLflow run).


def _expect_error(repo, needle):
    before = len(repo.runs())
    out = repo.stage_error("pretrain", needle)
    assert len(repo.runs()) == before, "a rejected stage must not leave MLflow runs"
    assert "Ray" not in out.stderr.split("error:")[0], "failed before Ray start-up"


def test_bad_teacher_and_resume_inputs_fail_before_ray(prepared_repo):
    repo = prepared_repo
    _params(repo, {"distill": {"enabled": True, "teacher": "resnet10t", "teacher_checkpoint": "teachers/none.pt"}})
    _expect_error(repo, "distill.teacher_checkpoint: ")
    other = _teacher(repo, "resnet14t")
    _params(repo, {"distill": {"enabled": True, "teacher": "resnet10t", "teacher_checkpoint": other}})
    _expect_error(repo, "is not a resnet10t with 10 classes")
    from iformer.models import build_model
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    wrong = repo.path / "wrong.pt"
    checkpoint.save_weights(wrong, build_model("iformer_s", 10).state_dict(), variant="iformer_s", num_classes=10,
                            distillation=False, classes=[str(i) for i in range(10)], image_size=32,
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    _params(repo, {"train": {"resume_from": str(wrong)}})
    _expect_error(repo, "train.resume_from: ")
    _params(repo, {"train": {"resume_from": str(repo.path / "missing.pt")}})
    _expect_error(repo, "missing.pt does not exist")


def test_amp_bf16_and_channels_last_step_on_cpu():
    """The AMP/channels_last switches (meant for GPUs) run and learn on CPU too."""
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.config import Config
    from pipeline.classify.worker import build_components, train_one_epoch

    cfg = Config.model_validate({"data": {"image_size": 32}, "train": {"amp": "bf16", "channels_last": True,
                                                                        "batch_size": 8, "epochs": 1}})
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    loader = DataLoader(data, batch_size=8)
    c = build_components(cfg, 10, torch.device("cpu"), len(loader))
    before = {k: v.clone() for k, v in c.bare.state_dict().items()}
    stats, step = train_one_epoch(c, loader, cfg, torch.device("cpu"), 0, 0)
    assert step == 2 and torch.isfinite(torch.tensor(stats["train_loss"]))
    assert not c.scaler.is_enabled(), "GradScaler is for fp16 on CUDA only"
    changed = [k for k, v in c.bare.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed


def _tiny_run(overrides: dict, images: torch.Tensor, labels: torch.Tensor):
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.config import Config
    from pipeline.classify.worker import build_components

    cfg = Config.model_validate({"data": {"image_size": 32}, "train": {"batch_size": 8, "epochs": 1, **overrides}})
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    return cfg, loader, build_components(cfg, 10, torch.device("cpu"), len(loader))


def test_a_diverged_loss_stops_the_epoch_at_the_next_log_step():
    """The loss is read on the host only at log steps; a NaN there is an error, never a result."""
    from pipeline.classify.worker import train_one_epoch

    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[16:] = float("nan")  # the third of four batches diverges
    cfg, loader, c = _tiny_run({"log_every_batches": 2}, images, torch.zeros(32, dtype=torch.long))
    with pytest.raises(FloatingPointError, match=r"loss is nan by epoch 0 step 4$"):
        train_one_epoch(c, loader, cfg, torch.device("cpu"), 0, 0)


@pytest.mark.slow
def test_train_compile_steps_like_eager_on_cpu():
    """`train.compile` (torch.compile of the training forward) takes the same steps as eager mode."""
    from pipeline.classify.worker import train_one_epoch

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg, loader, c = _tiny_run({"compile": compiled}, images, labels)
        assert (c.model is not c.bare) == compiled
        stats, _ = train_one_epoch(c, loader, cfg, torch.device("cpu"), 0, 0)
        with torch.no_grad():
            results[compiled] = (stats["train_loss"], c.bare.eval()(images))
    # Four steps' mean loss (each step's loss depends on the weights the steps before left) and the
    # trained networks' outputs. Not the weights one by one: Adam's first step is lr * sign(g), and
    # rounding flips the sign of near-zero gradients.
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-3, atol=1e-3)
