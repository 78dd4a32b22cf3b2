"""Window partition and reverse for the hybrid window SHMA (paper App. F).

All window arithmetic is in Python ints taken from static shapes, so a traced
or exported graph holds fixed reshapes and pads (what Core ML needs at 512x512).
`chunks > 1` is the paper's channel chunking (Eq. 4-5): the map is split along
channels and each chunk is partitioned (or reversed) on its own, then the
pieces are concatenated; the result is identical to the plain operation, with
smaller reshapes. Padding: maps not divisible by the window are zero-padded at
the bottom/right; `valid_mask` marks the real pixels, for the backbone's masked
padding option.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def static_shape(x: torch.Tensor) -> tuple[int, ...]:
    """`x.shape` as Python ints, also under `torch.jit.trace`.

    A tracer hands out sizes as traced values, so arithmetic on them lands in the
    graph as integer ops (which Core ML's converter cannot fold here). With the
    tracer paused while reading them, the traced graph holds fixed shapes for
    the example input: static by design, like `torch.export` without dynamic dims.
    """
    if not torch.jit.is_tracing():
        return tuple(x.shape)
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return tuple(int(s) for s in x.shape)
    finally:
        torch._C._set_tracing_state(state)


def padding(height: int, width: int, window: int) -> tuple[int, int]:
    """Rows and columns to add so both sides are multiples of `window`."""
    return (-height) % window, (-width) % window


def partition(x: torch.Tensor, window: int, chunks: int = 1) -> torch.Tensor:
    """(B, C, H, W) with H, W multiples of `window` -> (B * nH * nW, C, window, window)."""
    if chunks > 1:
        return torch.cat([partition(c, window) for c in x.chunk(chunks, dim=1)], dim=1)
    b, c, h, w = static_shape(x)
    x = x.view(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b * (h // window) * (w // window), c, window, window)


def reverse(windows: torch.Tensor, window: int, height: int, width: int, chunks: int = 1) -> torch.Tensor:
    """Inverse of :func:`partition`: (B * nH * nW, C, window, window) -> (B, C, height, width)."""
    if chunks > 1:
        return torch.cat([reverse(c, window, height, width) for c in windows.chunk(chunks, dim=1)], dim=1)
    n, c = static_shape(windows)[:2]
    nh, nw = height // window, width // window
    x = windows.view(n // (nh * nw), nh, nw, c, window, window)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n // (nh * nw), c, height, width)


def valid_mask(batch: int, height: int, width: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """(B * nWindows, 1, window, window): 1 on real pixels, 0 on padding, in window layout."""
    pad_h, pad_w = padding(height, width, window)
    ones = torch.ones(batch, 1, height, width, dtype=like.dtype, device=like.device)
    return partition(F.pad(ones, (0, pad_w, 0, pad_h)), window)
