"""P8: a Mask R-CNN training step with the separable RoIAlign gradient against torchvision's own.

One network, built from params.yaml's `detection` section, trains on digit scenes of
the default size. Its RoI extractors' layers are swapped between
`pipeline.dense.roi_align.RoIAlign` and mmcv's `RoIAlign` running torchvision's kernel,
which is how the stage ran before. The two take turns in blocks of steps, so they see the
same machine state. The script prints the median step time of each and their ratio.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def _swap(model, make) -> None:
    """Replace every RoIAlign layer of `model` with `make(output_size, spatial_scale, sampling_ratio, aligned)`."""
    for extractor in (model.roi_head.bbox_roi_extractor, model.roi_head.mask_roi_extractor):
        for i, old in enumerate(extractor.roi_layers):
            extractor.roi_layers[i] = make(old.output_size, old.spatial_scale, old.sampling_ratio, old.aligned)


def p8(reps: int, steps: int = 10) -> None:
    from mmcv.ops import RoIAlign as MMCVRoIAlign
    from mmengine.config import Config as MMConfig

    from conftest import DET_DATA, ROOT
    from pipeline.compute.trainer import seed_everything, set_cpu_math
    from pipeline.config import load_config
    from pipeline.core import console
    from pipeline.dense import configs, scenes
    from pipeline.dense.roi_align import RoIAlign
    from pipeline.dense.worker import ChannelsLastRunner, build_config

    cfg = load_config(ROOT / "params.yaml")
    d = cfg.detection
    threads, _ = set_cpu_math(d.ray.cpus_per_worker, d.train.flush_denormal)
    seed_everything(d.train.seed, deterministic=True)
    configs.register()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scenes.write(tmp, train=64, val=2, size=d.data.scene_size, per_scene=tuple(d.data.digits_per_scene),
                     digit_size=tuple(d.data.digit_size), seed=d.data.seed)
        with console.to_log(tmp / "mmengine.log"):
            mm = build_config(cfg, "detection", dict(DET_DATA, root=str(tmp / "coco")), str(tmp / "work"), None, 1,
                              False)
            runner = ChannelsLastRunner.from_cfg(MMConfig(mm))
            model, wrapper = runner.model, runner.build_optim_wrapper(runner.optim_wrapper)
            model.train()
            batches = list(runner.train_dataloader)
            times = {"separable": [], "torchvision": []}
            layers = {"separable": lambda size, scale, ratio, aligned: RoIAlign(size, scale, ratio, "avg", aligned),
                      "torchvision": lambda size, scale, ratio, aligned: MMCVRoIAlign(
                          size, scale, ratio, "avg", aligned, use_torchvision=True)}
            for r in range(reps + 1):  # the first round warms both up and is not counted
                for name in (list(times) if r % 2 else list(times)[::-1]):
                    _swap(model, layers[name])
                    for i in range(steps):
                        start = time.perf_counter()
                        model.train_step(batches[(r * steps + i) % len(batches)], wrapper)
                        if r:
                            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    head = f"P8 [Mask R-CNN step, batch {d.train.batch_size}, {d.data.scene_size} px scenes, {threads} threads]"
    for name, m in med.items():
        print(f"{head} {name} RoIAlign gradient: median {1000 * m:.0f} ms over {len(times[name])} steps")
    print(f"{head} separable / torchvision: {med['separable'] / med['torchvision']:.3f}")
