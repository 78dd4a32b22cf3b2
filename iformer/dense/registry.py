"""Register `IFormerBackbone` in the mmdet and mmseg `MODELS` registries.

Imported on demand (`iformer.dense.registry.register()`), so `iformer` imports
without OpenMMLab installed. Configs then name the backbone as
`dict(type="IFormerBackbone", variant=..., out_indices=...)`.
"""
from __future__ import annotations

from .backbone import IFormerBackbone

NAME = "IFormerBackbone"


def register() -> None:
    """Idempotent: add the backbone to both registries (mmdet and mmseg keep separate ones)."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    for registry in (DET_MODELS, SEG_MODELS):
        if registry.get(NAME) is not IFormerBackbone:
            registry.register_module(name=NAME, module=IFormerBackbone, force=True)
