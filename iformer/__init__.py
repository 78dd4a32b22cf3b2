"""iFormer model layer: timm's IFormer plus what timm lacks.

The classification network is timm's (`timm.create_model("iformer_m")`); this
package adds model construction from the pipeline's config, DeiT-style
distillation, the paper's reference figures, and the dense prediction backbone
with its mmdet/mmseg registration (`iformer.dense`).

Import what you need from its module (`iformer.models`, `iformer.reference`, ...):
the package itself imports nothing, so reading the paper's figures
(`iformer.reference`, the experiment table, the report) does not load torch.
"""
