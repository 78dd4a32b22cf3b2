"""MLflow run ownership: one parent run per pipeline run, one child run per stage.

DVC runs each stage as its own process, so the stages of one `dvc repro` (or
`dvc exp run`) find their shared parent run by an *invocation key*: the pid and
start time of the `dvc` process above them (plus the DVC experiment name), kept
as a tag on the parent. `IFORMER_PIPELINE_RUN` overrides it, to group stages run
by hand. A stage whose outputs DVC restored from cache did not run, so when a
later stage starts it adds a *linked* child for each such upstream stage (params
and metrics copied, tagged with the run that produced the outputs), and every
parent run is complete for side-by-side comparison.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import layout, lifecycle, store
from .invocation import dvc_experiment, git_commit, invocation_key, owner, owner_alive, started_ms
from .errors import PipelineError

TAG_KIND = "iformer.kind"
TAG_STAGE = "iformer.stage"
TAG_INVOCATION = "iformer.invocation"
TAG_LINKED_FROM = "iformer.linked_from"
#: A stage run's headline metrics (JSON), copied to the parent of a run that links it.
TAG_HEADLINE = "iformer.headline"
TAG_PARENT = "mlflow.parentRunId"
TAG_REPO = "iformer.repo"
TAG_OWNER = "iformer.owner"  # host:pid:start-ms of the process whose death ends the run
TAG_ATTEMPTS = "iformer.attempts"  # how many times the stage ran in this child run (reopened after an interrupt)
#: What MLflow's tracking stores accept (a database URI may name a driver: mysql+pymysql://).
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def configure_environment() -> None:
    """Keep tools quiet and their state local."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # MLflow's INFO lines ("Creating initial MLflow database tables", ...) are not ours to show.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def tracking_uri(cfg, root: Path) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{layout.state_root(root) / 'mlflow' / 'mlflow.db'}"


def artifact_location(root: Path) -> str:
    return (layout.state_root(root) / "mlflow" / "artifacts").as_uri()


def check_reachable(uri: str) -> None:
    """Fail fast, before any work, when the tracking store cannot be reached."""
    field = "mlflow.tracking_uri / MLFLOW_TRACKING_URI"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise PipelineError(f"{field}: tracking server {uri} is unreachable ({err})") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"{field}: cannot create {db.parent} ({err})") from None
    elif uri.startswith("sqlite:") or "://" not in uri and not uri.startswith("/"):
        raise PipelineError(f"{field}: {uri!r} is not a tracking URI (sqlite:////abs/path.db, http(s)://host, file:///dir)")
    elif "://" in uri and uri.split("://", 1)[0].split("+", 1)[0] not in TRACKING_SCHEMES:
        raise PipelineError(f"{field}: {uri!r} has an unknown scheme; use one of "
                            f"{', '.join(s + '://' for s in TRACKING_SCHEMES)}")


def close_stale_runs(client, exp_id: str, root: Path) -> list[str]:
    """Mark KILLED the RUNNING runs of this repo whose owning process is gone (a `kill -9`)."""
    repo = str(layout.state_root(root))
    stale = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(TAG_REPO) != repo or not tags.get(TAG_OWNER) or owner_alive(tags[TAG_OWNER]):
            continue
        client.set_tag(run.info.run_id, "iformer.closed_because", "its process was gone when the next pipeline run started")
        client.set_terminated(run.info.run_id, "KILLED")
        stale.append(run.info.run_id)
    return stale


@dataclass
class StageRun:
    """What a running stage knows about its MLflow runs."""

    run_id: str
    parent_run_id: str
    tracking_uri: str
    experiment_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_headline(self, values: dict) -> None:
        """Headline metrics on the parent run, remembered on this child for when DVC restores the stage."""
        client = self.client()
        client.log_batch(self.parent_run_id, metrics=metric_batch(values))
        client.set_tag(self.run_id, TAG_HEADLINE, json.dumps(values)[:5000])


def _connect(cfg, root: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, root)
    if uri == f"sqlite:///{store.default_db(root)}":
        store.relocate(root)  # the repo may have moved since the store was written
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    loc = artifact_location(root) if uri.startswith("sqlite:") else None
    return uri, client, experiment_id(client, cfg.mlflow.experiment, loc)


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The MLflow experiment `name`, created if missing (by us, or by a pipeline run starting beside us)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # RESOURCE_ALREADY_EXISTS: experiments submitted together start together
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _children(client, exp_id: str, parent_id: str):
    return client.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'", max_results=500)


def _source_name(dvc_proc, stage: str) -> str:
    """What started the pipeline, as the runs table's Source column shows it."""
    if dvc_proc is not None:
        try:
            cmd = dvc_proc.cmdline()
            at = next(i for i, a in enumerate(cmd) if os.path.basename(a) == "dvc" or a == "dvc")
            return " ".join(["dvc", *cmd[at + 1:]])[:500]
        except Exception:  # psutil denied, or the process just ended
            pass
    return f"python -m stages.{stage}"


def _parent_run(client, exp_id: str, cfg, root: Path, stage: str) -> str:
    import getpass

    from . import baseline

    key = invocation_key()
    found = client.search_runs([exp_id], filter_string=f"tags.`{TAG_INVOCATION}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    exp_name = dvc_experiment()
    dvc_proc = lifecycle.dvc_process() if key.startswith("dvc:") else None
    name = exp_name or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
    commit = git_commit(root)
    changed = baseline.differing(cfg, root)
    tags = {
        TAG_KIND: "pipeline",
        TAG_INVOCATION: key,
        TAG_REPO: str(layout.state_root(root)),
        TAG_OWNER: owner(dvc_proc.pid if dvc_proc else None),
        "iformer.git_commit": commit,
        "iformer.dvc_experiment": exp_name or "workspace",
        "iformer.params_hash": cfg.params_hash(),
        "iformer.params_changed": baseline.describe(changed)[:5000],
        "iformer.recipe": cfg.recipe,
        "iformer.variant": cfg.model.variant,
        # MLflow's own: the runs table's Source, User and Version columns.
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": _source_name(dvc_proc, stage),
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
        "mlflow.runName": name,
    }
    # The pipeline started when `dvc` did: the parent's duration covers every stage.
    started = started_ms(dvc_proc.pid) if dvc_proc else None
    run = client.create_run(exp_id, run_name=name, tags=tags, start_time=started)
    _log_config(client, run.info.run_id, cfg)
    if changed:
        client.log_dict(run.info.run_id, changed, "config/params_changed.json")
    return run.info.run_id


def _log_config(client, run_id: str, cfg, logged: dict | None = None) -> None:
    """Params and the resolved config; a reopened run keeps the params it has (MLflow's are write-once)."""
    from mlflow.entities import Param

    logged = logged or {}
    params = [Param(k, str(v)) for k, v in cfg.flat().items() if k not in logged]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    changed = {k: [logged[k], str(v)] for k, v in cfg.flat().items() if k in logged and logged[k] != str(v)}
    if changed:  # settings outside the training config (ray.*, evaluate.*, ...) may differ between attempts
        client.set_tag(run_id, "iformer.params_changed_on_reopen", json.dumps(changed)[:5000])
    client.log_dict(run_id, cfg.to_dict(), "config/resolved.yaml")


def metric_batch(values: dict, step: int = 0) -> list:
    """MLflow Metric entities for `log_batch`, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def read_stage_manifest(stage: str, root: Path) -> dict | None:
    path = layout.manifest_path(stage, root)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def identity_tags(cfg, root: Path) -> dict:
    """The experiment / commit / params tags every child of this invocation carries."""
    return {"iformer.git_commit": git_commit(root), "iformer.params_hash": cfg.params_hash(),
            "iformer.dvc_experiment": dvc_experiment() or "workspace", TAG_REPO: str(layout.state_root(root))}


def _link_upstream(client, exp_id: str, parent_id: str, stage: str, cfg, root: Path) -> None:
    """Add a linked child for each upstream stage that did not run in this invocation.

    It carries this invocation's identity and params (DVC restored the outputs
    because the stage's own deps and params are unchanged) and the producing
    run's metrics; the producer's commit and params hash are kept as
    `iformer.linked_*` tags, not presented as this experiment's.
    """
    have = {r.data.tags.get(TAG_STAGE) for r in _children(client, exp_id, parent_id)}
    for up in layout.STAGES[: layout.STAGES.index(stage)]:
        if up in have:
            continue
        manifest = read_stage_manifest(up, root)
        if not manifest or not manifest.get("mlflow_run_id"):
            continue
        src_id = manifest["mlflow_run_id"]
        try:
            src = client.get_run(src_id)
        except Exception:
            src = None  # produced in another tracking store: the tag still says where
        tags = {**identity_tags(cfg, root), TAG_PARENT: parent_id, TAG_STAGE: up, TAG_LINKED_FROM: src_id,
                "iformer.cached": "true",
                "mlflow.note.content": f"DVC restored this stage's outputs; they were produced by run {src_id}."}
        if src is not None:
            tags.update({f"iformer.linked_{k}": src.data.tags.get(f"iformer.{k}", "")
                         for k in ("git_commit", "params_hash", "dvc_experiment")})
        linked = client.create_run(exp_id, run_name=f"{up} (cached)", tags=tags)
        _log_config(client, linked.info.run_id, cfg)
        if src is not None:
            metrics = metric_batch(src.data.metrics)
            for i in range(0, len(metrics), 100):
                client.log_batch(linked.info.run_id, metrics=metrics[i : i + 100])
            headline = src.data.tags.get(TAG_HEADLINE)
            if headline:  # the parent shows them as if the stage had run here
                client.log_batch(parent_id, metrics=metric_batch(json.loads(headline)))
                client.set_tag(linked.info.run_id, TAG_HEADLINE, headline)
        client.set_terminated(linked.info.run_id, "FINISHED")


def _interrupted(client, exp_id: str, run_id: str | None, stage: str, root: Path):
    """`run_id` if it is this repo's `stage` run and ended KILLED or FAILED (else None: open a new one)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:  # gone, or written to another tracking store
        return None
    tags = run.data.tags
    if (run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active" or tags.get(TAG_STAGE) != stage
            or tags.get(TAG_REPO) != str(layout.state_root(root)) or run.info.status not in ("KILLED", "FAILED")):
        return None
    return run


@contextmanager
def stage_run(cfg, stage: str, root: Path, reopen: str | None = None) -> Iterator[StageRun]:
    """The child run of `stage` inside this invocation's parent run.

    `reopen` names the child run of an interrupted attempt this one continues
    (a Ray run resumed from its checkpoints): if it ended KILLED or FAILED it
    runs again, moved under this invocation's parent, with its metrics, so the
    resumed steps follow the ones it holds. Otherwise a new child run opens.
    """
    import mlflow

    uri, client, exp_id = _connect(cfg, root)
    close_stale_runs(client, exp_id, root)
    parent_id = _parent_run(client, exp_id, cfg, root, stage)
    client.update_run(parent_id, status="RUNNING")
    _link_upstream(client, exp_id, parent_id, stage, cfg, root)
    tags = {**identity_tags(cfg, root), TAG_STAGE: stage, TAG_OWNER: owner()}
    earlier = _interrupted(client, exp_id, reopen, stage, root)
    if earlier is None:
        run = mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_id, tags=tags)
        _log_config(client, run.info.run_id, cfg)
    else:
        old = earlier.data.tags
        run = mlflow.start_run(run_id=earlier.info.run_id, tags={
            **tags, TAG_PARENT: parent_id, TAG_ATTEMPTS: str(int(old.get(TAG_ATTEMPTS, "1")) + 1),
            "iformer.previous_parent_run_id": old.get(TAG_PARENT, "")})
        _log_config(client, run.info.run_id, cfg, logged=earlier.data.params)
    status = "FAILED"
    try:
        yield StageRun(run.info.run_id, parent_id, uri, exp_id)
        status = "FINISHED"
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):  # Ctrl-C, SIGTERM, parent gone (lifecycle)
            status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        # Every stage ends the parent; the next stage resumes it, so its end is the last stage's.
        end = int(time.time() * 1000)
        if status == "FINISHED":
            wall = (end - client.get_run(parent_id).info.start_time) / 1000
            client.log_batch(parent_id, metrics=metric_batch({"wall_s": wall}))
        client.set_terminated(parent_id, status, end_time=end)


def write_manifest(stage: str, root: Path, run: StageRun, /, **fields) -> Path:
    """Write `artifacts/<stage>/manifest.json` last, atomically: it marks the stage done."""
    path = layout.manifest_path(stage, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"stage": stage, "mlflow_run_id": run.run_id, "mlflow_parent_run_id": run.parent_run_id,
            "mlflow_tracking_uri": run.tracking_uri, **fields}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path
