"""Mixed precision for the dense stages' training steps (`detection/segmentation.train.amp`).

The same knob as pretraining's `train.amp`: none, bf16 or fp16. Each training step's forward
pass runs under `torch.autocast` on the model's device, so convolutions and matrix products
compute in the lower precision; the backward pass follows the forward's dtypes and the
weights, gradients and optimiser stay float32. Evaluation is always float32.

`configs.optim_wrapper` picks the wrapper: fp16 on CUDA needs loss scaling, mmengine's
`AmpOptimWrapper` (autocast and a dynamic GradScaler), as mmdet's and mmseg's own `--amp`.
Otherwise (bf16 anywhere, fp16 on the CPU) autocast alone: `AutocastOptimWrapper` below.
bf16 keeps float32's range, so it needs no scaler; and mmengine's AmpOptimWrapper refuses to
be built without an accelerator.

Mask R-CNN's box geometry stays float32: `float_heads` casts what each head returns (class
scores, box deltas, mask logits) back to float32, so decoding, NMS, IoU matching and the
losses work on float32 boxes. bf16 holds 8 significant bits: a coordinate near 128 px would
move in steps of 0.5 px, and mmcv's CPU NMS kernel takes float32 only.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from torch import nn


class AutocastOptimWrapper(OptimWrapper):
    """mmengine's OptimWrapper whose `optim_context` (the forward pass of `model.train_step`)
    runs under `torch.autocast(device of the model, dtype)`; no loss scaling."""

    def __init__(self, dtype: str, **kwargs):
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model: nn.Module):
        device = next(model.parameters()).device.type
        with super().optim_context(model), torch.autocast(device, dtype=self.cast_dtype):
            yield


def _to_float(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float(v) for v in value)
    return value


def _float_outputs(module: nn.Module, args, output):
    return _to_float(output)


def float_heads(model: nn.Module) -> None:
    """Cast the outputs of every `*_head` submodule called as a module to float32 (forward
    hooks). A head nested in another (mmdet's `roi_head.bbox_head`) is hooked too: the RoI head
    calls its box and mask heads, not itself."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1].endswith("_head"):
            module.register_forward_hook(_float_outputs)


def register() -> None:
    """Idempotent: add `AutocastOptimWrapper` to mmengine's OPTIM_WRAPPERS (mmdet's and
    mmseg's registries look there as their parent)."""
    from mmengine.registry import OPTIM_WRAPPERS

    if OPTIM_WRAPPERS.get(AutocastOptimWrapper.__name__) is not AutocastOptimWrapper:
        OPTIM_WRAPPERS.register_module(module=AutocastOptimWrapper, force=True)
