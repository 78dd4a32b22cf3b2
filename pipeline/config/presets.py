"""The paper's dense fine-tuning settings (Sec. 4.2/4.3, App. B.2) as section presets.

Each preset overrides one section (`detection` or `segmentation`) on its schema
defaults; `python -m pipeline.recipes mask_rcnn_1x -S detection.data.root=...`
writes it into params.yaml and keeps every other section as it is.

- `mask_rcnn_1x`: Mask R-CNN + FPN (256 channels), AdamW lr 2e-4, weight decay
  0.05, linear warm-up 500 iterations, lr x0.1 at epochs 8 and 11, 12 epochs,
  images resized to 1333x800, flip 0.5, batch 16 (2 per GPU on 8 GPUs),
  mmdet's standard proposal and sampling numbers.
- `semantic_fpn_40k`: Semantic FPN (FPN 256, FPNHead 128 channels), AdamW lr
  2e-4, weight decay 1e-4, poly decay (power 0.9), 40k iterations, random
  resize of 2048x512 by 0.5-2.0, crop 512, flip 0.5, batch 32.

Both train in float32 (`amp: none`), as the official configs' plain OptimWrapper.
"""
from __future__ import annotations

PRESETS: dict[str, tuple[str, dict]] = {
    "mask_rcnn_1x": ("detection", {
        "data": {"source": "coco"},
        "model": {"neck_channels": 256, "fc_channels": 1024, "rpn_train_proposals": 1000,
                  "rpn_test_proposals": 1000, "roi_samples": 512, "max_per_image": 100},
        "train": {"epochs": 12, "batch_size": 16, "image_scale": [1333, 800], "flip": 0.5, "lr": 2e-4,
                  "weight_decay": 0.05, "warmup_iters": 500, "milestones": [8, 11], "checkpoint_interval": 1,
                  "log_interval": 50, "amp": "none"},
        "ray": {"num_workers": 8, "cpus_per_worker": 4.0},
    }),
    "semantic_fpn_40k": ("segmentation", {
        "data": {"source": "ade20k"},
        "model": {"neck_channels": 256, "head_channels": 128, "dropout": 0.1},
        "train": {"iters": 40000, "batch_size": 32, "crop_size": 512, "image_scale": [2048, 512],
                  "ratio_range": [0.5, 2.0], "flip": 0.5, "lr": 2e-4, "weight_decay": 1e-4, "power": 0.9,
                  "min_lr": 0.0, "warmup_iters": 0, "checkpoint_interval": 4000, "log_interval": 50,
                  "amp": "none"},
        "ray": {"num_workers": 8, "cpus_per_worker": 4.0},
    }),
}
