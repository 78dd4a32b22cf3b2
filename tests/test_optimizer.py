"""`optim.fused` / `*.train.fused_optimizer`: torch's fused AdamW kernel, taking AdamW's own step.

The expected update is AdamW's first step written out by hand (Loshchilov & Hutter,
decoupled weight decay; torch's bias correction): with m = (1-b1) g and v = (1-b2) g^2,
m / (1-b1) = g and v / (1-b2) = g^2, so

    p1 = p0 * (1 - lr * wd) - lr * g / (|g| + eps)

for every weight, with the weight decay of its parameter group (timm leaves biases and
norms undecayed).
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import DET_DATA, SEG_DATA

from pipeline.config import Config


def _first_step_by_hand(p0: torch.Tensor, g: torch.Tensor, lr: float, wd: float, eps: float) -> torch.Tensor:
    return p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)


@pytest.mark.parametrize("fused", [True, False])
def test_the_pretrain_optimizer_is_adamw_fused_as_configured(fused):
    from pipeline.classify.worker import build_components

    cfg = Config.model_validate({"data": {"image_size": 32}, "optim": {"fused": fused},
                                 "train": {"batch_size": 8, "epochs": 1}})
    assert Config().optim.fused is True, "the default (params.yaml spells it): the fused kernel"
    c = build_components(cfg, 10, torch.device("cpu"), steps_per_epoch=4)
    opt = c.optimizer
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is fused
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, cfg.optim.weight_decay}

    g = torch.Generator().manual_seed(0)
    before = {}
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g)
            before[p] = (p.detach().clone(), group["weight_decay"], group["lr"])
    opt.step()
    for p, (p0, wd, lr) in before.items():
        torch.testing.assert_close(p.detach(), _first_step_by_hand(p0, p.grad, lr, wd, cfg.optim.eps),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_the_dense_runners_build_a_fused_adamw(task):
    from mmengine.optim import build_optim_wrapper

    from pipeline.dense import configs
    from pipeline.dense.worker import build_config

    configs.register()  # as the worker does before it builds its Runner: our optimiser wrappers among them

    data = DET_DATA if task == "detection" else SEG_DATA
    for fused in (True, False):
        cfg = Config.model_validate({task: {"train": {"fused_optimizer": fused}}})
        mm = build_config(cfg, task, data, "/tmp/w", None, 1, False)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        wrapper = build_optim_wrapper(net, mm["optim_wrapper"])
        opt = wrapper.optimizer
        assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is fused
        section = getattr(cfg, task).train
        assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (section.lr, section.weight_decay)
        p0 = [p.detach().clone() for p in net.parameters()]
        for p in net.parameters():
            p.grad = torch.full_like(p, 0.5)
        opt.step()
        for p, before in zip(net.parameters(), p0):
            torch.testing.assert_close(p.detach(), _first_step_by_hand(before, p.grad, section.lr, section.weight_decay,
                                                                       1e-8), rtol=1e-5, atol=1e-7)


def test_moments_from_a_run_in_the_other_layout_step_as_adamw_on_the_fused_kernel():
    """`train.resume_from` a state saved by an NCHW run into an NHWC (channels_last) run: torch's CPU
    fused kernel reads the moments as flat memory, so without `keep_layouts` it would mix elements."""
    from pipeline.compute.trainer import keep_layouts

    g = torch.Generator().manual_seed(0)
    shape = (8, 3, 3, 3)
    w0, grad1, grad2 = (torch.randn(shape, generator=g) for _ in range(3))

    nchw = torch.nn.Parameter(w0.clone())
    reference = torch.optim.AdamW([nchw], lr=0.1, weight_decay=0.05, fused=False)
    nchw.grad = grad1.clone()
    reference.step()
    w1, saved = nchw.detach().clone(), copy.deepcopy(reference.state_dict())  # moments in NCHW strides
    nchw.grad = grad2.clone()
    reference.step()  # AdamW's second step, all in one layout

    for guarded in (True, False):
        nhwc = torch.nn.Parameter(w1.clone().to(memory_format=torch.channels_last))
        fused = torch.optim.AdamW([nhwc], lr=0.1, weight_decay=0.05, fused=True)
        if guarded:
            keep_layouts(fused)
        fused.load_state_dict(saved)
        assert fused.state[nhwc]["exp_avg"].stride() != nhwc.stride(), "the moments arrive in the other layout"
        nhwc.grad = grad2.clone()  # NCHW as well
        fused.step()
        if guarded:
            assert fused.state[nhwc]["exp_avg"].stride() == nhwc.stride()
            torch.testing.assert_close(nhwc.detach(), nchw.detach(), rtol=1e-6, atol=1e-6)
        else:  # what the guard is for: the unguarded kernel takes other elements' steps
            assert (nhwc.detach() - nchw.detach()).abs().max() > 1e-2
