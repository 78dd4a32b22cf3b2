"""mmengine config dicts for Mask R-CNN (mmdet) and Semantic FPN (mmseg), built in code.

Everything comes from the validated `detection` / `segmentation` sections and
the prepared data description; no Python config file is ever executed. The
structure follows mmdet's `mask-rcnn_r50_fpn_1x_coco` and mmseg's
`fpn_r50_4xb4-80k_ade20k` with the iFormer backbone in place of ResNet. The
paper's settings are presets (`pipeline/config/presets.py`).
"""
from __future__ import annotations

from pathlib import Path

from iformer.dense.registry import NAME as BACKBONE

# ImageNet statistics in 0-255 RGB, as timm's IFormer was trained.
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def register() -> None:
    """Idempotent: add the types these configs name beyond mmdet's and mmseg's own to their
    registries: the iFormer backbone (both), Mask R-CNN's `roi_align.SeparableRoIExtractor` and
    `amp.AutocastOptimWrapper`."""
    from iformer.dense.registry import register as register_backbone

    from . import amp, roi_align

    register_backbone()
    roi_align.register()
    amp.register()


def backbone(section, variant: str, init: str | None, layer_scale: float | None) -> dict:
    """The IFormerBackbone entry; `layer_scale` as the initial weights have it (None: the official value)."""
    b = section.backbone
    return dict(type=BACKBONE, variant=variant, out_indices=(0, 1, 2, 3), window_size=b.window_size,
                window_stages=(2,), window_chunks=b.window_chunks, window_layout=b.window_layout,
                window_padding=b.window_padding, layer_scale=layer_scale, norm_eval=b.norm_eval,
                drop_path=b.drop_path, pretrained=init)


def channels(variant: str) -> list[int]:
    import timm

    return [f["num_chs"] for f in timm.create_model(variant, pretrained=False, num_classes=0).feature_info]


def native_bf16(use_gpu: bool) -> bool:
    """Whether this machine's training device computes bf16 in hardware: a CUDA GPU that supports
    it (Ampere and later), or a CPU with AVX512-BF16 or AMX, whose bf16 convolutions and matrix
    products oneDNN runs natively. Elsewhere bf16 is emulated, slower than float32."""
    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def precision(amp: str, use_gpu: bool) -> str:
    """`*.train.amp` as it runs here: `auto` is bf16 where `native_bf16`, float32 (none) elsewhere."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(use_gpu) else "none"


def optim_wrapper(train, amp: str, use_gpu: bool) -> dict:
    """The `optim_wrapper` entry of a dense `train` section: AdamW, as mmdet's and mmseg's iFormer
    configs, in precision `amp` (`train.amp` resolved by `precision`; `amp.py`). fp16 on a GPU needs
    loss scaling: mmengine's AmpOptimWrapper, as mmdet's and mmseg's `--amp`. bf16 (float32's
    range) anywhere, and fp16 on the CPU (no scaler there, as pretraining), need autocast alone."""
    optimizer = dict(type="AdamW", lr=train.lr, betas=(0.9, 0.999), weight_decay=train.weight_decay,
                     fused=train.fused_optimizer)
    if amp == "none":
        return dict(type="OptimWrapper", optimizer=optimizer)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[amp]
    if amp == "fp16" and use_gpu:
        return dict(type="AmpOptimWrapper", dtype=dtype, loss_scale="dynamic", optimizer=optimizer)
    return dict(type="AutocastOptimWrapper", dtype=dtype, optimizer=optimizer)


def _training(train, use_gpu: bool) -> dict:
    """What both tasks' training precision sets, resolved once: the optimiser's wrapper and `amp`
    (read by the worker's Runner, `worker.ChannelsLastRunner`, and its first line)."""
    amp = precision(train.amp, use_gpu)
    return dict(amp=amp, optim_wrapper=optim_wrapper(train, amp, use_gpu))


def _runtime(work_dir: str, seed: int, log_interval: int, scope: str) -> dict:
    """What both tasks share: scope, env, logging, no visualisation hook, no auto checkpoints."""
    return dict(
        default_scope=scope,
        work_dir=work_dir,
        randomness=dict(seed=seed, deterministic=False),
        # Ray Train owns the processes and the process group (see pipeline/dense/worker.py).
        launcher="none",
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="gloo")),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=log_interval),
            param_scheduler=dict(type="ParamSchedulerHook"),
            # Checkpoints are written by RayCheckpointHook, which hands them to Ray Train.
            checkpoint=None,
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        log_processor=dict(type="LogProcessor", window_size=log_interval, by_epoch=scope == "mmdet"),
        log_level="WARNING",
        load_from=None,
        resume=False,
    )


def _loader(dataset: dict, batch: int, shuffle: bool, infinite: bool = False) -> dict:
    sampler = "InfiniteSampler" if infinite else "DefaultSampler"
    return dict(batch_size=batch, num_workers=0, persistent_workers=False, drop_last=False,
                sampler=dict(type=sampler, shuffle=shuffle), dataset=dataset)


def detection(cfg, data: dict, work_dir: str, init: str | None, workers: int,
              layer_scale: float | None = None) -> dict:
    """Mask R-CNN with FPN on the iFormer backbone; `data` is the prepare_dense detection entry."""
    d = cfg.detection
    m, t = d.model, d.train
    nc = len(data["classes"])
    root = str(data["root"])
    ch = m.neck_channels
    scale = tuple(t.image_scale)
    metainfo = dict(classes=tuple(data["classes"]))
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=t.flip),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]

    def dataset(split: str, test: bool) -> dict:
        return dict(type="CocoDataset", data_root=root, metainfo=metainfo,
                    ann_file=f"annotations/instances_{split}.json", data_prefix=dict(img=f"{split}/"),
                    filter_cfg=None if test else dict(filter_empty_gt=True, min_size=8),
                    test_mode=test, pipeline=test_pipeline if test else train_pipeline)

    # mmdet's SingleRoIExtractor with mmcv's RoIAlign (aligned, average, adaptive sampling) run by
    # torchvision's forward kernel and, on CPUs, a backward pass on every thread (`roi_align`).
    roi = dict(type="SeparableRoIExtractor", out_channels=ch, featmap_strides=[4, 8, 16, 32])
    align = dict(type="RoIAlign", sampling_ratio=0, aligned=True)
    model = dict(
        type="MaskRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_mask=True,
                               pad_size_divisor=32),
        backbone=backbone(d, cfg.model.variant, init, layer_scale),
        neck=dict(type="FPN", in_channels=channels(cfg.model.variant), out_channels=ch, num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=ch, feat_channels=ch,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(roi, roi_layer=dict(align, output_size=7)),
            bbox_head=dict(
                type="Shared2FCBBoxHead", in_channels=ch, fc_out_channels=m.fc_channels, roi_feat_size=7,
                num_classes=nc, reg_class_agnostic=False,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
            mask_roi_extractor=dict(roi, roi_layer=dict(align, output_size=14)),
            mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=ch, conv_out_channels=ch, num_classes=nc,
                           loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2 * m.rpn_train_proposals, max_per_img=m.rpn_train_proposals,
                              nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                    match_low_quality=True, ignore_iof_thr=-1),
                      sampler=dict(type="RandomSampler", num=m.roi_samples, pos_fraction=0.25, neg_pos_ub=-1,
                                   add_gt_as_proposals=True),
                      mask_size=28, pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=m.rpn_test_proposals, max_per_img=m.rpn_test_proposals,
                     nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=m.max_per_image,
                      mask_thr_binary=0.5)),
    )
    per_worker = t.batch_size // workers
    return dict(
        _runtime(work_dir, t.seed, t.log_interval, "mmdet"),
        model=model,
        train_dataloader=dict(_loader(dataset("train2017", False), per_worker, True),
                              batch_sampler=dict(type="AspectRatioBatchSampler")),
        val_dataloader=_loader(dataset("val2017", True), 1, False),
        test_dataloader=_loader(dataset("val2017", True), 1, False),
        val_evaluator=dict(type="CocoMetric", ann_file=str(Path(root) / "annotations" / "instances_val2017.json"),
                           metric=["bbox", "segm"], format_only=False, classwise=False),
        test_evaluator=dict(type="CocoMetric", ann_file=str(Path(root) / "annotations" / "instances_val2017.json"),
                            metric=["bbox", "segm"], format_only=False, classwise=False),
        # Evaluation runs once, after training (the stage's metrics).
        train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=t.epochs, val_interval=t.epochs + 1),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=max(t.warmup_iters, 1)),
            dict(type="MultiStepLR", begin=0, end=t.epochs, by_epoch=True, milestones=list(t.milestones), gamma=0.1),
        ],
        **_training(t, cfg.ray.use_gpu),
        visualizer=dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
    )


def segmentation(cfg, data: dict, work_dir: str, init: str | None, workers: int,
                 layer_scale: float | None = None) -> dict:
    """Semantic FPN on the iFormer backbone; `data` is the prepare_dense segmentation entry."""
    s = cfg.segmentation
    m, t = s.model, s.train
    nc = len(data["classes"])
    crop = (t.crop_size, t.crop_size)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomResize", scale=tuple(t.image_scale), ratio_range=tuple(t.ratio_range), keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=t.flip),
        dict(type="PhotoMetricDistortion"),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(t.image_scale), keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="PackSegInputs"),
    ]

    def dataset(split: str, pipeline: list) -> dict:
        common = dict(data_root=str(data["root"]), reduce_zero_label=True, pipeline=pipeline,
                      data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"))
        if data["dataset"] == "ADE20KDataset":
            return dict(type="ADE20KDataset", **common)
        return dict(type="BaseSegDataset", img_suffix=".jpg", seg_map_suffix=".png",
                    metainfo=dict(classes=tuple(data["classes"]), palette=data["palette"]), **common)

    in_channels = channels(cfg.model.variant)
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=crop),
        backbone=backbone(s, cfg.model.variant, init, layer_scale),
        neck=dict(type="FPN", in_channels=in_channels, out_channels=m.neck_channels, num_outs=4),
        decode_head=dict(type="FPNHead", in_channels=[m.neck_channels] * 4, in_index=[0, 1, 2, 3],
                         feature_strides=[4, 8, 16, 32], channels=m.head_channels, dropout_ratio=m.dropout,
                         num_classes=nc, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )
    scheduler = [dict(type="PolyLR", eta_min=t.min_lr, power=t.power, begin=t.warmup_iters, end=t.iters,
                      by_epoch=False)]
    if t.warmup_iters:
        scheduler.insert(0, dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=t.warmup_iters))
    return dict(
        _runtime(work_dir, t.seed, t.log_interval, "mmseg"),
        model=model,
        train_dataloader=_loader(dataset("training", train_pipeline), t.batch_size // workers, True, infinite=True),
        val_dataloader=_loader(dataset("validation", test_pipeline), 1, False),
        test_dataloader=_loader(dataset("validation", test_pipeline), 1, False),
        test_pipeline=test_pipeline,  # mmseg's inference API reads it from the top level
        val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        test_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=t.iters, val_interval=t.iters + 1),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        param_scheduler=scheduler,
        **_training(t, cfg.ray.use_gpu),
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
    )
