"""The paper's reference figures for each iFormer variant, in one table.

Sources: Table 3 (params, GMACs, iPhone 13 latency at 224, top-1), Table 4 and
Table 12 (top-1 with distillation), Table 5 and Table 13 (Mask R-CNN AP on
COCO, Semantic FPN mIoU on ADE20K, backbone latency at 512x512). `None` means
the paper gives no figure. The report puts our numbers beside these.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Reference:
    variant: str
    params_m: float
    gmacs: float                       # as the paper prints it (Table 3 / 15)
    latency_ms: Optional[float]        # iPhone 13, Core ML, 224x224, batch 1
    top1: Optional[float]              # ImageNet-1K, 300 epochs, no distillation
    top1_distilled: Optional[float]    # with RegNetY-16GF hard distillation
    distill_epochs: Optional[int]
    dense_latency_ms: Optional[float]  # backbone at 512x512 (Table 5 / 13)
    ap_box: Optional[float]            # Mask R-CNN 1x on COCO 2017
    ap_mask: Optional[float]
    miou: Optional[float]              # Semantic FPN on ADE20K

    def as_dict(self) -> dict:
        return asdict(self)


PAPER: dict[str, Reference] = {
    r.variant: r
    for r in (
        Reference("iformer_t", 2.9, 0.53, 0.60, 74.1, None, None, None, None, None, None),
        Reference("iformer_s", 6.5, 1.09, 0.85, 78.8, None, None, None, None, None, None),
        Reference("iformer_m", 8.9, 1.64, 1.10, 80.4, 81.1, 300, 4.00, 40.8, 37.9, 42.4),
        Reference("iformer_l", 14.7, 2.63, 1.60, 81.9, 82.7, 300, 6.60, 42.2, 39.1, 44.5),
        Reference("iformer_l2", 24.5, None, 2.30, None, 83.9, 450, 9.06, 44.6, 41.1, 46.2),
        # Table 8: iFormer-H scales to 99M parameters; the paper reports 84.8 top-1.
        Reference("iformer_h", 99.0, 15.5, None, 84.8, None, None, None, None, None, None),
    )
}


def reference_for(variant: str) -> Optional[Reference]:
    return PAPER.get(variant)
