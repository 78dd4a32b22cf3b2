"""`pipeline.compute`: which of a local Ray's processes are daemons, and lowering exactly
those (every thread of them). Real child processes titled as Ray titles them (`sleep` or
Python under another argv[0]); no Ray. Also what `seed_everything`'s deterministic mode sets,
and how many threads a training worker computes with, flushing subnormals or not."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import psutil
import pytest

from pipeline.compute.renice import Renicer
from pipeline.errors import PipelineError

PY = "/usr/bin/python3"


@pytest.mark.parametrize("cmdline, name, daemon", [
    # actors and tasks, titled by Ray
    (["ray::RayTrainWorker.train_fn"], "ray::RayTrainWo", False),
    (["ray::RayTrainWorker"], "python", False),
    (["ray::IDLE"], "ray::IDLE", False),  # an idle worker becomes a training worker
    (["ray::TrainController.run"], "ray::TrainContr", True),
    (["ray::DashboardAgent"], "python", True),
    (["ray::RuntimeEnvAgent"], "python", True),
    # Ray's own executables and Python daemons
    (["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--node-ip-address=127.0.0.1"], "gcs_server", True),
    (["/venv/lib/ray/core/src/ray/raylet/raylet", "--node_id=x"], "raylet", False),  # its workers inherit it
    ([PY, "-u", "/venv/lib/ray/dashboard/dashboard.py", "--host=127.0.0.1"], "python3", True),
    ([PY, "-u", "/venv/lib/ray/autoscaler/_private/monitor.py"], "python3", True),
    ([PY, "/venv/lib/ray/_private/workers/default_worker.py", "--node-ip-address=x"], "python3", False),
    ([PY, "-u", "/venv/lib/ray/_private/workers/default_worker.py"], "python3", False),  # starting up
    # no command line to read (a zombie, or another user's): the process name decides
    ([], "raylet", False),
    ([], "gcs_server", True),
])
def test_is_daemon(cmdline, name, daemon):
    assert Renicer.is_daemon(cmdline, name) is daemon


#: A process that starts three more threads, says so, and sleeps.
THREADED = ("import threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "print('3 threads up', flush=True); time.sleep(60)")


def thread_niceness(proc: psutil.Process) -> set[int]:
    """The niceness of each of its threads (on Linux each thread has its own)."""
    return {os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads()}


@pytest.fixture
def base() -> int:
    """This process's niceness, with room above it for the renicer to lower daemons to."""
    niceness = os.nice(0)
    if niceness > 15:
        pytest.skip(f"this process already runs at niceness {niceness}")
    return niceness


@pytest.fixture
def ray_like(tmp_path):
    """Child processes titled like a Ray node's: {title: process}, killed afterwards."""
    sleep = shutil.which("sleep")
    raylet = tmp_path / "raylet"
    raylet.symlink_to(sleep)  # the process name (comm) comes from the path executed
    spawned = {
        "ray::DashboardAgent": subprocess.Popen(["ray::DashboardAgent", "60"], executable=sleep),
        "gcs_server": subprocess.Popen(["/opt/ray/core/src/ray/gcs/gcs_server", "60"], executable=sleep),
        "ray::RayTrainWorker.train_fn": subprocess.Popen(["ray::RayTrainWorker.train_fn", "60"], executable=sleep),
        "ray::IDLE": subprocess.Popen(["ray::IDLE", "60"], executable=sleep),
        "raylet": subprocess.Popen([str(raylet), "60"]),
        # a daemon with threads besides its main one, as Ray's all are (gRPC pollers, event loops)
        "ray::TrainController.run": subprocess.Popen(["ray::TrainController.run", "-c", THREADED],
                                                     executable=PY, stdout=subprocess.PIPE, text=True),
    }
    assert spawned["ray::TrainController.run"].stdout.readline().strip() == "3 threads up"
    yield {title: psutil.Process(p.pid) for title, p in spawned.items()}
    for p in spawned.values():
        p.kill()
        p.wait()


def test_renicer_lowers_only_the_daemons(ray_like, base):
    assert psutil.Process(ray_like["raylet"].pid).name() == "raylet"
    renicer = Renicer(base + 3)  # scans once at once, then every 2 s
    try:
        got = {title: thread_niceness(proc) for title, proc in ray_like.items()}
    finally:
        renicer.stop()
    assert len(ray_like["ray::TrainController.run"].threads()) == 4
    assert got == {"ray::DashboardAgent": {base + 3}, "gcs_server": {base + 3}, "ray::TrainController.run": {base + 3},
                   "ray::RayTrainWorker.train_fn": {base}, "ray::IDLE": {base}, "raylet": {base}}
    assert not renicer.thread.is_alive()


def test_renicer_at_zero_does_nothing(ray_like):
    base = os.nice(0)
    renicer = Renicer(0)
    assert renicer.thread is None
    assert set().union(*map(thread_niceness, ray_like.values())) == {base}
    renicer.stop()


def test_renicer_never_raises_a_daemons_priority(ray_like, base):
    agent = ray_like["ray::DashboardAgent"]
    agent.nice(base + 4)  # already lower than asked
    Renicer(base + 2).stop()
    assert agent.nice() == base + 4


def test_ray_train_polls_at_the_configured_interval():
    """`ray.poll_interval_s` reaches every Ray process through the job's environment, under the
    name Ray Train's controller reads (its default, 2 s, left a finished run waiting)."""
    from ray.train.v2._internal import constants

    from pipeline.compute import cluster
    from pipeline.config import Config

    assert cluster.POLL_ENV == constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert constants.DEFAULT_HEALTH_CHECK_INTERVAL_S == 2.0
    assert cluster.POLL_ENV in constants.ENV_VARS_TO_PROPAGATE  # the driver's value reaches the controller
    cfg = Config.model_validate({"ray": {"poll_interval_s": 1.5}})
    assert cluster._runtime_env_vars(cfg)[cluster.POLL_ENV] == "1.5"
    assert float(cluster._runtime_env_vars(Config())[cluster.POLL_ENV]) == 0.5


def test_a_stages_private_ray_runs_no_dataset_manager_or_placement_group_cleaner():
    """Each of Ray Train's default callbacks here starts one actor, a process of its own: a loop without
    Ray Datasets gets no dataset manager; a stage's private Ray (which dies with its controller) gets no
    placement-group cleaner, while a shared Ray (sweeps, clusters) keeps it. The torch backend stays."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipeline.compute import trainer

    def kinds(private: bool) -> set[type]:
        job = trainer.trainer_class(private)(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
        return {type(c) for c in job._create_default_callbacks()}

    private, shared = kinds(True), kinds(False)
    assert BackendSetupCallback in private and BackendSetupCallback in shared
    assert DatasetsCallback not in private | shared
    assert PlacementGroupCleanerCallback not in private and PlacementGroupCleanerCallback in shared


def test_deterministic_mode_keeps_its_kernels_without_torchs_nan_filling():
    """`train.deterministic` picks deterministic kernels, but not torch's debugging aid that comes
    with them (NaN written into every new tensor, a few % of each step); the seed still decides."""
    import torch

    from pipeline.compute.trainer import seed_everything

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    try:
        with torch.random.fork_rng(), _python_and_numpy_rng_kept():
            seed_everything(7, deterministic=True)
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.utils.deterministic.fill_uninitialized_memory is False
            first = torch.rand(3)
            seed_everything(7, deterministic=True)
            assert torch.equal(torch.rand(3), first)
            seed_everything(7, deterministic=False)
            assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


@contextlib.contextmanager
def _python_and_numpy_rng_kept():
    import random

    import numpy as np

    state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def test_renicer_elsewhere_lowers_the_process(ray_like, base, monkeypatch):
    """Off Linux (macOS) a niceness is the process's and thread ids are no process ids: the
    renicer sets the process's, as `psutil.Process.nice` does (here: the main thread's)."""
    import sys

    monkeypatch.setattr(sys, "platform", "darwin")
    Renicer(base + 3).stop()
    assert {title: proc.nice() for title, proc in ray_like.items()} == {
        "ray::DashboardAgent": base + 3, "gcs_server": base + 3, "ray::TrainController.run": base + 3,
        "ray::RayTrainWorker.train_fn": base, "ray::IDLE": base, "raylet": base}


@contextlib.contextmanager
def pinned_to(cpus: set[int]):
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_compute_threads_never_exceed_the_cpus_this_process_may_run_on():
    from pipeline.compute.trainer import compute_threads

    one = min(os.sched_getaffinity(0))
    with pinned_to({one}):  # as `taskset -c N` or a one-CPU cpuset leave a stage
        assert [compute_threads(c) for c in (0.25, 1.0, 2.0, 16.0)] == [1, 1, 1, 1]
    allowed = len(os.sched_getaffinity(0))
    assert compute_threads(0.5) == 1  # a fractional reservation still computes
    assert compute_threads(1.0) == 1
    assert compute_threads(1.9) == 1  # whole CPUs only, as Ray reserved them
    assert compute_threads(float(allowed)) == allowed
    assert compute_threads(float(allowed + 3)) == allowed


# In a fresh interpreter: the subnormal mode is per thread, and torch's pool copies it when made.
# IEEE 754: x * 1.0 is x, and 0 where a subnormal input reads as zero (DAZ).
SUBNORMALS = """
import json, sys, torch
from pipeline.compute.trainer import set_cpu_math
def kept():  # per element of a tensor big enough that every thread takes chunks of it
    # Made and compared as bits: a float conversion or == would itself flush on a flushing thread.
    x = torch.full((1 << 20,), 1 << 22, dtype=torch.int32).view(torch.float32)  # 2**-127, subnormal
    same = (x * 1.0).view(torch.int32) == x.view(torch.int32)
    half = same.numel() // 2
    return [bool(same[:half].all()), bool(same[half:].all())]
out = {}
if sys.argv[1] == "fresh":
    out["set"] = set_cpu_math(2.0, True)
    out["kept"] = kept()
else:  # torch's pool made before, with IEEE subnormals
    torch.set_num_threads(2)
    out["before"] = kept()
    out["ieee"] = set_cpu_math(2.0, False)
    out["late"] = set_cpu_math(2.0, True)
print(json.dumps(out))
"""


def _subnormals(case: str) -> dict:
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", SUBNORMALS, case], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="DAZ/FTZ are x86's")
def test_a_worker_flushes_subnormals_on_every_thread_when_set_first():
    threads = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    fresh = _subnormals("fresh")
    assert fresh["set"] == [threads, True]
    assert fresh["kept"] == [False, False]  # both halves read as zero, whichever thread computed them
    late = _subnormals("late")
    assert late["before"] == [True, True]  # IEEE by default
    assert late["ieee"] == [threads, False] and late["late"][0] == threads
    # Set after the pool was made, only the calling thread flushes, and the result says so.
    assert late["late"][1] is (threads == 1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_timing_threads_are_checked_against_the_same_cpus_training_is_capped_at():
    from pipeline.deploy.backends import check_threads

    one = min(os.sched_getaffinity(0))
    with pinned_to({one}):
        check_threads(1, "latency.threads")
        with pytest.raises(PipelineError, match=r"^latency.threads: 2 is more than the 1 CPUs"):
            check_threads(2, "latency.threads")


def test_a_stages_private_ray_sends_its_run_no_autoscaling_coordinator(monkeypatch):
    """On a private Ray the controller gets a fixed policy that decides as Ray's does but never creates Ray
    Data's AutoscalingCoordinator (Ray's asserts it was made, and would create it, a process, on the first
    call); a shared Ray (a cluster, sweeps) keeps Ray's own policy, whose requests its autoscaler reads."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from pipeline.compute import trainer
    from pipeline.compute.scaling import LocalScalingPolicy

    scaling = ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})
    policy = LocalScalingPolicy(scaling)
    policy.after_controller_start(type("Context", (), {"run_id": "r1"})())
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision)
    assert (decision.num_workers, decision.resources_per_worker) == (2, {"CPU": 1})
    policy.before_controller_abort()
    assert policy._coordinator_client is None
    with pytest.raises(AssertionError):  # Ray's own policy needs its coordinator client
        FixedScalingPolicy(scaling).make_decision_for_non_running_worker_group()

    seen = {}  # what reaches Ray's controller start (not run here)
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller",
                        lambda self, **kw: seen.setdefault(self, kw["scaling_policy"]))
    for private in (True, False):
        job = trainer.trainer_class(private)(lambda config: None, scaling_config=scaling)
        job._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(scaling))
        assert type(seen[job]) is (LocalScalingPolicy if private else FixedScalingPolicy)


# In a fresh interpreter holding what a stage's driver holds when `trainer.fit` starts its warm-up:
# the three stages' warm-ups one after another, each one's new modules recorded.
WARM_UP = """
import json, sys
import ray, ray.train.torch, torch
from pipeline.classify.pretrain import warm_up
from pipeline.compute.trainer import trainer_class
from pipeline.config import load_config
from pipeline.dense import samples
trainer_class(True)
cfg = load_config("params.yaml")
quiet = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"log_model": False})})
new = {}
for stage, warm in (("pretrain, no model logged", lambda: warm_up(quiet)), ("pretrain", lambda: warm_up(cfg)),
                    ("detection", lambda: samples.warm_up("detection")),
                    ("segmentation", lambda: samples.warm_up("segmentation"))):
    before = set(sys.modules)
    warm()
    new[stage] = sorted(set(sys.modules) - before)
print(json.dumps(new))
"""


def test_a_warm_up_readies_its_stages_end_and_imports_nothing_ray_does_while_the_driver_waits():
    """`trainer.fit` runs a stage's warm-up on a second thread while its own thread is inside Ray
    Train's `fit`, which then imports modules of three packages (Ray 2.60, measured: 23 of
    pydantic.v1, the pydantic 1 API Ray Data's config uses, 10 of Ray, 2 of pyarrow). Two threads
    importing one module can meet a half-initialised one, so a warm-up must import none of those
    (MLflow's PyTorch flavour does import pydantic 2 modules, a package of their own), and it must
    import what the stage uses after training (pretrain: the network and MLflow's model logging, and
    nothing when no model is logged; the dense stages: their sample drawing)."""
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", WARM_UP], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    new = {stage: set(mods) for stage, mods in json.loads(out.stdout.splitlines()[-1]).items()}
    assert new["pretrain, no model logged"] == set(), "its end builds no network and logs no model"
    assert {"timm.data", "mlflow.pytorch", "iformer.models", "torch._dynamo"} <= new["pretrain"]
    assert {"mmdet.apis", "mmdet.visualization", "iformer.dense.registry"} <= new["detection"]
    assert {"mmseg.apis", "mmseg.visualization"} <= new["segmentation"]  # the registry came with detection's
    raced = {m for mods in new.values() for m in mods
             if m.split(".")[0] in ("ray", "pyarrow") or (m + ".").startswith("pydantic.v1.")}
    assert not raced, sorted(raced)


def test_a_warm_up_that_fails_leaves_the_error_to_the_stages_own_thread(caplog):
    from pipeline.compute.trainer import _quietly

    def broken():
        raise ImportError("No module named 'timm'")

    with caplog.at_level("DEBUG", logger="pipeline.compute.trainer"):
        _quietly(broken)  # returns: the stage's own import of timm raises it where it is reported
    assert "No module named 'timm'" in caplog.text
