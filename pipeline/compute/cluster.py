"""Ray: connect to a cluster or start a private local one, and describe a Train run.

`ray.address` (or `RAY_ADDRESS`) names a cluster; `check` probes it with a
bounded timeout before any run is opened. Without one, `session` starts a local
Ray that belongs to this process alone (`local`: loopback only, token
authentication, its own temp dir), fate-shared: a reaper (`lifecycle.reaper`)
stops every process of this Ray and removes the temp dir once this process is
gone, even after a SIGKILL, and `lifecycle` makes this process die with `dvc`;
a session that ends normally ends whatever Ray's shutdown left itself
(`lifecycle.end_marked`). Its training workers run at normal CPU priority
(Ray's default starts workers at niceness 15, below its own daemons) and its
daemons and helper actors at a lower one (`renice`); torch's rendezvous store
for the training workers stays on loopback too (`rendezvous`).

Ray's own console chatter goes to a log file (`console.attach`); only our lines
reach the terminal.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core import console, layout, lifecycle
from ..errors import PipelineError
from . import local
from .renice import Renicer

log = logging.getLogger(__name__)

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
#: What the workers need to reach the tracking server; credentials come from
#: the driver's environment, never from params.yaml.
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH")


def address(cfg) -> str | None:
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def _host_port(addr: str) -> tuple[str, int] | None:
    """host and port of a GCS (`host:port`) or Ray Client (`ray://host:port`) address."""
    bare = addr.split("://", 1)[-1].rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check(cfg, own=None, prefix: str = "ray") -> None:
    """Fail within `ray.connect_timeout_s` when the configured cluster does not answer.

    Ray's own connect retries for minutes; this probe runs before any MLflow
    run is opened. `auto` is resolved by Ray itself when it connects. A
    cluster also needs storage and a tracking store its workers can reach
    (`check_storage`, `check_tracking`). Without a cluster, the workers of
    `own` (a stage's `ray` block, named `prefix`; else `ray`) must fit the
    private local Ray (`check_fits`).
    """
    addr = address(cfg)
    if not addr:
        check_fits(cfg, own or cfg.ray, prefix)
        return
    if addr != "auto":  # `auto` is resolved by Ray itself when it connects
        _probe(cfg, addr)
    check_storage(cfg, addr)
    check_tracking(cfg, addr)


def local_cpus(cfg) -> int:
    """The logical CPUs a stage's private local Ray offers: `ray.local_num_cpus`, else the machine's,
    as Ray counts them. Under a narrower cpuset or `taskset` a worker still starts, and computes
    with as many threads as it may run on (`trainer.compute_threads`)."""
    return cfg.ray.local_num_cpus or os.cpu_count() or 1


def check_fits(cfg, own, prefix: str) -> None:
    """The workers must fit the private local Ray: Ray Train would wait for CPUs or GPUs that never
    come, give up after a minute (`WorkerGroupStartupTimeoutError`) and try again, without end."""
    cpus, need = local_cpus(cfg), own.num_workers * own.cpus_per_worker
    if need > cpus + 1e-9:
        offer = "ray.local_num_cpus" if cfg.ray.local_num_cpus else "this machine's CPUs"
        raise PipelineError(f"{prefix}.num_workers x {prefix}.cpus_per_worker: {own.num_workers} x "
                            f"{own.cpus_per_worker:g} = {need:g} CPUs, more than the {cpus} the local Ray offers "
                            f"({offer}); ask for fewer, or name a Ray cluster in ray.address")
    if cfg.ray.use_gpu:
        import torch

        gpus, need = torch.cuda.device_count(), own.num_workers * cfg.ray.gpus_per_worker
        if need > gpus + 1e-9:
            raise PipelineError(f"ray.use_gpu: {prefix}.num_workers x ray.gpus_per_worker = {own.num_workers} x "
                                f"{cfg.ray.gpus_per_worker:g} = {need:g} GPUs, more than the {gpus} CUDA devices "
                                "this machine shows the local Ray; set ray.use_gpu: false to train on CPUs, or "
                                "name a Ray cluster in ray.address")


def _probe(cfg, addr: str) -> None:
    hp = _host_port(addr)
    field = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    if hp is None:
        raise PipelineError(f"{field}: {addr!r} is not host:port or ray://host:port")
    try:
        with socket.create_connection(hp, timeout=cfg.ray.connect_timeout_s):
            pass
    except OSError as err:
        raise PipelineError(f"{field}: nothing answers at {addr} within {cfg.ray.connect_timeout_s:g} s "
                            f"({err.strerror or err}); start the cluster or fix the address") from None


def check_storage(cfg, addr: str) -> None:
    """A cluster's workers write checkpoints on their own nodes: a path inside this repo is not shared.

    Ray Train V2 persists every checkpoint to `storage_path` from the worker
    that reports it and restores from there after a restart, on whatever node,
    so the path must name the same place on every node. An absolute path is
    taken as a shared mount (it is the user's statement); a URI is remote storage.
    """
    sp = str(cfg.ray.storage_path)
    if "://" in sp or Path(sp).is_absolute():
        return
    raise PipelineError(f"ray.storage_path: {sp!r} is a directory inside this repo, which only this machine "
                        f"reaches; a run on the Ray cluster at {addr} can place its workers on any node, and Ray "
                        "Train writes and restores checkpoints from each of them, so it needs storage every node "
                        "reaches: an absolute path on a shared mount (NFS) or a URI (s3://, gs://, abfs://, ...)")


def check_tracking(cfg, addr: str) -> None:
    """A cluster's workers log to MLflow from other machines: a local file or sqlite store cannot serve them."""
    from ..tracking import runs

    uri = runs.tracking_uri(cfg, layout.repo_root())
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else "file"
    if scheme in ("file", "sqlite"):
        raise PipelineError(f"mlflow.tracking_uri / MLFLOW_TRACKING_URI: {uri} is a local store, which the "
                            f"workers of the Ray cluster at {addr} cannot log to; start a tracking server "
                            "(`mlflow server`) every node reaches and set mlflow.tracking_uri or "
                            "MLFLOW_TRACKING_URI to its http(s):// address")


def _runtime_env_vars(cfg) -> dict:
    env = {k: os.environ[k] for k in (*TRACKING_ENV, "MLFLOW_DISABLE_TELEMETRY", "IFORMER_ROOT") if k in os.environ}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Train V2 tees print() into its logger as well, which doubles every line.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    # Train V2's controller polls its workers this often; at Ray's 2 s a finished run
    # waited up to 2 s to be noticed, and a stage's start and end ~3 s in all.
    env[POLL_ENV] = str(cfg.ray.poll_interval_s)
    return env


def _connect(cfg, addr: str) -> None:
    import ray

    # Ship our packages to the cluster's workers; their other dependencies
    # are the cluster image's (same pins as pyproject.toml).
    import iformer
    import pipeline

    runtime_env = {"env_vars": _runtime_env_vars(cfg),
                   "py_modules": [str(Path(iformer.__file__).parent), str(Path(pipeline.__file__).parent)]}
    log.info("connecting to Ray cluster at %s", addr)
    try:
        ray.init(address=addr, runtime_env=runtime_env, configure_logging=False, log_to_driver=True)
    except Exception as err:  # ConnectionError, RuntimeError, ValueError, AuthenticationError from ray
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"ray.address / RAY_ADDRESS: cannot connect to {addr} ({first}); "
                            "a cluster with token authentication needs RAY_AUTH_MODE=token and "
                            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH in the environment") from None


@contextmanager
def session(cfg, root: Path, stage: str, log_file: Path) -> Iterator[bool]:
    """Ray for the duration of the block: the configured cluster, or a private local one.

    Ray's console output goes to `log_file`; lines our workers print with the
    stage's `[stage]` prefix are shown. A local Ray is shut down and its temp
    dir removed when the block ends, however it ends. The block is given
    whether this Ray is the private local one started for it.
    """
    import ray

    if ray.is_initialized():  # already set up by this process (tests, sweeps)
        yield False
        return
    addr = address(cfg)
    tmp = renicer = None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with console.ray_output(stage, log_file):
        try:
            if addr:
                _connect(cfg, addr)
            else:
                tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
                lifecycle.reaper("RAY_AUTH_TOKEN_PATH", str(tmp / local.TOKEN_FILE))
                local.start(local_cpus(cfg), tmp, _runtime_env_vars(cfg))
                renicer = Renicer(cfg.ray.local_daemon_niceness)
            lifecycle.handle_signals()
            console.attach(stage, log_file)
            yield tmp is not None
        finally:
            if renicer is not None:
                renicer.stop()
            console.detach()
            if ray.is_initialized():
                if tmp is not None:
                    local.end_autoscaler_monitor()
                ray.shutdown()
            if tmp is not None:
                # What Ray's daemons started themselves; then the stage's exit can skip
                # the interpreter's teardown (`lifecycle.exit_now`) and still leave nothing.
                lifecycle.end_marked("RAY_AUTH_TOKEN_PATH", str(tmp / local.TOKEN_FILE))
                os.environ.pop(local.API_SERVER_ENV, None)
                shutil.rmtree(tmp, ignore_errors=True)


def storage_path(cfg, root: Path) -> str:
    sp = str(cfg.ray.storage_path)
    if "://" in sp:
        return sp
    p = Path(sp)
    return str(p if p.is_absolute() else (layout.state_root(root) / p).resolve())


def run_dir(cfg, root: Path, name: str) -> Path:
    """A local directory for the Ray run's lock and log: inside it when storage is local."""
    sp = storage_path(cfg, root)
    if "://" in sp:
        return layout.state_root(root) / "ray_runs" / name
    return Path(sp) / name


def scaling_config(cfg, section=None):
    """Workers from `section` (a stage's own `ray` block: num_workers, cpus_per_worker), else `ray`."""
    from ray.train import ScalingConfig

    r, own = cfg.ray, section or cfg.ray
    resources = {"CPU": own.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    return ScalingConfig(num_workers=own.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources)


def torch_config(cfg):
    """gloo on CPU, NCCL on GPU; on the local Ray, the rendezvous store stays on loopback."""
    from ray.train.torch import TorchConfig

    backend = cfg.ray.backend
    if backend == "auto":
        backend = "nccl" if cfg.ray.use_gpu else "gloo"
    if address(cfg) is None:
        from .rendezvous import LoopbackTorchConfig

        return LoopbackTorchConfig(backend=backend)
    return TorchConfig(backend=backend)


def run_config(cfg, root: Path, name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.v2.api.config import LoggingConfig

    return RunConfig(
        name=name,
        storage_path=storage_path(cfg, root),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        # Ray Train's INFO lines (resource requests, each report) stay in its
        # session log files; warnings still reach our log file.
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def prune_run(cfg, root: Path, name: str) -> int:
    """After a successful stage: drop the Ray run's checkpoints and state, keep its logs.

    The stage's result is in `artifacts/<stage>` (and DVC's cache); checkpoints are
    only for resuming an *interrupted* run, so a finished run keeps its `*.log` files
    and lock and nothing else (a forced rerun trains afresh). Remote storage is left
    to its own retention. Returns the bytes freed.
    """
    import shutil

    if not cfg.ray.prune_checkpoints or "://" in storage_path(cfg, root):
        return 0
    run = run_dir(cfg, root, name)
    freed = 0
    for entry in run.iterdir() if run.is_dir() else ():
        if entry.name == ".lock" or entry.suffix == ".log":
            continue
        files = entry.rglob("*") if entry.is_dir() else [entry]
        freed += sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return freed
