"""The iFormer backbone for detection and segmentation: timm's network, four maps.

`IFormerBackbone` keeps timm's `stem` and `stages` modules under their timm
names, so a classifier's state dict (pretrain `model.pt`, an official iFormer
release through timm's key filter) loads strictly once its head is dropped. It
returns the maps at strides 4/8/16/32 selected by `out_indices`.

Hybrid window SHMA (App. F, Table 16): in each stage of `window_stages` the
attention blocks but the last attend within `window_size` windows; the last
stays global. The map is partitioned once per stage, just before the first
attention block (after its CPE), and reversed once, just before the last
attention block (its CPE still runs per window) -- the blocks in between (CPE,
SHMA, FFN) run unchanged on the window batch. Partition and reverse use
channel chunking (`window_chunks`; 16 in the paper at 512x512). For sizes not
divisible by the window the map is zero-padded: padded keys are masked out of
attention and padded pixels are re-zeroed after each block, so a window that
covers the whole map computes exactly the global result.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from timm.models.iformer import IFormer, SHMABlock, checkpoint_filter_fn

from . import window as win


class BackboneWeightsError(ValueError):
    """A checkpoint that is not (the backbone of) the configured iFormer variant."""


def _masked_shma(block: SHMABlock, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """timm's SHMABlock on a window batch with padded keys masked out.

    Same layers and arithmetic as timm's `SHMA.forward` (fused attention path);
    only the attention mask is added, which timm's forward has no argument for.
    """
    residual = block.mixer
    attn = residual.module
    b, _, h, w = win.static_shape(x)
    v, gate = attn.gate_act(attn.v_gate(x)).chunk(2, dim=1)
    q = attn.q(x).flatten(2).transpose(-1, -2).unsqueeze(1)
    k = attn.k(x).flatten(2).transpose(-1, -2).unsqueeze(1)
    v = v.flatten(2).transpose(-1, -2).unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    out = attn.proj(out.squeeze(1).transpose(-1, -2).reshape(b, -1, h, w) * gate)
    out = residual.drop_path(out)
    if residual.gamma is not None:
        out = residual.gamma * out
    return x + out


def windowed_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, window: int, chunks: int = 1) -> torch.Tensor:
    """Run `blocks` (a stage's block list) with hybrid window attention.

    Blocks before the first SHMA block and from the last one on see the full
    map; those in between see `window` x `window` windows (padded if needed).
    """
    attn_at = [i for i, blk in enumerate(blocks) if isinstance(blk, SHMABlock)]
    first, last = attn_at[0], attn_at[-1]
    for blk in blocks[:first]:
        x = blk(x)
    b, c, h, w = win.static_shape(x)
    pad_h, pad_w = win.padding(h, w, window)
    chunks = min(chunks, c)
    x = win.partition(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x, window, chunks)
    if pad_h or pad_w:
        valid = win.valid_mask(b, h, w, window, x)
        key_mask = valid.flatten(1)[:, None, None, :] > 0  # (B * nW, 1, 1, window^2)
        for blk in blocks[first:last]:
            x = _masked_shma(blk, x, key_mask) if isinstance(blk, SHMABlock) else blk(x)
            x = x * valid
    else:
        for blk in blocks[first:last]:
            x = blk(x)
    x = win.reverse(x, window, h + pad_h, w + pad_w, chunks)
    if pad_h or pad_w:
        x = x[:, :, :h, :w]
    for blk in blocks[last:]:
        x = blk(x)
    return x


class IFormerBackbone(nn.Module):
    """timm's IFormer `variant` without its head, returning multi-scale maps."""

    def __init__(
        self,
        variant: str = "iformer_t",
        out_indices: Sequence[int] = (0, 1, 2, 3),
        window_size: int = 16,
        window_stages: Sequence[int] = (2,),
        window_chunks: int = 16,
        norm_eval: bool = False,
        drop_path: float = 0.0,
        pretrained: str | None = None,
        init_cfg: dict | None = None,  # accepted for mmengine's builders; `pretrained` is the init
    ):
        super().__init__()
        net: IFormer = timm.create_model(variant, pretrained=False, num_classes=0, drop_path_rate=drop_path)
        self.variant = variant
        self.stem = net.stem
        self.stages = net.stages
        self.out_indices = tuple(int(i) for i in out_indices)
        if not self.out_indices or any(i not in range(len(self.stages)) for i in self.out_indices):
            raise ValueError(f"out_indices {list(out_indices)} must name stages 0..{len(self.stages) - 1}")
        self.out_channels = [net.feature_info[i]["num_chs"] for i in self.out_indices]
        self.strides = [net.feature_info[i]["reduction"] for i in self.out_indices]
        self.window_size = int(window_size)
        self.window_chunks = int(window_chunks)
        # A stage needs at least two attention blocks for one of them to be windowed.
        self.window_stages = tuple(
            i for i in window_stages
            if sum(isinstance(b, SHMABlock) for b in self.stages[i].blocks) > 1
        ) if window_size > 0 else ()
        self.norm_eval = norm_eval
        self.pretrained = pretrained

    def init_weights(self) -> None:
        if self.pretrained:
            self.load_pretrained(self.pretrained)

    def load_pretrained(self, path: str | Path) -> None:
        load_backbone_weights(self, read_checkpoint(path), str(path))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:  # keep pretrained BN statistics (small detection batches)
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            if i in self.window_stages:
                x = stage.downsample(x)
                _, _, h, w = win.static_shape(x)
                if h > self.window_size or w > self.window_size:
                    x = windowed_blocks(stage.blocks, x, self.window_size, self.window_chunks)
                else:  # one window covers the map: window attention is global attention
                    x = stage.blocks(x)
            else:
                x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    @torch.no_grad()
    def fuse(self) -> "IFormerBackbone":
        """Fold BatchNorm and CPE branches, as timm's `IFormer.fuse` does (deployment form)."""
        IFormer.fuse(self)
        return self


def read_checkpoint(path: str | Path) -> dict:
    """`torch.load(weights_only=True)`, allowing (for this load only) the argparse
    and numpy globals official iFormer releases carry -- the list timm uses."""
    numpy_core = np._core if hasattr(np, "_core") else np.core
    extra = [argparse.Namespace, np.dtype, type(np.dtype("float64")),
             (numpy_core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    # The context manager removes its globals on exit, even ones allowed before it
    # (e.g. numpy.dtype for mmengine checkpoints): only lend the missing ones.
    allowed = set(torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals([g for g in extra if g not in allowed]):
        return torch.load(path, map_location="cpu", weights_only=True)


def backbone_state_dict(obj: dict) -> dict:
    """The stem/stages weights of a classifier checkpoint, in timm's names.

    Accepts a pretrain weights file (`state_dict` inside), an official iFormer
    release (`model` inside, original names) or a bare state dict; timm's
    `checkpoint_filter_fn` maps the official names. The head is dropped.
    """
    if not isinstance(obj, dict):
        raise BackboneWeightsError(f"holds a {type(obj).__name__}, not a state dict")
    state = checkpoint_filter_fn(obj, None)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BackboneWeightsError("holds no weights (no tensors under state_dict / model)")
    return {k: v for k, v in tensors.items() if not k.startswith("head.")}


def load_backbone_weights(backbone: IFormerBackbone, obj: dict, source: str = "checkpoint") -> None:
    """Load a classifier checkpoint into `backbone` strictly (head excepted)."""
    declared = obj.get("variant") if isinstance(obj, dict) else None
    if declared is not None and declared != backbone.variant:
        raise BackboneWeightsError(f"{source} holds {declared}, but the backbone is {backbone.variant}")
    try:
        state = backbone_state_dict(obj)
    except BackboneWeightsError as err:
        raise BackboneWeightsError(f"{source} {err}") from None
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(mismatched)} of other shape (e.g. {mismatched[0]} {tuple(state[mismatched[0]].shape)} "
            f"vs {tuple(own[mismatched[0]].shape)})" if mismatched else "",
        ) if part)
        raise BackboneWeightsError(f"{source} is not an {backbone.variant} checkpoint: {detail}")
    backbone.load_state_dict(state, strict=True)
