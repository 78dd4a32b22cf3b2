"""Running a train loop on Ray Train the pipeline's way; shared by pretrain and the dense stages.

:func:`seed_everything` (in each worker) draws every random number of a run
from its seed and picks deterministic kernels; :func:`set_cpu_math` sets its
threads and subnormal flushing; :func:`keep_layouts` keeps a
fused optimizer's tensors in their weights' memory layout.

:func:`fit` starts (or joins) Ray through :func:`cluster.session`, runs a
`TorchTrainer` whose Ctrl-C stays ours, and turns a failed run into one
`ray: ...` line naming the worker, the cause and Ray's own log.
:func:`remember_run` notes the stage's MLflow run beside the Ray run, so a
rerun that resumes the Ray run continues that MLflow run (:func:`recorded_run`).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..core import lifecycle
from ..core.cpus import usable_cpus
from ..errors import PipelineError
from . import cluster

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Python's `random` (timm's crops, erasing and RandAugment; mmcv's transforms), numpy (mixup,
    cutmix) and torch (init, drop path, colour jitter) from `seed`; loader worker processes are
    seeded by torch from their loader's generator. `deterministic` picks deterministic kernels
    (a warning for an op that has none) and, on GPU, cuDNN algorithms without benchmarking.

    Not torch's companion debugging aid, which deterministic mode turns on with it: filling every
    new uninitialised tensor with NaN so that a kernel reading memory it never wrote shows up.
    No result depends on it, and it writes every activation and gradient buffer once more:
    about 3 % of a training step here (iformer_t, 2 threads, median of six interleaved pairs)."""
    import os
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # the aid above
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def compute_threads(cpus: float) -> int:
    """torch's intra-op threads for a worker Ray reserved `cpus` CPUs for: that many, but no more than
    the CPUs this process may run on (a cpuset, `taskset`, a batch scheduler's allocation), which Ray's
    workers inherit and Ray's CPU count does not see. A thread beyond those CPUs only waits in
    OpenMP's barriers for the others to be scheduled."""
    return max(1, min(int(cpus), usable_cpus()))


def set_cpu_math(cpus: float, flush_denormal: bool) -> tuple[int, bool]:
    """A worker's CPU math: subnormal floats (below ~1.2e-38) read and written as zero when
    `flush_denormal` (x86's DAZ and FTZ, torch's `set_flush_denormal`), then `compute_threads(cpus)`
    intra-op threads. Returns the threads and whether every one of them now flushes.

    A CPU takes a slow path, many times slower, for each subnormal operand, and Semantic FPN's
    activations and gradients fill with them as it trains: its 400 default steps took 313 s with
    IEEE subnormals and 121 s flushed here, to the same mIoU. The mode is per thread, and OpenMP's
    threads copy it once, from the thread that creates them: call this before torch's first
    parallel op, or the pool made earlier keeps IEEE subnormals (which the result then says)."""
    import torch

    torch.set_flush_denormal(flush_denormal)
    threads = compute_threads(cpus)
    torch.set_num_threads(threads)
    # 2**-127, a subnormal float32, made and checked as bits: a float conversion or comparison on
    # a flushing thread would flush it itself. Big enough that every thread takes chunks of it.
    probe = torch.full(((1 << 16) * 2 * threads,), 1 << 22, dtype=torch.int32).view(torch.float32)
    return threads, bool(((probe * 1.0).view(torch.int32) == 0).all())


def keep_layouts(optimizer) -> None:
    """Before each step of a fused optimizer, give every gradient and moment its weight's strides.

    The fused kernel walks weights, gradients and moments as flat memory in one pass, and on a
    CPU torch 2.14 does not check that they share a layout: an NHWC (channels_last) weight next
    to an NCHW gradient or moment silently takes other elements' updates. Autograd lays gradients
    out like their weights, but moments loaded from a run in the other layout (`train.resume_from`)
    or a hand-made gradient do not follow. Copies happen only where the strides differ.
    """
    if not optimizer.defaults.get("fused"):
        return
    import torch

    def align(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                strides = p.stride()
                if p.grad is not None and p.grad.stride() != strides:
                    p.grad = torch.empty_like(p).copy_(p.grad)
                state = opt.state.get(p) or {}
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == p.shape and value.stride() != strides:
                        state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    optimizer.register_step_pre_hook(align)


def fit(cfg, root: Path, stage: str, run_name: str, loop, loop_config: dict, scaling, warm=None):
    """`loop(loop_config)` on every worker of `scaling`; returns Ray's Result.

    `warm()`, if given, runs on a thread of its own while this one waits on the run: what the stage
    needs once training ends (its imports), done on the core the workers' start leaves idle. It must
    import nothing Ray imports here (two threads importing one module can meet it half-made; the
    tests pin this), and whatever it fails at is left for the stage's own thread to meet and report."""
    import threading

    from ray.exceptions import RayError
    from ray.train import TrainingFailedError

    log_file = cluster.run_dir(cfg, root, run_name) / "ray.log"
    with cluster.session(cfg, root, stage, log_file) as private:
        job = trainer_class(private)(loop, train_loop_config=loop_config, scaling_config=scaling,
                                     run_config=cluster.run_config(cfg, root, run_name),
                                     torch_config=cluster.torch_config(cfg))
        log.info("Ray's own log: %s", log_file)
        warming = threading.Thread(target=_quietly, args=(warm,), name=f"{stage}-warm", daemon=True) if warm else None
        if warming:
            warming.start()  # before the try: its finally joins only a thread that started
        try:
            result = job.fit()
        except TrainingFailedError as err:
            raise PipelineError(training_failure(err, cfg, log_file)) from None
        except RayError as err:  # the run's controller itself died (Ray's OOM killer, a lost head node)
            raise PipelineError(controller_failure(err, log_file)) from None
        finally:
            if warming:
                warming.join()  # never left importing while the stage goes on (or exits)
        lifecycle.raise_if_stopping()  # a stop signal arrived but Ray's blocking call swallowed its exception
        return result


def _quietly(warm) -> None:
    try:
        warm()
    except Exception as err:  # noqa: BLE001 (the stage's own thread meets it again, and says so)
        log.debug("warm-up: %s", err)


#: Beside the Ray run's lock and log: the MLflow run its stage logs to.
RUN_RECORD = "mlflow_run.json"


def remember_run(cfg, root: Path, run_name: str, mlflow_run_id: str) -> None:
    """Record which MLflow run trains `run_name` (removed with the checkpoints after success)."""
    path = cluster.run_dir(cfg, root, run_name) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"mlflow_run_id": mlflow_run_id}) + "\n")
    tmp.replace(path)


def recorded_run(cfg, root: Path, run_name: str) -> str | None:
    """The MLflow run an earlier attempt at `run_name` logged to, if one is recorded."""
    path = cluster.run_dir(cfg, root, run_name) / RUN_RECORD
    try:
        return json.loads(path.read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: a new run
        return None


def trainer_class(private: bool = False):
    """The pipeline's TorchTrainer; `private`: Ray is the stage's own local one (`cluster.session`)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        """TorchTrainer whose Ctrl-C stays a KeyboardInterrupt, and which starts no actor it has no use for.

        Ray's own SIGINT handler aborts the run and exits 0 or 1; ours lets the
        stage mark its MLflow runs KILLED and shut its local Ray down
        (`lifecycle`). On a cluster the run's actors end with the driver.
        """

        def _register_sigint_handler(self, controller) -> None:
            return None

        def _initialize_and_run_controller(self, **kwargs):
            if private and not self.scaling_config.elasticity_enabled:  # no autoscaler to tell (`compute.scaling`)
                from .scaling import LocalScalingPolicy

                kwargs["scaling_policy"] = LocalScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

        def _create_default_callbacks(self):
            # Each of these starts an actor, a Python process importing Ray Train (~1 s of CPU, while
            # the training worker starts on the same cores): Ray Data's dataset manager, which serves
            # nothing to a loop without Ray Datasets, and the detached placement-group cleaner, which
            # frees a dead controller's reservation on a cluster that outlives it; a stage's private
            # Ray dies with its controller. (Sweeps share one Ray among trials: they keep it.)
            idle = (() if self.datasets else (DatasetsCallback,)) + ((PlacementGroupCleanerCallback,) if private else ())
            return [c for c in super()._create_default_callbacks() if not isinstance(c, idle)]

    return Trainer


def controller_failure(err, log_file: Path) -> str:
    """One line for a Ray Train run whose controller actor is gone."""
    first = (str(err).strip().splitlines() or [""])[0]
    if len(first) > 240:
        first = first[:240] + "…"
    hint = (" (the machine ran low on memory: run fewer things at once, or lower data.loader_workers or the batch size)"
            if type(err).__name__ == "OutOfMemoryError" else "")
    return (f"ray: the Ray Train run was lost: {type(err).__name__}: {first}{hint}; rerun `dvc repro` to resume "
            f"from the last checkpoint (details: {log_file})")


def training_failure(err, cfg, log_file: Path) -> str:
    """One line for a failed Ray Train run: which worker, why, and how to go on.

    Ray reports a dead worker either per rank (WorkerGroupError) or as an
    actor death under the controller (ControllerError); both name the actor
    in an indented `class_name: / pid: / ip:` block when a process died.
    """
    failures = sorted((getattr(err, "worker_failures", None) or {}).items())
    rank, cause = failures[0] if failures else (None, getattr(err, "controller_failure", err))
    text = str(cause)
    found = dict(re.findall(r"^\s*(class_name|pid|ip): (\S+)", text, re.M))
    exit_detail = re.search(r"Worker exit detail: ([^.]*)", text)
    last = text.strip().splitlines()[-1:] or [type(cause).__name__]
    if rank is not None or found.get("class_name") == "RayTrainWorker":
        where = f" pid {found['pid']} on {found.get('ip', '?')}" if "pid" in found else ""
        what = f"training worker{'' if rank is None else f' rank {rank}'}{where} failed"
    else:
        what = "the Ray Train run failed"
    what += f": {exit_detail.group(1) if exit_detail else last[0]}"
    if len(failures) > 1:
        what += f" (and {len(failures) - 1} more workers)"
    bad_input = re.search(r"PipelineError: (.+)", text)
    if bad_input:  # the data or an input is at fault: a rerun alone, from any checkpoint, meets it again
        return f"ray: {what.split(': ')[0]}: {bad_input.group(1).strip()} (details: {log_file})"
    return (f"ray: {what}; rerun `dvc repro` to resume from the last checkpoint"
            + ("" if cfg.ray.max_failures else ", or set ray.max_failures to restart workers by itself")
            + f" (details: {log_file})")
