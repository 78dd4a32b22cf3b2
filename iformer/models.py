"""Build iFormer classifiers through timm's registry, and measure them."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


#: The layer-scale init value of the official recipes (configs/iFormer_h.yaml).
LAYER_SCALE_INIT = 1e-6
#: Layer scale of the official configurations (Table 15): only iFormer-H has it.
OFFICIAL_LAYER_SCALE = {"iformer_h": LAYER_SCALE_INIT}


def default_layer_scale(variant: str) -> float:
    """The layer-scale init value the official `variant` is built with (0: none)."""
    return OFFICIAL_LAYER_SCALE.get(variant, 0.0)


def has_layer_scale(state_dict: dict) -> bool:
    """Whether a state dict (timm or official names) holds layer-scale parameters (`...gamma`)."""
    return any(k.endswith(".gamma") for k in state_dict)


def layer_scale_from(state_dict: dict, recorded: float | None = None) -> float:
    """The layer scale to rebuild `state_dict`'s network with: `recorded` when the
    weights carry it, else the official init value if they hold `gamma`s (loading
    overwrites the init value, so only its presence matters), else 0."""
    if recorded is not None:
        return float(recorded)
    return LAYER_SCALE_INIT if has_layer_scale(state_dict) else 0.0


def build_model(
    variant: str,
    num_classes: int,
    *,
    drop_path: float = 0.0,
    layer_scale: float | None = None,
    distillation: bool = False,
) -> nn.Module:
    """timm's IFormer `variant` with a fresh `num_classes` head.

    `layer_scale` is part of the architecture (a `gamma` per residual branch
    when > 0); None builds the official configuration (1e-6 for H, none for
    the others). `distillation=True` adds timm's distillation head (DeiT); in
    eval mode the model returns the average of both heads, and `fuse()` folds
    them into one.
    """
    import timm  # here, not above: the layer-scale rules serve stages that never build a network

    return timm.create_model(
        variant,
        pretrained=False,
        num_classes=num_classes,
        drop_path_rate=drop_path,
        layer_scale_init_value=default_layer_scale(variant) if layer_scale is None else layer_scale,
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
