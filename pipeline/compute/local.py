"""A private local Ray: loopback only, token authentication, a temp dir of its own.

- every listener on loopback: Ray takes 127.0.0.1 as the node address when its
  "cluster" mode is off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the switch it
  uses on macOS), and then binds its gRPC, dashboard and metrics servers there;
- token authentication on, with a fresh random token in the run's own temp dir
  (`RAY_AUTH_TOKEN_PATH`), so no other user or process can drive it;
- its own short temp dir (`/tmp/ray-XXXXXXXX`; Unix socket paths are limited to
  ~107 bytes), so two pipelines on one machine never see each other's session,
  and the TMPDIR of every process it starts, so none leaves files behind;
- the state API (in its dashboard) at an address said outright, and an end
  that does not wait on its autoscaler monitor.

`cluster.session` owns its life: the reaper, the renicer and the shutdown.
"""
from __future__ import annotations

import os
import secrets
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core import lifecycle
from ..errors import PipelineError

#: The local Ray's token file; its path in a process's environment marks that
#: process as this run's (see `lifecycle.reaper`).
TOKEN_FILE = "auth_token"
#: Where Ray's processes find the state API (the dashboard) of the local Ray.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(num_cpus: int, tmp: Path, env_vars: dict) -> None:
    """Start it, its token and session under `tmp`; `env_vars` go to every worker it starts."""
    token = tmp / TOKEN_FILE
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                      RAY_TRAIN_ENABLE_PRINT_PATCH="0",
                      # A one-machine Ray has no node to lose to preemption and no one scraping
                      # Train's Prometheus metrics: each would cost an actor process or a callback
                      # and its polling in every stage's start.
                      RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_TRAIN_METRICS_ENABLED="0",
                      # Ray starts every worker at niceness 15, below its own
                      # daemons: here the training workers must come first.
                      RAY_worker_niceness="0",
                      # Ray starts a worker per CPU for the first driver, before anything asks for
                      # one. None would ever run here: each task and actor of ours carries a runtime
                      # env (the job's env_vars, Train's own), which Ray's pool serves only with
                      # workers started for it. Each spent ~0.6 s of CPU at the stage's start.
                      RAY_prestart_worker_first_driver="0")
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    # Ray reads both switches from the environment when it is imported; this
    # process may have imported it already (the Ray processes it starts read
    # them fresh). Ray's own token set-up refreshes its config the same way.
    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    # Ray's processes find the state API (in the dashboard) by scanning the
    # machine for a gcs_server unless told where it is; with a second Ray on
    # the machine (another pipeline, a test cluster) that scan fails inside
    # Train V2's placement-group cleaner, whose placement groups then stay
    # reserved and starve the next worker group. So: our port, said outright.
    api = f"http://127.0.0.1:{_free_loopback_port()}"
    os.environ[API_SERVER_ENV] = api
    with _children_temp_dir(tmp):
        ray.init(
            num_cpus=num_cpus,
            # The dashboard hosts Ray's state API, which Train V2's controller and
            # Tune poll; without it they warn in a loop (or hang).
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=int(api.rsplit(":", 1)[1]),
            _temp_dir=str(tmp),
            runtime_env={"env_vars": {**env_vars, API_SERVER_ENV: api}},
            configure_logging=False,
            log_to_driver=True,
        )
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith(("127.0.0.1:", "[::1]:", "localhost:")):
        ray.shutdown()
        raise PipelineError(f"ray: the local Ray came up at {gcs}, not on loopback; refusing to run")


@contextmanager
def _children_temp_dir(tmp: Path) -> Iterator[None]:
    """TMPDIR is `tmp` for the processes started inside the block, and the Ray processes they start.

    They make their temp files there, which goes when the session ends: the dashboard's
    multiprocessing forkserver left a /tmp/pymp-* dir behind every stage (Ray kills it, so its
    own clean-up never runs), and a killed worker its scratch dirs. This process keeps its own
    temp dir: `tempfile` reads TMPDIR once, on first use, which this makes happen first."""
    tempfile.gettempdir()
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before


#: The command line of the autoscaler monitor a head node of Ray starts.
MONITOR_SCRIPT = "autoscaler/_private/monitor.py"


def autoscaler_monitors() -> list:
    """The autoscaler monitor of the Ray this process started (its child, by command line)."""
    import psutil

    found = []
    for child in psutil.Process().children():
        try:
            if any(MONITOR_SCRIPT in arg for arg in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def end_autoscaler_monitor() -> None:
    """Kill the private Ray's autoscaler monitor before `ray.shutdown()` stops the rest.

    Ray ends its raylet and GCS first, then sends the monitor SIGTERM and waits
    1 s for it; the monitor answers SIGTERM by reporting its own death to the
    GCS that is already gone, so it never exits in time and every shutdown
    spent that second. A one-node Ray's autoscaler has nothing to clean up.
    """
    lifecycle.end(autoscaler_monitors(), grace=0)
