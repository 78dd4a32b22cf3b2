"""The deployment forms of an iFormer: what the export stage converts and times.

- `deploy_form(model)`: an eval copy with BatchNorm and re-parameterised
  branches folded (timm's `fuse()`), and attention on its explicit
  matmul-softmax path. timm's default path calls `scaled_dot_product_attention`,
  which Core ML (iOS 16/17) lowers with a transpose and an expand_dims per
  query, key and value: iformer_m at 224 becomes 250 MIL operations (without
  const) instead of the explicit form's 208 (the official export holds 209).
- `dense_backbone(variant, state_dict, **window)`: the hybrid window-attention
  backbone the dense tasks use, four feature maps at strides 4-32.
- `with_io(model, ...)`: the normalisation (for image inputs) and the softmax
  (for Core ML classifiers) baked into the graph.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

#: Output names of the dense backbone, finest first (timm's `stages.{i}`).
FEATURE_NAMES = ("stage0", "stage1", "stage2", "stage3")


def explicit_attention(model: nn.Module) -> nn.Module:
    """Route timm attention modules through their explicit matmul-softmax path."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def deploy_form(model: nn.Module) -> nn.Module:
    """A fused, eval-mode copy of `model` in the form that is exported."""
    fused = copy.deepcopy(model).eval()
    fused.fuse()
    return explicit_attention(fused)


def dense_backbone(variant: str, state_dict: dict, layer_scale: Optional[float] = None, **window) -> nn.Module:
    """The dense-prediction backbone of `variant` with a classifier's weights, in deploy form.

    The hybrid backbone the dense tasks fine-tune (`iformer.dense`: window SHMA
    in stage 3 as the official detection code, partition/reverse on channel
    chunks), fused. `window` holds `IFormerBackbone`'s `window_*` arguments;
    `layer_scale` None takes it from the weights (their `gamma` parameters).
    """
    from .dense.backbone import IFormerBackbone, checkpoint_layer_scale, load_backbone_weights

    weights = {"state_dict": state_dict}
    if layer_scale is None:
        layer_scale = checkpoint_layer_scale(weights)
    backbone = IFormerBackbone(variant, layer_scale=layer_scale, **window)
    load_backbone_weights(backbone, weights, f"{variant} weights")
    return explicit_attention(backbone.eval().fuse())


class _WithIO(nn.Module):
    def __init__(self, model: nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                 softmax: bool):
        super().__init__()
        self.model = model
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
            self.register_buffer("inv_std", 1.0 / torch.tensor(list(std)).view(1, -1, 1, 1))
        self.softmax = softmax

    def forward(self, x: torch.Tensor):
        if self.normalize:
            x = (x - self.mean) * self.inv_std
        y = self.model(x)
        return y.softmax(dim=-1) if self.softmax else y


def with_io(model: nn.Module, *, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
            softmax: bool = False) -> nn.Module:
    """`model` taking [0, 1] RGB (normalised inside) when `mean`/`std` are given, and ending in a softmax."""
    if mean is None and not softmax:
        return model
    return _WithIO(model, mean, std, softmax).eval()
