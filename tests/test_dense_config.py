"""Dense configs: built in code from params.yaml, paper presets, schema errors, DVC stages."""
import copy

import pytest
import yaml

from conftest import DET_DATA, ROOT, SEG_DATA
from pipeline.core import layout
from pipeline.config import apply
from pipeline.config import Config, parse_config
from pipeline.dense import configs
from pipeline.dense.scenes import SEG_CLASSES
from pipeline.dense.worker import build_config
from pipeline.errors import PipelineError


def _types(pipeline):
    return [step["type"] for step in pipeline]


def test_detection_config_builds_a_mask_rcnn_with_the_iformer_backbone():
    from mmdet.registry import MODELS
    from mmengine.config import Config as MMConfig
    from mmengine.registry import init_default_scope

    from iformer.dense.backbone import IFormerBackbone

    cfg = Config()
    mm = MMConfig(build_config(cfg, "detection", DET_DATA, "/tmp/w", "init.pt", 1, False))
    assert mm.launcher == "none" and mm.default_scope == "mmdet"
    assert mm.train_dataloader.dataset.ann_file == "annotations/instances_train2017.json"
    assert mm.val_evaluator.metric == ["bbox", "segm"]
    assert mm.train_cfg.max_epochs == cfg.detection.train.epochs
    assert mm.optim_wrapper.optimizer.lr == cfg.detection.train.lr
    assert mm.model.backbone.pretrained == "init.pt"
    configs.register()
    init_default_scope("mmdet")
    model = MODELS.build(dict(mm.model, backbone=dict(mm.model.backbone, pretrained=None)))
    assert type(model).__name__ == "MaskRCNN" and isinstance(model.backbone, IFormerBackbone)
    # params.yaml's backbone is the official one: its windows, its layer scale (none for iformer_t)
    b = model.backbone
    assert (b.window_size, b.window_layout, b.window_padding, b.layer_scale) == (16, "official", "zeros", 0.0)
    assert model.roi_head.bbox_head.num_classes == 10 and model.roi_head.mask_head.num_classes == 10
    assert model.neck.lateral_convs[0].conv.in_channels == 32  # iformer_t's stride-4 map



def test_roi_align_keeps_mmcvs_results_and_its_gradient_is_torchvisions():
    """Both RoI extractors keep mmcv's RoIAlign (aligned, average, adaptive sampling): on NCHW and
    on NHWC maps their features and gradients equal mmcv's own CPU kernel's on the NCHW map."""
    import torch
    from mmcv.ops import RoIAlign as MMCVRoIAlign
    from mmdet.registry import MODELS
    from mmengine.config import Config as MMConfig
    from mmengine.registry import init_default_scope

    from pipeline.dense.roi_align import RoIAlign

    mm = MMConfig(build_config(Config(), "detection", DET_DATA, "/tmp/w", None, 1, False))
    configs.register()
    init_default_scope("mmdet")
    torch.manual_seed(0)
    feat = torch.randn(2, 8, 24, 24)
    # batch index, x1, y1, x2, y2 in image pixels (stride 4): small, large, off the edge
    rois = torch.tensor([[0, 3.0, 5.0, 17.0, 30.0], [1, 10.0, 2.0, 90.0, 60.0], [0, 80.0, 70.0, 110.0, 99.0]])
    for key, size in (("bbox_roi_extractor", 7), ("mask_roi_extractor", 14)):
        extractor = MODELS.build(mm.model.roi_head[key])
        assert type(extractor).__name__ == "SeparableRoIExtractor" and len(extractor.roi_layers) == 4
        layer = extractor.roi_layers[0]
        assert type(layer) is RoIAlign and isinstance(layer, MMCVRoIAlign)
        assert layer.aligned and layer.pool_mode == "avg" and layer.sampling_ratio == 0
        assert [m.spatial_scale for m in extractor.roi_layers] == [0.25, 0.125, 0.0625, 0.03125]
        mmcv_own = MMCVRoIAlign(size, spatial_scale=0.25, sampling_ratio=0, aligned=True)
        theirs_in = feat.clone().requires_grad_()
        theirs = mmcv_own(theirs_in, rois)
        weights = torch.randn_like(theirs)
        (theirs * weights).sum().backward()
        for layout in (torch.contiguous_format, torch.channels_last):
            mine = feat.clone().to(memory_format=layout).requires_grad_()
            ours = layer(mine, rois)
            assert ours.shape == (3, 8, size, size)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            (ours * weights).sum().backward()
            torch.testing.assert_close(mine.grad, theirs_in.grad, rtol=0, atol=1e-5)
            assert mine.grad.abs().sum() > 0


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_the_separable_roi_align_gradient_is_torchvisions_in_float64(aligned, sampling_ratio):
    """RoIAlign's backward pass as two matrix products (`roi_align.separable_backward`) against
    torchvision's own serial kernel, in float64 so that only the order of the sums may differ: RoIs on
    every image in any order, half off the map, wider than it, a point, and one with no RoI at all."""
    import torch
    from torchvision.ops import roi_align as torchvision_roi_align

    from pipeline.dense.roi_align import RoIAlign

    torch.manual_seed(1)
    feat = torch.randn(4, 5, 17, 23, dtype=torch.float64)  # image 3 has no RoI
    corner = torch.rand(40, 2, dtype=torch.float64) * torch.tensor([23.0, 17.0]) * 4 - 8
    rois = torch.cat([torch.randint(0, 3, (40, 1)).double(), corner,
                      corner + torch.rand(40, 2, dtype=torch.float64) * 60], 1)
    rois[0, 3:] = rois[0, 1:3]  # a point
    rois[1, 1:] = torch.tensor([-20.0, -10.0, 130.0, 90.0])  # past every edge
    layer = RoIAlign((7, 6), spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)
    mine, theirs = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    ours = layer(mine, rois)
    expected = torchvision_roi_align(theirs, rois, (7, 6), 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)  # torchvision's forward kernel itself
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    assert mine.grad[3].abs().max() == 0 and mine.grad[:3].abs().min() < mine.grad[:3].abs().max()


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_channels_last_networks_step_as_nchw_ones(tmp_path, task):
    """`*.train.channels_last`: the worker's Runner puts every 4-D weight in NHWC memory before it
    wraps the network (and leaves it NCHW when the flag is off); on one real training batch of the
    digit scenes the NHWC network's losses and gradients are the NCHW network's, to float rounding
    (Mask R-CNN's RoIAlign and its separable backward pass included)."""
    import copy

    import torch
    from mmengine.config import Config as MMConfig

    from pipeline.dense import scenes
    from pipeline.dense.worker import ChannelsLastRunner

    scenes.write(tmp_path, train=4, val=2, size=64, per_scene=(1, 3), digit_size=(18, 26), seed=3)
    data = (dict(DET_DATA, root=str(tmp_path / "coco")) if task == "detection"
            else dict(SEG_DATA, root=str(tmp_path / "ade20k")))
    configs.register()
    mm = build_config(Config(), task, data, str(tmp_path / "work"), None, 1, False)
    assert mm["channels_last"] is True  # params.yaml's default
    # mmengine keys its default scope and logger by the experiment's name (by default the second
    # the Runner started): each Runner in this process gets its own.
    mm["experiment_name"] = f"{task}-nhwc"
    runner = ChannelsLastRunner.from_cfg(MMConfig(mm))
    nhwc = runner.model
    weights = [p for p in nhwc.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert any(not p.is_contiguous() for p in weights)  # converted (1x1 and depthwise kernels are both at once)
    kept = ChannelsLastRunner.from_cfg(MMConfig(dict(mm, channels_last=False, work_dir=str(tmp_path / "off"),
                                                     experiment_name=f"{task}-nchw")))
    assert all(p.is_contiguous() for p in kept.model.parameters())

    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    batch = next(iter(runner.train_dataloader))
    seen = []
    for model in (nchw, nhwc):
        model.train()
        torch.manual_seed(0)  # the RPN's and RoI head's samplers draw the same boxes
        loss, logs = model.parse_losses(model(**model.data_preprocessor(batch, True), mode="loss"))
        loss.backward()
        seen.append(({k: float(v) for k, v in logs.items()},
                     {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (losses, grads), (nhwc_losses, nhwc_grads) = seen
    assert losses["loss"] > 0 and losses.keys() == nhwc_losses.keys()
    # Float rounding only: NHWC sums in another order (BatchNorm's batch statistics too), which from a
    # random start moved Mask R-CNN's loss by 5e-5 of itself and all its gradients together by 0.5 %
    # (the Semantic FPN's by 0.02 %). A wrong kernel shows: mmcv's own CPU RoIAlign on NHWC maps moved
    # the loss by 0.7 % and the gradients by 86 %.
    for k in losses:
        assert nhwc_losses[k] == pytest.approx(losses[k], rel=5e-4, abs=1e-6), k
    assert len(grads) == len(nhwc_grads) > 100
    off = sum(float(((nhwc_grads[n] - g) ** 2).sum()) for n, g in grads.items()) ** 0.5
    norm = sum(float((g ** 2).sum()) for g in grads.values()) ** 0.5
    assert off <= 0.02 * norm, (off, norm)


def test_segmentation_config_builds_a_semantic_fpn():
    from mmengine.config import Config as MMConfig
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = Config()
    mm = MMConfig(build_config(cfg, "segmentation", SEG_DATA, "/tmp/w", None, 1, False))
    ds = mm.train_dataloader.dataset
    assert ds.type == "BaseSegDataset" and ds.reduce_zero_label and ds.metainfo.classes == SEG_CLASSES
    assert "LoadAnnotations" in _types(ds.pipeline) and mm.train_cfg.max_iters == cfg.segmentation.train.iters
    assert mm.val_evaluator.type == "IoUMetric"
    configs.register()
    init_default_scope("mmseg")
    model = MODELS.build(mm.model)
    assert type(model).__name__ == "EncoderDecoder" and model.decode_head.num_classes == len(SEG_CLASSES)
    ade = MMConfig(build_config(cfg, "segmentation", dict(SEG_DATA, dataset="ADE20KDataset"), "/tmp/w", None, 1,
                                False))
    assert ade.train_dataloader.dataset.type == "ADE20KDataset"


def test_several_workers_join_rays_process_group():
    cfg = Config()
    two = build_config(cfg, "segmentation", SEG_DATA, "/tmp/w", None, 2, False)
    assert two["launcher"] == "pytorch"  # mmengine joins the group Ray initialised, never starts one
    assert two["model_wrapper_cfg"]["device_ids"] is None  # CPU DDP
    assert two["train_dataloader"]["batch_size"] == cfg.segmentation.train.batch_size // 2
    gpu = build_config(cfg, "segmentation", SEG_DATA, "/tmp/w", None, 2, True)
    assert "device_ids" not in gpu["model_wrapper_cfg"]


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_paper_presets_rewrite_only_their_section():
    keep = _params()
    keep["model"]["variant"] = "iformer_m"
    det = apply.build("mask_rcnn_1x", keep=keep, overrides={"detection.data.root": "/data/coco"})
    assert det.model.variant == "iformer_m" and det.segmentation == Config().segmentation
    mm = configs.detection(det, DET_DATA, "/tmp/w", None, det.detection.ray.num_workers)
    opt = mm["optim_wrapper"]["optimizer"]
    assert (opt["type"], opt["lr"], opt["weight_decay"]) == ("AdamW", 2e-4, 0.05)
    warmup, steps = mm["param_scheduler"]
    assert warmup["type"] == "LinearLR" and warmup["end"] == 500 and not warmup["by_epoch"]
    assert steps["milestones"] == [8, 11] and mm["train_cfg"]["max_epochs"] == 12
    resize = mm["train_dataloader"]["dataset"]["pipeline"][2]
    assert resize == {"type": "Resize", "scale": (1333, 800), "keep_ratio": True}
    assert mm["model"]["neck"]["out_channels"] == 256
    assert mm["train_dataloader"]["batch_size"] * det.detection.ray.num_workers == 16

    seg = apply.build("semantic_fpn_40k", keep=keep, overrides={"segmentation.data.root": "/data/ade"})
    mm = configs.segmentation(seg, dict(SEG_DATA, dataset="ADE20KDataset"), "/tmp/w", None,
                              seg.segmentation.ray.num_workers)
    opt = mm["optim_wrapper"]["optimizer"]
    assert (opt["type"], opt["lr"], opt["weight_decay"]) == ("AdamW", 2e-4, 1e-4)
    (poly,) = mm["param_scheduler"]
    assert poly["type"] == "PolyLR" and poly["power"] == 0.9 and poly["end"] == 40000
    steps = {s["type"]: s for s in mm["train_dataloader"]["dataset"]["pipeline"]}
    assert steps["RandomCrop"]["crop_size"] == (512, 512)
    assert steps["RandomResize"]["scale"] == (2048, 512) and steps["RandomResize"]["ratio_range"] == (0.5, 2.0)
    assert mm["model"]["decode_head"]["channels"] == 128 and mm["model"]["neck"]["out_channels"] == 256
    assert mm["train_dataloader"]["batch_size"] * seg.segmentation.ray.num_workers == 32


def test_preset_without_data_root_is_refused():
    with pytest.raises(PipelineError, match="detection.data.root is required"):
        apply.build("mask_rcnn_1x", keep=_params())


@pytest.mark.parametrize("path, value, needle", [
    ("detection.train.milestones", [2, 9], "detection.train.milestones [2, 9] must increase within"),
    ("detection.train.batch_size", 0, "detection.train.batch_size = 0"),
    ("detection.data.digit_size", [40, 20], "detection.data.digit_size = [40, 20]"),
    ("detection.data.source", "coco", "detection.data.root is required"),
    ("segmentation.data.source", "cityscapes", "segmentation.data.source = 'cityscapes'"),
    ("segmentation.train.ratio_range", [2.0, 0.5], "segmentation.train.ratio_range"),
    ("segmentation.backbone.window_chunks", 0, "segmentation.backbone.window_chunks = 0"),
    ("detection.backbone.window_layout", "swin", "detection.backbone.window_layout = 'swin'"),
    ("segmentation.model.heads", 3, "segmentation.model.heads = 3: unknown key"),
    ("detection.train.amp", "fp8", "detection.train.amp = 'fp8'"),
])
def test_bad_dense_values_name_their_field(path, value, needle):
    with pytest.raises(PipelineError) as err:
        parse_config(apply.with_dotted(_params(), {path: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_batch_must_divide_over_dense_workers():
    data = _params()
    data["segmentation"]["ray"]["num_workers"] = 3
    with pytest.raises(PipelineError, match=r"segmentation.train.batch_size \(16\) must be divisible by "
                                            r"segmentation.ray.num_workers \(3\)"):
        parse_config(data)


def test_dvc_stages_follow_layout():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(dvc) == set(layout.STAGES)
    order = [s for s in layout.STAGES if s in ("evaluate", "prepare_dense", "finetune_coco", "finetune_ade20k",
                                              "report")]
    assert order == ["evaluate", "prepare_dense", "finetune_coco", "finetune_ade20k", "report"]
    for stage in ("prepare_dense", "finetune_coco", "finetune_ade20k"):
        assert dvc[stage]["cmd"] == f"python -m stages.{stage}"
        assert dvc[stage]["outs"] == [{f"artifacts/{stage}": {"persist": True}}]
        assert f"stages/{stage}.py" in dvc[stage]["deps"]
    for stage, task in (("finetune_coco", "detection"), ("finetune_ade20k", "segmentation")):
        assert dvc[stage]["metrics"] == [{f"metrics/{stage}.json": {"cache": False, "persist": True}}]
        assert "artifacts/prepare_dense" in dvc[stage]["deps"]
        assert {"artifacts/pretrain", "weights"} <= set(dvc[stage]["deps"])  # where backbone.checkpoint may live
        assert f"metrics/{stage}.json" in dvc["report"]["deps"]
    assert Config().detection.backbone.checkpoint.as_posix() == "artifacts/pretrain/model.pt"


def test_params_keep_dense_sections_spelled_out():
    written = _params()
    assert parse_config(copy.deepcopy(written)).detection == Config().detection
    assert set(written["detection"]) == {"data", "backbone", "model", "train", "ray", "samples"}
