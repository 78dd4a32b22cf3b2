"""Ray: connect to a cluster or start a local one, and describe a Train run.

`ray.address` (or `RAY_ADDRESS`) names a cluster; without one a local Ray is
started in-process with its state in a temp directory. Workers, GPUs and the
collective backend come from the `ray` section: scale is a config change.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from . import layout
from .errors import PipelineError

log = logging.getLogger(__name__)


def temp_dir() -> Path:
    # Unix socket paths are limited to ~107 bytes: keep this short.
    return Path(tempfile.gettempdir()) / f"ray-iformer-{os.getuid()}"


def address(cfg) -> str | None:
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def init(cfg, root: Path) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "IFORMER_ROOT")
           if k in os.environ}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Train V2 tees print() into its logger as well, which doubles every line.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"]
    addr = address(cfg)
    if addr:
        # Ship our packages to the cluster's workers; their other dependencies
        # are the cluster image's (same pins as pyproject.toml).
        import iformer
        import pipeline

        runtime_env = {"env_vars": env,
                       "py_modules": [str(Path(iformer.__file__).parent), str(Path(pipeline.__file__).parent)]}
        log.info("connecting to Ray cluster at %s", addr)
        try:
            ray.init(address=addr, runtime_env=runtime_env, logging_level=logging.WARNING)
        except Exception as err:  # ConnectionError, RuntimeError, ValueError from ray
            raise PipelineError(f"ray.address / RAY_ADDRESS: cannot connect to {addr} ({err})") from None
        return
    tmp = temp_dir()
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A local in-process Ray listens on loopback only; token auth would keep a
    # token in the user's home directory, outside the repo and temp dir.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=cfg.ray.local_num_cpus or os.cpu_count(),
        # The dashboard hosts Ray's state API, which Train V2's controller and
        # Tune poll; without it they warn in a loop (or hang).
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _temp_dir=str(tmp),
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def storage_path(cfg, root: Path) -> str:
    sp = str(cfg.ray.storage_path)
    if "://" in sp:
        return sp
    p = Path(sp)
    return str(p if p.is_absolute() else (layout.state_root(root) / p).resolve())


def scaling_config(cfg):
    from ray.train import ScalingConfig

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    return ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources)


def torch_config(cfg):
    from ray.train.torch import TorchConfig

    backend = cfg.ray.backend
    if backend == "auto":
        backend = "nccl" if cfg.ray.use_gpu else "gloo"
    return TorchConfig(backend=backend)


def run_config(cfg, root: Path, name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        storage_path=storage_path(cfg, root),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
    )
