"""Dense prediction with iFormer: the multi-scale backbone and its OpenMMLab registration.

`backbone` builds on timm's IFormer (same parameter names as the classifier) and
adds the paper's hybrid window SHMA for high-resolution input (App. F);
`window` holds the partition/reverse arithmetic; `registry` puts the backbone in
the mmdet and mmseg `MODELS` registries and is the only module importing mm*.
"""
from .backbone import BackboneWeightsError, IFormerBackbone, load_backbone_weights

__all__ = ["BackboneWeightsError", "IFormerBackbone", "load_backbone_weights"]
