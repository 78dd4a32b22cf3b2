"""Build iFormer classifiers through timm's registry, and measure them."""
from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def build_model(
    variant: str,
    num_classes: int,
    *,
    drop_path: float = 0.0,
    layer_scale: float = 0.0,
    distillation: bool = False,
) -> nn.Module:
    """timm's IFormer `variant` with a fresh `num_classes` head.

    `distillation=True` adds timm's distillation head (DeiT); in eval mode the
    model returns the average of both heads, and `fuse()` folds them into one.
    """
    return timm.create_model(
        variant,
        pretrained=False,
        num_classes=num_classes,
        drop_path_rate=drop_path,
        layer_scale_init_value=layer_scale,
        distillation=distillation,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gmacs(model: nn.Module, image_size: int = 224) -> float:
    """Multiply-accumulates of one forward pass, in G (MACs = FLOPs / 2).

    torch's FlopCounterMode counts the attention matmuls that fvcore skips.
    """
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2e9


def fused_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with BatchNorm/reparameterised branches folded."""
    import copy

    fused = copy.deepcopy(model).eval()
    fused.fuse()
    return fused
