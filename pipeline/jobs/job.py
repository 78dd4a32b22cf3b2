"""One Ray job: run a command (e.g. `dvc repro`) on a Ray cluster and bring its results home.

`python -m pipeline.submit [--address URL] -- CMD...` calls `submit`; a set of
DVC experiments, each as its own job, is `jobs.batch`.

The workspace goes up as the job's `working_dir`, with its `.git` (DVC in the
job needs the repository): Ray leaves out what `.gitignore` and `.rayignore`
name, and this adds `.dvcignore`'s patterns and the local caches
(`EXCLUDES`), so data, DVC's cache, local MLflow stores and Ray results stay
home. The job reaches the cluster through the `RAY_ADDRESS`
Ray gives its driver, and the tracking server through `MLFLOW_TRACKING_URI`
(credentials from this process's environment, `cluster.TRACKING_ENV`); the
token for the job server comes from `RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH`
with `RAY_AUTH_MODE=token`, as for every Ray client.

Exit status: 0 when the job SUCCEEDED (after its results are unpacked into the
workspace, see `entry`), 1 when it FAILED or was STOPPED by someone else, 2 for
bad input (one `error:` line), 128 + the signal number when Ctrl-C or SIGTERM
stopped it here (the job is stopped first).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import shlex
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from ..compute import cluster
from ..config import load_config
from ..core import console, lifecycle
from ..errors import PipelineError
from ..tracking import runs, store
from . import entry

#: Never uploaded, whatever the ignore files say.
EXCLUDES = [".venv/", ".dvc/cache/", ".dvc/tmp/", "mlflow/", "ray_results/", "**/__pycache__/", ".bench/"]
#: Ray's own default excludes for a working_dir, less `.git`.
DEFAULT_EXCLUDES = (".venv", "venv", "__pycache__")
QUIET_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


say = functools.partial(console.say, "submit")


def dashboard_address(arg: str | None) -> str:
    addr = arg or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not addr:
        raise PipelineError("--address / RAY_API_SERVER_ADDRESS: the cluster's job server (its dashboard, "
                            "http://HEAD:8265) is not set")
    return addr if "://" in addr else f"http://{addr}"


def excludes(root: Path) -> list[str]:
    patterns = list(EXCLUDES)
    ignore = root / ".dvcignore"
    if ignore.is_file():
        patterns += [line.strip() for line in ignore.read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
    return patterns


def job_key(suffix: str = "") -> str:
    """A job's submission id, also its MLflow invocation key (`IFORMER_PIPELINE_RUN`)."""
    key = f"iformer-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    return f"{key}-{suffix}" if suffix else key


def runtime_env(root: Path, uri: str, key: str) -> dict:
    env = {k: os.environ[k] for k in cluster.TRACKING_ENV if k in os.environ}
    env.update(MLFLOW_TRACKING_URI=uri, IFORMER_PIPELINE_RUN=key, DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1",
               # Time for the stages to close their MLflow runs after a stop.
               RAY_JOB_STOP_WAIT_TIME_S="30",
               # The stages' own `ray.init` adds env vars and py_modules to the job's.
               RAY_OVERRIDE_JOB_RUNTIME_ENV="1")
    return {"working_dir": str(root), "excludes": excludes(root), "env_vars": env}


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def follow_logs(client, job_id: str, write=_write) -> threading.Thread:
    """Stream the job's log to `write` (chunks as they come) in a thread."""
    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    def run():
        try:
            asyncio.run(tail())
        except Exception as err:  # the log stream is a convenience; the status decides
            say(f"log stream ended: {err}")

    thread = threading.Thread(target=run, name=f"logs-{job_id}", daemon=True)
    thread.start()
    return thread


def wait(client, job_id: str, timeout: float | None = None) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(1.0)


def bring_back(root: Path, cfg, uri: str, key: str) -> int:
    """Unpack the job's results archive (from its MLflow run) into the workspace."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{runs.TAG_INVOCATION}` = '{key}'",
                              max_results=1) if exp else []
    if not found:
        raise PipelineError(f"mlflow: no run of job {key} holds its results")
    with tempfile.TemporaryDirectory() as tmp:
        archive = client.download_artifacts(found[0].info.run_id, entry.RESULTS, tmp)
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            tar.extractall(root, filter="data")  # no absolute paths, links out or devices
    return len(members)


def connect(addr: str):
    """A Job SDK client of the job server at `addr`; one `PipelineError` line when it does not answer."""
    # `.git` goes up too (Ray leaves it out by default): DVC in the job needs
    # the repository, and `dvc exp push` from the job its history.
    os.environ["RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"] = ",".join(DEFAULT_EXCLUDES)
    from ray.job_submission import JobSubmissionClient

    for name in QUIET_LOGGERS:  # packaging chatter; the job's log is what we show
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(addr)
    except Exception as err:  # ConnectionError, or an authentication error from Ray
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"--address / RAY_API_SERVER_ADDRESS: cannot reach the job server at {addr} ({first}); "
                            "a cluster with token authentication needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                            "or RAY_AUTH_TOKEN_PATH") from None


def submit(root: Path, command: list[str], address: str | None, params: Path | None) -> int:
    cfg = load_config(params or root / "params.yaml")
    uri = runs.tracking_uri(cfg, root)
    addr = dashboard_address(address)
    cluster.check_tracking(cfg, addr)
    store.check_reachable(uri)
    client = connect(addr)
    key = job_key()
    entrypoint = shlex.join(["python", "-m", "pipeline.jobs.entry", "--", *command])
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=key, runtime_env=runtime_env(root, uri, key))
    say(f"job {job_id} submitted to {addr}: {shlex.join(command)}")
    logs = None
    try:
        lifecycle.handle_signals()
        logs = follow_logs(client, job_id)
        status = wait(client, job_id)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP via lifecycle
        why, code = lifecycle.stop_reason()
        say(f"{why}: stopping job {job_id}")
        client.stop_job(job_id)
        status = wait(client, job_id, timeout=120)
        say(f"job {job_id} {status}")
        return code
    finally:
        if logs is not None:
            logs.join(timeout=10)
    if status != "SUCCEEDED":
        say(f"job {job_id} {status}" + (f": {client.get_job_info(job_id).message}" if status == "FAILED" else ""))
        return 1
    n = bring_back(root, cfg, uri, key)
    say(f"job {job_id} SUCCEEDED; {n} result files unpacked into {root}")
    return 0
