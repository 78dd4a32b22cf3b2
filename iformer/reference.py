"""The paper's reference figures for each iFormer variant, in one table.

Sources: Table 3 (params, GMACs, iPhone 13 latency at 224, top-1), Table 4 and
Table 12 (top-1 with distillation), Table 5 and Table 13 (Mask R-CNN AP on
COCO, Semantic FPN mIoU on ADE20K, backbone latency at 512x512). `None` means
the paper gives no figure. `BASELINES` holds Table 3's rows of the other
networks (MobileNet, RepViT, FastViT, ...), each with its timm name where timm has
it (the field stage times those), and `TABLE18` the further rows of the
appendix's Table 18, for the report's accuracy-vs-latency plot. The report puts our numbers beside these.
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


@dataclass(frozen=True)
class Baseline:
    """A Table 3 or 18 row of another network (ImageNet-1K; latency on iPhone 13, Core ML)."""

    model: str
    params_m: float
    gmacs: float
    latency_ms: Optional[float]  # None: "Failed" (Core ML ran too long to report, Table 18)
    resolution: int
    epochs: int
    top1: float
    table: int = 3  # the paper's table the row is taken from
    timm: Optional[str] = None  # the same network in timm (1.0.31), for the measured field; None: not in timm


#: Table 3 (classification on ImageNet-1K), the other networks' rows, in the paper's order.
BASELINES: tuple[Baseline, ...] = (
    Baseline("MobileNetV2 1.0x (2018)", 3.4, 0.30, 0.73, 224, 500, 72.0, timm="mobilenetv2_100"),
    Baseline("MobileNetV3-Large 0.75x (2019)", 4.0, 0.16, 0.67, 224, 600, 73.3, timm="mobilenetv3_large_075"),
    Baseline("MNV4-Conv-S (2024)", 3.8, 0.20, 0.60, 224, 500, 73.8, timm="mobilenetv4_conv_small"),
    Baseline("MobileNetV2 1.4x (2018)", 6.9, 0.59, 1.02, 224, 500, 74.7, timm="mobilenetv2_140"),
    Baseline("MobileNetV3-Large 1.0x (2019)", 5.4, 0.22, 0.76, 224, 600, 75.2, timm="mobilenetv3_large_100"),
    Baseline("SwiftFormer-XS (2023)", 3.5, 0.60, 0.95, 224, 300, 75.7, timm="swiftformer_xs"),
    Baseline("SBCFormer-XS (2024)", 5.6, 0.70, 0.79, 224, 300, 75.8),
    Baseline("GhostNetV3 1.0x† (2024)", 6.1, 0.17, 0.99, 224, 600, 77.1, timm="ghostnetv3_100"),
    Baseline("MobileOne-S2 (2023b)", 7.8, 1.30, 0.92, 224, 300, 77.4, timm="mobileone_s2"),
    Baseline("RepViT-M1.0 (2024)", 6.8, 1.10, 0.85, 224, 300, 78.6, timm="repvit_m1_0"),
    Baseline("EfficientMod-xxs (2024)", 4.7, 0.60, 1.29, 224, 300, 76.0),
    Baseline("SBCFormer-S (2024)", 8.5, 0.90, 1.02, 224, 300, 77.7),
    Baseline("MobileOne-S3 (2023b)", 10.1, 1.90, 1.16, 224, 300, 78.1, timm="mobileone_s3"),
    Baseline("SwiftFormer-S (2023)", 6.1, 1.00, 1.12, 224, 300, 78.5, timm="swiftformer_s"),
    Baseline("GhostNetV3 1.3x† (2024)", 8.9, 0.27, 1.24, 224, 600, 79.1, timm="ghostnetv3_130"),
    Baseline("FastViT-T12 (2023a)", 6.8, 1.40, 1.12, 256, 300, 79.1, timm="fastvit_t12"),
    Baseline("RepViT-M1.1 (2024)", 8.2, 1.30, 1.04, 224, 300, 79.4, timm="repvit_m1_1"),
    Baseline("MNV4-Conv-M (2024)", 9.2, 1.00, 1.08, 256, 500, 79.9, timm="mobilenetv4_conv_medium"),
    Baseline("MobileFormer-294M (2022b)", 11.4, 0.29, 2.66, 224, 450, 77.9),
    Baseline("MobileViT-S (2021)", 5.6, 2.00, 3.55, 256, 300, 78.4, timm="mobilevit_s"),
    Baseline("MobileOne-S4 (2023b)", 14.8, 2.98, 1.74, 224, 300, 79.4, timm="mobileone_s4"),
    Baseline("SBCFormer-B (2024)", 13.8, 1.60, 1.44, 224, 300, 80.0),
    Baseline("GhostNetV3 1.6x† (2024)", 12.3, 0.40, 1.49, 224, 600, 80.4, timm="ghostnetv3_160"),
    Baseline("EfficientViT-B1-r288 (2023)", 9.1, 0.86, 3.87, 288, 450, 80.4, timm="efficientvit_b1"),
    Baseline("FastViT-SA12 (2023a)", 10.9, 1.90, 1.50, 256, 300, 80.6, timm="fastvit_sa12"),
    Baseline("MNV4-Hybrid-M (2024)", 10.5, 1.20, 1.75, 256, 500, 80.7, timm="mobilenetv4_hybrid_medium"),
    Baseline("SwiftFormer-L1 (2023)", 12.1, 1.60, 1.60, 224, 300, 80.9, timm="swiftformer_l1"),
    Baseline("EfficientMod-s (2024)", 12.9, 1.40, 2.57, 224, 300, 81.0),
    Baseline("RepViT-M1.5 (2024)", 14.0, 2.30, 1.54, 224, 300, 81.2, timm="repvit_m1_5"),
)


#: Table 18 (the comprehensive ImageNet-1K comparison in the appendix): the rows not in
#: Table 3, in the paper's order. Where Table 18 repeats a Table 3 network, `BASELINES`
#: keeps Table 3's figures (they differ once: RepViT-M1.5 is 1.54 ms in Table 3, 1.64 ms
#: in Table 18). CMT-Ti's GMACs are printed as "687"; 0.687 is meant (it runs at 160 px).
TABLE18: tuple[Baseline, ...] = (
    Baseline("SHViT-S1 (2024)", 6.3, 0.24, 0.74, 224, 300, 72.8, table=18),
    Baseline("ShuffleNetV2 1.0x (2018)", 2.3, 0.15, 0.74, 224, 300, 69.4, table=18),
    Baseline("EfficientNet-B0 (2019)", 5.3, 0.39, 0.89, 224, 350, 77.1, table=18),
    Baseline("LowFormer-B0 (2024)", 14.1, 0.94, 1.45, 224, 300, 78.4, table=18),
    Baseline("CAS-ViT-XS (2024)", 3.2, 0.56, 0.85, 224, 300, 77.5, table=18),
    Baseline("EMO-5M (2023)", 5.1, 0.90, None, 224, 300, 78.4, table=18),
    Baseline("ShuffleNetV2 1.5x (2018)", 3.5, 0.30, 1.16, 224, 300, 72.6, table=18),
    Baseline("EdgeViT-XXS (2022)", 4.1, 0.60, 1.41, 224, 300, 74.4, table=18),
    Baseline("SHViT-S2 (2024)", 11.4, 0.37, 1.10, 224, 300, 75.2, table=18),
    Baseline("EfficientNet-B1 (2019)", 7.8, 0.70, 1.29, 240, 350, 79.1, table=18),
    Baseline("RepNeXt-M3 (2024)", 7.8, 1.30, 1.04, 224, 300, 79.4, table=18),
    Baseline("FastViT-S12 (2023a)", 8.8, 1.80, 1.26, 256, 300, 79.8, table=18),
    Baseline("MobileViT-XXS (2021)", 1.3, 0.40, 2.12, 256, 300, 69.0, table=18),
    Baseline("MobileViTV2-0.5 (2022)", 1.4, 0.50, 9.47, 256, 300, 70.2, table=18),
    Baseline("ShuffleNet v2 2.0x (2018)", 7.4, 0.59, 1.94, 224, 300, 74.9, table=18),
    Baseline("EdgeViT-XS (2022)", 6.7, 1.10, 1.79, 224, 300, 77.5, table=18),
    Baseline("MobileViTV2-1.0 (2022)", 4.9, 1.80, None, 256, 300, 78.1, table=18),
    Baseline("EfficientMod-xs (2024)", 6.6, 0.80, 2.13, 224, 300, 78.3, table=18),
    Baseline("CMT-Ti (2022)", 11.3, 0.687, None, 160, 300, 79.2, table=18),
    Baseline("MobileFormer-508M (2022b)", 14.0, 0.51, 3.33, 224, 450, 79.3, table=18),
    Baseline("SHViT-S4 (2024)", 16.5, 0.99, 1.48, 224, 300, 79.4, table=18),
    Baseline("EfficientViT-B1-r224 (2023)", 9.1, 0.52, 2.38, 224, 350, 79.4, table=18),
    Baseline("LowFormer-B1 (2024)", 17.9, 1.41, 1.90, 224, 300, 79.9, table=18),
    Baseline("EfficientNet-B2 (2019)", 9.2, 1.00, 1.69, 260, 350, 80.1, table=18),
    Baseline("CAS-ViT-S (2024)", 5.8, 0.93, 1.82, 224, 300, 80.2, table=18),
    Baseline("SBCFormer-L (2024)", 18.5, 2.70, 1.89, 224, 300, 81.1, table=18),
    Baseline("LowFormer-B1.5 (2024)", 33.9, 2.57, 3.02, 224, 300, 81.2, table=18),
    Baseline("RepNeXt-M4 (2024)", 13.3, 2.30, 1.47, 224, 300, 81.2, table=18),
    Baseline("CAS-ViT-M (2024)", 12.4, 1.89, 2.46, 224, 300, 81.4, table=18),
)

#: iFormer's own Table 3 rows in the measured field (timm names; the paper's figures are in `PAPER`).
FIELD_IFORMERS = ("iformer_t", "iformer_s", "iformer_m", "iformer_l")

#: Every other network the paper reports, Table 3's rows first.
ALL_BASELINES: tuple[Baseline, ...] = BASELINES + TABLE18
