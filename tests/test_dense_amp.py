"""`detection/segmentation.train.amp`: the dense stages' training forward passes under autocast.

What is checked against independent values: inside the wrapper's context a linear layer gives
exactly the product of its bf16-rounded operands (torch.autocast's rule for CPU matmuls); a
real Mask R-CNN and Semantic FPN step on digit scenes computes its backbone and neck in bf16,
hands float32 to every loss (Mask R-CNN's box geometry and mmcv's float32-only NMS), keeps
float32 weights, and lands its losses within bf16's rounding of the float32 step's.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import DET_DATA, SEG_DATA, native_bf16_cpu

from pipeline.config import Config
from pipeline.dense import configs
from pipeline.dense.worker import build_config


@pytest.mark.parametrize("amp, use_gpu, wrapper, dtype", [
    ("none", False, "OptimWrapper", None),
    ("none", True, "OptimWrapper", None),
    ("bf16", False, "AutocastOptimWrapper", "bfloat16"),
    ("bf16", True, "AutocastOptimWrapper", "bfloat16"),   # bf16 has float32's range: no loss scaling
    ("fp16", False, "AutocastOptimWrapper", "float16"),   # the CPU has no GradScaler (as pretraining)
    ("fp16", True, "AmpOptimWrapper", "float16"),         # CUDA fp16: mmengine's dynamic loss scale
])
def test_each_precision_gets_its_wrapper(amp, use_gpu, wrapper, dtype):
    from mmengine.registry import OPTIM_WRAPPERS

    for task, data in (("detection", DET_DATA), ("segmentation", SEG_DATA)):
        cfg = Config.model_validate({"ray": {"use_gpu": use_gpu}, task: {"train": {"amp": amp}}})
        got = build_config(cfg, task, data, "/tmp/w", None, 1, use_gpu)
        assert got["amp"] == amp
        w = got["optim_wrapper"]
        assert w["type"] == wrapper and w.get("dtype") == dtype
        assert (w.get("loss_scale") == "dynamic") is (wrapper == "AmpOptimWrapper")
        assert w["optimizer"]["type"] == "AdamW" and w["optimizer"]["lr"] == getattr(cfg, task).train.lr
    configs.register()
    assert OPTIM_WRAPPERS.get(wrapper) is not None


def test_auto_is_bf16_exactly_where_the_cpu_computes_it():
    """The default, `auto`: bf16 on a CPU whose flags (the kernel's own /proc/cpuinfo) name AVX512-BF16
    or AMX-BF16, float32 elsewhere; the paper presets train in float32 as the official configs."""
    from pipeline.config.presets import PRESETS

    assert Config().detection.train.amp == Config().segmentation.train.amp == "auto"
    native = native_bf16_cpu()
    assert configs.native_bf16(False) is native
    assert configs.precision("auto", False) == ("bf16" if native else "none")
    for amp in ("none", "bf16", "fp16"):
        assert configs.precision(amp, False) == amp
    mm = build_config(Config(), "detection", DET_DATA, "/tmp/w", None, 1, False)
    assert mm["optim_wrapper"]["type"] == ("AutocastOptimWrapper" if native else "OptimWrapper")
    assert {section: body["train"]["amp"] for section, body in PRESETS.values()} == {
        "detection": "none", "segmentation": "none"}


def test_the_wrappers_context_computes_in_bf16_and_steps_float32_weights():
    from mmengine.optim import build_optim_wrapper

    configs.register()
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(16, 4)
    x = torch.randn(8, 16, generator=g)
    wrapper = build_optim_wrapper(net, dict(type="AutocastOptimWrapper", dtype="bfloat16",
                                            optimizer=dict(type="AdamW", lr=1e-3)))
    with wrapper.optim_context(net):
        y = net(x)
    by_hand = x.bfloat16().float() @ net.weight.detach().bfloat16().float().t() + net.bias.detach().bfloat16().float()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), by_hand.bfloat16().float(), rtol=0, atol=0)
    assert net(x).dtype == torch.float32  # outside the context: float32 again
    wrapper.update_params(y.float().square().mean())
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_a_bf16_step_keeps_losses_and_weights_in_float32(tmp_path, task):
    """One real training step of each network on digit scenes, float32 and then bf16 from the same
    weights and seed: the bf16 step's backbone and neck compute in bf16, every head hands float32 on
    (Mask R-CNN's RPN decodes and NMS-filters float32 boxes), and its losses are the float32 step's
    to within bf16's rounding (8 significant bits: 2^-8 relative a product, a few % through a net)."""
    import copy

    from mmengine.config import Config as MMConfig

    from pipeline.dense import scenes
    from pipeline.dense.amp import AutocastOptimWrapper
    from pipeline.dense.worker import ChannelsLastRunner

    scenes.write(tmp_path, train=4, val=2, size=64, per_scene=(1, 3), digit_size=(18, 26), seed=3)
    data = (dict(DET_DATA, root=str(tmp_path / "coco")) if task == "detection"
            else dict(SEG_DATA, root=str(tmp_path / "ade20k")))
    configs.register()
    losses = {}
    batch, start = None, None
    for amp in ("none", "bf16"):
        cfg = Config.model_validate({task: {"train": {"amp": amp}}})
        mm = build_config(cfg, task, data, str(tmp_path / amp), None, 1, False)
        mm["experiment_name"] = f"{task}-{amp}"
        runner = ChannelsLastRunner.from_cfg(MMConfig(mm))
        model = runner.model
        wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
        assert isinstance(wrapper, AutocastOptimWrapper) is (amp == "bf16")
        if start is None:
            start, batch = copy.deepcopy(model.state_dict()), next(iter(runner.train_dataloader))
        model.load_state_dict(start)
        seen = {}
        hooked = ["backbone", "neck"] + [n for n, _ in model.named_modules() if n.endswith("_head")]
        modules = dict(model.named_modules())
        for name in hooked:
            modules[name].register_forward_hook(partial(_record, seen, name))
        model.train()
        torch.manual_seed(0)  # the RPN's and RoI head's samplers draw the same boxes
        logs = model.train_step(batch, wrapper)
        losses[amp] = {k: float(v) for k, v in logs.items()}
        assert all(p.dtype == torch.float32 for p in model.parameters())
        low = {torch.bfloat16} if amp == "bf16" else {torch.float32}
        assert seen["backbone"] == seen["neck"] == low, seen
        heads = [n for n in seen if n.endswith("_head") and seen[n]]
        if task == "detection":
            assert {"rpn_head", "roi_head.bbox_head", "roi_head.mask_head"} <= set(heads), heads
            assert all(seen[n] == {torch.float32} for n in heads), seen
    assert losses["none"].keys() == losses["bf16"].keys() and losses["none"]["loss"] > 0
    assert losses["bf16"] != losses["none"]  # bf16 did run
    # Losses whose targets do not depend on the network: the RPN's (anchors against the ground truth)
    # and Semantic FPN's (pixels). The RoI heads' losses are over the proposals the RPN kept, which a
    # bf16 score can reorder; the total moves with them, by less.
    same_targets = [k for k in losses["none"] if k.startswith("loss_rpn") or k == "decode.loss_ce"]
    assert same_targets, losses
    for k in same_targets:
        assert losses["bf16"][k] == pytest.approx(losses["none"][k], rel=0.02), (k, losses)
    assert losses["bf16"]["loss"] == pytest.approx(losses["none"]["loss"], rel=0.1), losses


def _record(seen: dict, name: str, module, args, output) -> None:
    """A forward hook that keeps the dtypes `name` returned (and returns None: the output stays)."""
    seen.setdefault(name, set()).update(t.dtype for t in _tensors(output))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_gpu_is_bf16_only_where_the_gpu_computes_it(monkeypatch, native):
    """On CUDA `auto` asks torch for bf16 in hardware (Ampere and later), not for bf16 that torch
    would emulate on an older GPU (its default answer counts emulation)."""
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert configs.precision("auto", True) == ("bf16" if native else "none")
    assert asked == [False]
    cfg = Config.model_validate({"ray": {"use_gpu": True}})
    wrapper = build_config(cfg, "segmentation", SEG_DATA, "/tmp/w", None, 1, True)["optim_wrapper"]
    assert wrapper["type"] == ("AutocastOptimWrapper" if native else "OptimWrapper")
