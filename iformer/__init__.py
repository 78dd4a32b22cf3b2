"""iFormer model layer: timm's IFormer plus what timm lacks.

The classification network is timm's (`timm.create_model("iformer_m")`); this
package adds model construction from the pipeline's config, DeiT-style
distillation, and the paper's reference figures. Later issues add the dense
prediction backbone and its mmdet/mmseg registration here.
"""
from .models import build_model, count_params, gmacs

__all__ = ["build_model", "count_params", "gmacs"]
