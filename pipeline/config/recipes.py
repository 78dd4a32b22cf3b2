"""The paper's ImageNet-1K recipes (Table 9 and per-variant settings): one table, `RECIPES`.

Each recipe is a set of overrides on the schema defaults; `config.apply.build`
turns one into a Config and `python -m pipeline.recipes NAME` writes it into
params.yaml. The `*_release` recipes start from the official released weights
instead (`model.weights`, a file in `weights/`) and pass them through unchanged
(`train.epochs: 0`), with ImageNet's evaluation settings, so `dvc repro`
evaluates, exports and times the released network. The dense presets, which
rewrite only their own section, are `config.presets.PRESETS`.
"""
from __future__ import annotations

import copy

# Table 9 plus per-variant settings. The paper's Table 9 lists EMA "None" for
# every variant; following ConvNeXt's large-model recipe (which the paper says it
# follows) and the project spec, H uses EMA 0.9999 alongside layer scale 1e-6.
_PER_VARIANT = {
    #  variant: (drop_path, layer_scale, ema, base_lr, batch, epochs)
    "t": (0.0, 0.0, None, 4e-3, 4096, 300),
    "s": (0.0, 0.0, None, 4e-3, 4096, 300),
    "m": (0.0, 0.0, None, 4e-3, 4096, 300),
    "l": (0.1, 0.0, None, 4e-3, 4096, 300),
    # L2 appears only in the 450-epoch distillation study (Table 12); its drop
    # path is not given, so it takes L's.
    "l2": (0.1, 0.0, None, 4e-3, 4096, 450),
    "h": (0.6, 1e-6, 0.9999, 8e-3, 8192, 300),
}


def _imagenet(v: str, distill: bool) -> dict:
    drop_path, layer_scale, ema, base_lr, batch, epochs = _PER_VARIANT[v]
    return {
        "model": {"variant": f"iformer_{v}", "drop_path": drop_path, "layer_scale": layer_scale},
        "data": {"source": "imagefolder", "image_size": 224, "verify": "header",
                 "loader_workers": 8},
        "aug": {
            "rand_augment": "rand-m9-mstd0.5-inc1", "hflip": 0.5, "scale": [0.08, 1.0],
            "interpolation": "bicubic", "re_prob": 0.25, "mixup": 0.8, "cutmix": 1.0,
            "label_smoothing": 0.1, "crop_pct": 0.875,
        },
        # Linear scaling: lr = base_lr * train.batch_size / base_batch_size.
        "optim": {"base_lr": base_lr, "base_batch_size": batch, "weight_decay": 0.05,
                  "betas": [0.9, 0.999], "clip_grad": None},
        "schedule": {"warmup_epochs": 20, "warmup_lr": 0.0, "min_lr": 1e-6},
        "train": {"epochs": epochs, "batch_size": batch, "ema_decay": ema},
        "distill": {"enabled": distill, "teacher": "regnety_160",
                    "teacher_checkpoint": "teachers/regnety_160.pth",
                    "kind": "hard", "alpha": 0.5},
        "evaluate": {"batch_size": 256},
    }


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# The official v0.9 releases, as timm lists them: plain weights of every variant
# but L2, distilled ones (DeiT head beside the class head) of M, L and L2.
RELEASED = ("t", "s", "m", "l", "h")
RELEASED_DISTILLED = ("m", "l", "l2")


def _release(v: str, distilled: bool) -> dict:
    """The released weights of `v` passed through, evaluated as timm's pretrained config says."""
    return merge(_imagenet(v, distill=False), {
        "model": {"weights": f"weights/iFormer_{v}{'_distill' if distilled else ''}.pth"},
        "train": {"epochs": 0},
        "data": {"image_size": 224},
        "aug": {"crop_pct": 0.875, "interpolation": "bicubic"},
    })


RECIPES: dict[str, dict] = {"digits": {}}
for _v in _PER_VARIANT:
    RECIPES[f"iformer_{_v}"] = _imagenet(_v, distill=False)
    RECIPES[f"iformer_{_v}_distill"] = _imagenet(_v, distill=True)
for _v in RELEASED:
    RECIPES[f"iformer_{_v}_release"] = _release(_v, distilled=False)
for _v in RELEASED_DISTILLED:
    RECIPES[f"iformer_{_v}_distill_release"] = _release(_v, distilled=True)
