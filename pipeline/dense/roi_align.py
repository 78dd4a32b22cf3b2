"""Mask R-CNN's RoIAlign with a backward pass that uses every CPU thread.

mmcv's `RoIAlign` (aligned, average pooling, adaptive sampling) runs torchvision's
kernel here. Its forward pass is parallel. Its CPU backward pass is one serial loop
over every pooled value of every channel, which recomputes the sampling weights each
time. On the default digits run it took 22 % of a Mask R-CNN step, 22 ms a call.

RoIAlign is separable. A sample at (y, x) weighs the four pixels around it by
products of one weight along y and one along x. It is dropped when y or when x falls
off the map. A bin averages a grid of gh x gw samples. So for one RoI on image b:

    out[c, p, q] = sum over h, w of Ay[p, h] * F[b, c, h, w] * Ax[q, w]

where `Ay` (pooled rows x H) holds each bin's mean row weights and `Ax` its mean
column weights. The gradient of the map is then two matrix products per image:
grad F[b] = sum over its RoIs of Ay^T @ grad out @ Ax. torch runs them on all its
threads. The results equal torchvision's own gradient, up to the order of the sums
(`tests/test_dense_config.py` checks them against mmcv's and torchvision's kernels).

`RoIAlign` is the mmcv layer with this backward pass on CPU tensors; on GPUs it is
torchvision's kernel as it was. `SeparableRoIExtractor` is mmdet's SingleRoIExtractor
with these layers. The detection config names it (`configs.detection`);
`configs.register` adds it to mmdet's registry.
"""
from __future__ import annotations

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from mmcv.ops import RoIAlign as MMCVRoIAlign
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from torch import nn


def axis_weights(start: torch.Tensor, size: torch.Tensor, pooled: int, extent: int, sampling_ratio: int,
                 aligned: bool) -> torch.Tensor:
    """(RoIs, pooled, extent): each bin's mean interpolation weight on each row (or column) of the map.

    `start` and `size` are the RoIs' first coordinate and length on this axis, in map pixels.
    The rules are torchvision's roi_align: samples at the centres of `grid` equal parts of a bin,
    `grid` = `sampling_ratio`, or ceil(bin size) when it is 0; a sample before -1 or past `extent`
    adds nothing; one in [-1, 0] reads row 0; one at or past the last row reads the last row."""
    rois = start.shape[0]
    if not aligned:
        size = size.clamp(min=1.0)
    bin_size = (size / pooled).view(rois, 1, 1)
    grid = torch.full_like(size, sampling_ratio) if sampling_ratio > 0 else torch.ceil(size / pooled)
    most = max(int(grid.max()) if rois else 0, 1)
    grid = grid.view(rois, 1, 1)
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device).view(1, pooled, 1)
    steps = torch.arange(most, dtype=start.dtype, device=start.device).view(1, 1, most)
    at = start.view(rois, 1, 1) + bins * bin_size + (steps + 0.5) * bin_size / grid.clamp(min=1)
    share = ((steps < grid) & (at >= -1.0) & (at <= extent)).to(at.dtype) / grid.clamp(min=1)
    at = at.clamp(min=0)
    low = at.floor().long()
    last = low >= extent - 1
    low = low.clamp(max=extent - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(at), at - low.to(at.dtype))
    shape = (rois, pooled, most)
    weights = torch.zeros(rois, pooled, extent, dtype=start.dtype, device=start.device)
    weights.scatter_add_(2, low.expand(shape), ((1 - frac) * share).expand(shape))
    weights.scatter_add_(2, high.expand(shape), (frac * share).expand(shape))
    return weights


def separable_backward(grad: torch.Tensor, rois: torch.Tensor, shape: torch.Size, spatial_scale: float,
                       sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """The gradient of the feature map (`shape`, N x C x H x W) from that of roi_align's output, in
    channels_last memory (as the network's maps are)."""
    n, c, h, w = shape
    pooled_h, pooled_w = grad.shape[-2:]
    dtype = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
    offset = 0.5 if aligned else 0.0
    box = rois.to(dtype)
    x0, y0 = box[:, 1] * spatial_scale - offset, box[:, 2] * spatial_scale - offset
    x1, y1 = box[:, 3] * spatial_scale - offset, box[:, 4] * spatial_scale - offset
    rows = axis_weights(y0, y1 - y0, pooled_h, h, sampling_ratio, aligned)  # (R, ph, H)
    cols = axis_weights(x0, x1 - x0, pooled_w, w, sampling_ratio, aligned)  # (R, pw, W)
    # grad out @ Ax, every RoI's bins at once: (R, ph, pw, C) -> (R, ph, W, C)
    spread = torch.matmul(cols.transpose(1, 2).unsqueeze(1), grad.to(dtype).permute(0, 2, 3, 1))
    out = grad.new_zeros((n, h, w * c), dtype=dtype)
    image = rois[:, 0].long()
    for b in range(n):
        mine = (image == b).nonzero().squeeze(1)
        if mine.numel():
            out[b] = rows[mine].reshape(-1, h).t() @ spread[mine].reshape(-1, w * c)
    return out.view(n, h, w, c).permute(0, 3, 1, 2).to(grad.dtype)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.shape, ctx.args = features.shape, (spatial_scale, sampling_ratio, aligned)
        return torch.ops.torchvision.roi_align(features, rois, spatial_scale, output_size[0], output_size[1],
                                               sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        features = separable_backward(grad, rois, ctx.shape, *ctx.args) if ctx.needs_input_grad[0] else None
        return features, None, None, None, None, None


class RoIAlign(MMCVRoIAlign):
    """mmcv's RoIAlign (average pooling only), torchvision's forward kernel and, on CPUs, the
    separable backward pass above."""

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0, pool_mode: str = "avg",
                 aligned: bool = True):
        if pool_mode != "avg":
            raise ValueError(f"RoIAlign: pool_mode {pool_mode!r}: only 'avg' has a separable backward pass")
        super().__init__(output_size, spatial_scale, sampling_ratio, pool_mode, aligned, use_torchvision=True)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if input.is_cuda:
            return super().forward(input, rois)
        return _RoIAlign.apply(input, rois, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.aligned)


class SeparableRoIExtractor(SingleRoIExtractor):
    """mmdet's SingleRoIExtractor whose `roi_layer` (type 'RoIAlign', mmcv's arguments) is the
    `RoIAlign` above."""

    def build_roi_layers(self, layer_cfg, featmap_strides) -> nn.ModuleList:
        cfg = dict(layer_cfg)
        if cfg.pop("type") != "RoIAlign":
            raise ValueError(f"SeparableRoIExtractor: roi_layer type {layer_cfg['type']!r}: only 'RoIAlign'")
        return nn.ModuleList([RoIAlign(spatial_scale=1 / s, **cfg) for s in featmap_strides])


def register() -> None:
    """Idempotent: add `SeparableRoIExtractor` to mmdet's MODELS."""
    from mmdet.registry import MODELS

    if MODELS.get(SeparableRoIExtractor.__name__) is not SeparableRoIExtractor:
        MODELS.register_module(module=SeparableRoIExtractor, force=True)
