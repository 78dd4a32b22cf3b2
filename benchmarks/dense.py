"""The dense stages' training: P8 (one Mask R-CNN step, two RoIAlign gradients) and P9 (a
dense stage's training on Ray Train against the same mmengine Runner in a plain process).

P8: one network, built from params.yaml's `detection` section, trains on digit scenes of
the default size. Its RoI extractors' layers are swapped between
`pipeline.dense.roi_align.RoIAlign` and mmcv's `RoIAlign` running torchvision's kernel,
which is how the stage ran before. The two take turns in blocks of steps, so they see the
same machine state. The script prints the median step time of each and their ratio.

P9: each dense stage's own training (`finetune.fit`: the stage's Ray Train job, its worker,
hooks and checkpoints; no MLflow run) and the Runner that job builds, trained in one process
with the same threads and subnormal mode and no Ray. Same repo, data, initial weights and
seed; the two alternate. Goal: the stage's throughput >= 0.97 x the Runner's, as P1's for the
pretrain stage against a bare loop. The Runner's cores busy (CPU time over wall time) shows
that its threads work.

What is known of the gap (2-core AMD EPYC, finetune_ade20k's P9 schedule, 2026-12-07):
- Every step is slower (median 0.224 s against 0.188 s), not a few of them. The worker gets a
  little less CPU (1.86 cores against 1.92: the daemons take the rest) and does less with it:
  its two training threads are preempted about 250 times a second each (the Runner's: under
  35). Ray's threads wake every 10 ms: each core worker's signal check (hard-coded in Ray) and
  gloo's loop in the worker.
- It is Ray's, not the stage's: Ray Train running the same Runner and none of our worker code
  (a bare TorchTrainer, one worker of 2 CPUs) took 31.3-31.7 s against 27.3-28.0 s plain
  (0.87-0.88); without a torch process group, the same. Bisected, in single runs: the plain
  process beside an idle local Ray, 0.96 (1.86 cores busy); the Runner in a thread of a plain
  Ray actor, 0.91; in a Ray task's main thread, 0.94.
- Not the cause: the controller's poll interval, the checkpoints (0.2 s each), a world-size-1
  gloo group, a training thread that is not the main one, Python's garbage collector (no full
  collection during the steps, in either), and the worker's own other threads (niceness 10 or
  SCHED_BATCH for them from inside the training function: medians 32.9 and 33.5 s against
  31.7 s).
- Tried and not kept: SCHED_BATCH for the daemons' threads (`compute.renice`), so a waking
  daemon would wait for a training thread's slice instead of preempting it. In P9, three
  alternating runs: 31.8 s at niceness 10 alone, 30.8 s with SCHED_BATCH, 31.2 s with
  SCHED_IDLE, plain 29.4 s; P9 then read 0.966 (coco) and 0.878 (ADE20K). But the whole
  finetune_ade20k stage (400 iterations), alternating: 113.3 and 113.2 s of training with it,
  106.7 and 110.1 s without. A gain this small does not survive this machine's noise.
- Since the dense stages train in bf16 here (`*.train.amp: auto`, 2026-12-07; both sides of P9 build
  the same wrapper), 2 reps read: coco 36.7 s against 30.2 s (0.824), ADE20K 29.3 s against 27.1 s
  (0.926). In float32 the day before, one rep read 40.1 / 40.2 s and 37.8 / 34.4 s.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import child_result

#: P9's short schedules (the default data, network and batch): a few minutes a repetition in all.
P9_PARAMS = {
    "mlflow": {"log_model": False},
    "detection": {"train": {"epochs": 2, "milestones": [1]}, "samples": 0},
    "segmentation": {"train": {"iters": 120, "checkpoint_interval": 60}, "samples": 0},
}
P9_STAGES = ("finetune_coco", "finetune_ade20k")


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


def one_training(kind: str, repo: Path, stage: str, tag: str) -> None:
    """Child process of P9: `kind` "stage" (the stage's Ray Train job) or "runner" (its Runner, in
    this process); prints `TRAIN <json>`."""
    from pipeline.config import load_config
    from pipeline.dense import finetune

    os.environ["IFORMER_ROOT"] = str(repo)
    cfg = load_config(repo / "params.yaml")
    inputs = finetune.check_stage(stage)(cfg, repo)
    if kind == "stage":
        cfg.ray.storage_path = repo / "bench_ray"
        inputs.run_name = f"bench-{tag}-{time.time_ns()}"
        seconds, busy = finetune.fit(cfg, repo, inputs, None).metrics["train_seconds"], None
    else:
        seconds, busy = _runner(cfg, inputs)
    print("TRAIN " + json.dumps({"seconds": seconds, "busy": busy}))


def _runner(cfg, inputs) -> tuple[float, float]:
    """`train_loop_per_worker`'s Runner, built and trained here: (wall seconds, cores busy)."""
    from mmengine.config import Config as MMConfig

    from pipeline.core import console
    from pipeline.dense.worker import ChannelsLastRunner, build_config, set_up_process

    set_up_process(getattr(cfg, inputs.task))
    with tempfile.TemporaryDirectory() as work, console.to_log(Path(work) / "mmengine.log"):
        mm = build_config(cfg, inputs.task, inputs.data, work, inputs.init, 1, False, inputs.layer_scale)
        runner = ChannelsLastRunner.from_cfg(MMConfig(mm))
        wall, cpu = time.perf_counter(), time.process_time()
        runner.train()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu / wall


def p9(reps: int) -> None:
    import copy

    from conftest import make_repo, write_weights

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo", copy.deepcopy(P9_PARAMS))
        repo.stage("prepare")
        write_weights(repo)
        repo.stage("prepare_dense")
        for stage in P9_STAGES:
            got: dict[str, list[dict]] = {"stage": [], "runner": []}
            for r in range(reps):
                for kind in (list(got) if r % 2 == 0 else list(got)[::-1]):
                    got[kind].append(child_result(repo, "TRAIN", "_dense", kind, str(repo.path), stage, f"{stage}-{r}"))
            print(*summary(stage, got), sep="\n")


def summary(stage: str, got: dict[str, list[dict]]) -> list[str]:
    """P9's lines from each kind's runs (`{"seconds", "busy"}`): median training seconds, the plain
    Runner's cores busy, and the stage's throughput as a share of the plain Runner's."""
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in got.items()}
    busy = statistics.median(x["busy"] for x in got["runner"])
    head = f"P9 [{stage}, {len(got['stage'])} reps]"
    return [f"{head} training: stage (Ray Train) {med['stage']:.1f} s, plain Runner {med['runner']:.1f} s "
            f"({busy:.2f} cores busy)",
            f"{head} stage / plain Runner throughput: {med['runner'] / med['stage']:.3f} (goal >= 0.97)"]
