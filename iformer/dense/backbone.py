"""The iFormer backbone for detection and segmentation: timm's network, four maps.

`IFormerBackbone` keeps timm's `stem` and `stages` modules under their timm
names, so a classifier's state dict (pretrain `model.pt`, an official iFormer
release through timm's key filter) loads strictly once its head is dropped. It
returns the maps at strides 4/8/16/32 selected by `out_indices`. Layer scale is
part of the architecture: `layer_scale=None` builds the official value (1e-6
for H, none for the others); `checkpoint_layer_scale` reads it off weights.

Hybrid window SHMA in the stages of `window_stages` (stage 3 by default), as
the official detection backbone (`detection/iformer.py`, the `wsp1` / `wre1`
blocks) computes it -- `window_layout="official"`, `window_padding="zeros"`:

- the map is zero-padded at the bottom/right to a multiple of `window_size` and
  partitioned just before the mixer of the first attention block (its CPE runs
  on the full map), also when one window covers the map (14x14 pads to 16x16);
- every block from there on (SHMA, FFN, the next CPE...) runs on the window
  batch, padding included and unmasked (each window's CPE convolution pads at
  the window border);
- the map is reversed and cropped right after the mixer of attention block r,
  and the blocks after it run on the full map. r is the last attention block
  of a stage with up to four (iFormer-M's four are all windowed) and the
  second-to-last of a stage with more (L: 8, L2: 11, one global triplet at the
  end). T and S (three) and H (fifteen), which the official code has no
  detection config for, follow the same rule.

Partition and reverse use channel chunking (`window_chunks`; 16 as the official
code): the result equals the plain reshape. Two named alternatives:
`window_layout="paper"` reverses just before the last attention block (the
sentence of App. F and Table 16: every attention block but the last windowed,
the last CPE still per window); `window_padding="masked"` masks padded keys out
of attention and re-zeroes padded pixels after each windowed block, so a
window that covers the map computes exactly global attention and a pixel's
result does not depend on how much padding its image needs.
`window_size=0` is global attention throughout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.iformer import IFormer, SHMABlock, checkpoint_filter_fn

from ..models import build_model, default_layer_scale, layer_scale_from
from ..weights import read_checkpoint
from . import window as win

WINDOW_LAYOUTS = ("official", "paper")
WINDOW_PADDINGS = ("zeros", "masked")
#: The official layout windows every attention block of a stage with up to this many.
ALL_WINDOWED_UP_TO = 4


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


def window_span(blocks: Sequence[nn.Module], layout: str = "official") -> tuple[int, int]:
    """The blocks `[start, stop)` of a stage that run on windows (none when equal)."""
    attn_at = [i for i, blk in enumerate(blocks) if isinstance(blk, SHMABlock)]
    if not attn_at:
        return 0, 0
    if layout == "paper":  # reverse before the last attention block
        return attn_at[0], attn_at[-1]
    last = attn_at[-1] if len(attn_at) <= ALL_WINDOWED_UP_TO else attn_at[-2]
    return attn_at[0], last + 1  # reverse after its mixer


def windowed_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, window: int, chunks: int = 1,
                    layout: str = "official", padding: str = "zeros") -> torch.Tensor:
    """Run `blocks` (a stage's block list) with hybrid window attention (see the module docstring)."""
    start, stop = window_span(blocks, layout)
    for blk in blocks[:start]:
        x = blk(x)
    if stop > start:
        b, c, h, w = win.static_shape(x)
        pad_h, pad_w = win.padding(h, w, window)
        chunks = min(chunks, c)
        x = win.partition(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x, window, chunks)
        if padding == "masked" and (pad_h or pad_w):
            valid = win.valid_mask(b, h, w, window, x)
            key_mask = valid.flatten(1)[:, None, None, :] > 0  # (B * nW, 1, 1, window^2)
            for blk in blocks[start:stop]:
                x = _masked_shma(blk, x, key_mask) if isinstance(blk, SHMABlock) else blk(x)
                x = x * valid
        else:
            for blk in blocks[start:stop]:
                x = blk(x)
        x = win.reverse(x, window, h + pad_h, w + pad_w, chunks)
        if pad_h or pad_w:
            x = x[:, :, :h, :w]
    for blk in blocks[stop:]:
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
        window_layout: str = "official",
        window_padding: str = "zeros",
        layer_scale: float | None = None,
        norm_eval: bool = False,
        drop_path: float = 0.0,
        pretrained: str | None = None,
        init_cfg: dict | None = None,  # accepted for mmengine's builders; `pretrained` is the init
    ):
        super().__init__()
        if window_layout not in WINDOW_LAYOUTS or window_padding not in WINDOW_PADDINGS:
            raise ValueError(f"window_layout must be one of {WINDOW_LAYOUTS} (got {window_layout!r}), "
                             f"window_padding one of {WINDOW_PADDINGS} (got {window_padding!r})")
        self.layer_scale = default_layer_scale(variant) if layer_scale is None else float(layer_scale)
        net: IFormer = build_model(variant, 0, drop_path=drop_path, layer_scale=self.layer_scale)
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
        self.window_layout = window_layout
        self.window_padding = window_padding
        spans = {i: window_span(self.stages[i].blocks, window_layout) for i in window_stages}
        self.window_stages = tuple(i for i, (a, b) in spans.items() if b > a) if window_size > 0 else ()
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
                x = windowed_blocks(stage.blocks, stage.downsample(x), self.window_size, self.window_chunks,
                                    self.window_layout, self.window_padding)
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


def checkpoint_layer_scale(obj: dict) -> float:
    """The layer scale a classifier checkpoint's network has: as recorded (pretrain
    weights files), else from its keys (`gamma` parameters: official H releases)."""
    recorded = obj.get("layer_scale") if isinstance(obj, dict) else None
    return layer_scale_from(backbone_state_dict(obj), recorded)


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
        if all(k.endswith(".gamma") for k in missing + unexpected) and not mismatched:
            detail += f" (layer scale: the backbone is built with {backbone.layer_scale:g})"
        raise BackboneWeightsError(f"{source} is not an {backbone.variant} checkpoint: {detail}")
    backbone.load_state_dict(state, strict=True)
