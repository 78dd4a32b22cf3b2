"""MLflow run ownership: one parent run per pipeline run, one child run per stage.

DVC runs each stage as its own process, so the stages of one `dvc repro` (or
`dvc exp run`) find their shared parent run by an *invocation key*: the pid and
start time of the `dvc` process above them (plus the DVC experiment name), kept
as a tag on the parent. `IFORMER_PIPELINE_RUN` overrides it, to group stages run
by hand. A stage DVC skipped did not run, so when a later stage starts it adds a
*linked* child for each earlier stage that DVC records as up to date (params and
metrics copied, tagged with the run that produced the outputs). An earlier stage
that is not up to date (`freshness`: `dvc exp run pretrain` leaves evaluate as it
was) is not linked, and its figures never reach the parent: the parent names it
in `iformer.stale_stages`, as it names a stage that ran here on such outputs.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..core import freshness, layout, lifecycle
from ..core.outputs import read_stage_manifest
from . import registry, store, view
from .invocation import dvc_experiment, git_commit, invocation_key, owner, owner_alive, started_ms
from .metrics import HEADLINE_COLUMNS, metric_batch, parent_headline

TAG_KIND = "iformer.kind"
TAG_STAGE = "iformer.stage"
TAG_INVOCATION = "iformer.invocation"
TAG_LINKED_FROM = "iformer.linked_from"
#: A stage run's headline metrics (JSON), copied to the parent of a run that links it.
TAG_HEADLINE = "iformer.headline"
#: A stage run's headline tags (JSON: e.g. the latency host), copied like TAG_HEADLINE.
TAG_HEADLINE_TAGS = "iformer.headline_tags"
#: On a parent: the stages whose figures it lacks because they are not up to date (and why).
TAG_STALE = "iformer.stale_stages"
#: On a child: why the outputs it read are not up to date; its figures stay off the parent.
TAG_STALE_UPSTREAM = "iformer.stale_upstream"
TAG_PARENT = "mlflow.parentRunId"
TAG_REPO = "iformer.repo"
TAG_OWNER = "iformer.owner"  # host:pid:start-ms of the process whose death ends the run
TAG_ATTEMPTS = "iformer.attempts"  # how many times the stage ran in this child run (reopened after an interrupt)




def tracking_uri(cfg, root: Path) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{layout.state_root(root) / 'mlflow' / 'mlflow.db'}"


def artifact_location(root: Path) -> str:
    return (layout.state_root(root) / "mlflow" / "artifacts").as_uri()


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
    #: Earlier stages whose outputs are not up to date with this run's params and code (stage -> why).
    stale: dict = dataclasses.field(default_factory=dict)
    #: Why the outputs this stage reads are not up to date (None: they are).
    stale_upstream: str | None = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_headline(self, values: dict, tags: dict | None = None) -> None:
        """Headline metrics (`parent_headline`: percent, ms, rounded) and `tags` on the parent run (unless
        made from stale outputs), remembered on this child for when DVC skips the stage."""
        client = self.client()
        if not self.stale_upstream:
            client.log_batch(self.parent_run_id, metrics=metric_batch(parent_headline(values)))
            view.update(client, self.experiment_id, parent_headline(values))
            for k, v in (tags or {}).items():
                client.set_tag(self.parent_run_id, k, str(v)[:5000])
            version = client.get_run(self.parent_run_id).data.tags.get(registry.TAG_VERSION)
            if version:  # the model this pipeline run registered carries its figures too
                registry.annotate(client, version, {k: v for k, v in parent_headline(values).items()
                                                    if k in HEADLINE_COLUMNS or k.startswith("latency_ms.")})
        client.set_tag(self.run_id, TAG_HEADLINE, json.dumps(values)[:5000])
        if tags:
            client.set_tag(self.run_id, TAG_HEADLINE_TAGS, json.dumps(tags)[:5000])


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
    commit = git_commit(root)
    changed = baseline.differing(cfg, root)
    name = baseline.run_name(exp_name, changed, commit)
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
        "iformer.data": cfg.data.source,
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




def identity_tags(cfg, root: Path) -> dict:
    """The experiment / commit / params tags every child of this invocation carries."""
    return {"iformer.git_commit": git_commit(root), "iformer.params_hash": cfg.params_hash(),
            "iformer.dvc_experiment": dvc_experiment() or "workspace", TAG_REPO: str(layout.state_root(root))}


def _link_upstream(client, exp_id: str, parent_id: str, stage: str, cfg, root: Path) -> dict[str, str]:
    """Add a linked child for each earlier stage that did not run here and DVC records as up to date.

    It carries this invocation's identity and params and the producing run's
    metrics; the producer's commit and params hash are kept as
    `iformer.linked_*` tags. Returns the stale stages (`freshness.before`),
    also named on the parent (`TAG_STALE`).
    """
    kids = _children(client, exp_id, parent_id)
    ran = {r.data.tags.get(TAG_STAGE) for r in kids if TAG_LINKED_FROM not in r.data.tags
           and r.info.status == "FINISHED" and r.data.tags.get("iformer.params_hash") == cfg.params_hash()}
    earlier = layout.STAGES[: layout.STAGES.index(stage)] if stage in layout.STAGES else ()
    current = (ran | {r.data.tags.get(TAG_STAGE) for r in kids if TAG_LINKED_FROM in r.data.tags}) - {
        r.data.tags.get(TAG_STAGE) for r in kids if TAG_STALE_UPSTREAM in r.data.tags}
    if set(earlier) <= current:  # each ran here on current outputs, or was vouched for here: nothing to ask DVC
        return {}
    stale, vouched = freshness.before(root, stage, earlier, ran)
    if stale:
        client.set_tag(parent_id, TAG_STALE, freshness.describe(stale)[:5000])
    have = {r.data.tags.get(TAG_STAGE) for r in kids}
    for up in [s for s in earlier if s in vouched and s not in have]:
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
                "mlflow.note.content": f"DVC records this stage as up to date; its outputs were produced by run {src_id}."}
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
                client.log_batch(parent_id, metrics=metric_batch(parent_headline(json.loads(headline))))
                view.update(client, exp_id, parent_headline(json.loads(headline)))
                client.set_tag(linked.info.run_id, TAG_HEADLINE, headline)
            for k, v in json.loads(src.data.tags.get(TAG_HEADLINE_TAGS) or "{}").items():
                client.set_tag(parent_id, k, str(v)[:5000])
        client.set_terminated(linked.info.run_id, "FINISHED")
    return stale


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
    stale = _link_upstream(client, exp_id, parent_id, stage, cfg, root)
    stale_upstream = stale.pop(stage, None)
    tags = {**identity_tags(cfg, root), TAG_STAGE: stage, TAG_OWNER: owner(),
            **({TAG_STALE_UPSTREAM: stale_upstream[:5000]} if stale_upstream else {})}
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
        if TAG_STALE_UPSTREAM in old and not stale_upstream:
            client.delete_tag(run.info.run_id, TAG_STALE_UPSTREAM)
    status = "FAILED"
    try:
        yield StageRun(run.info.run_id, parent_id, uri, exp_id, stale, stale_upstream)
        status = "FINISHED"
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):  # Ctrl-C, SIGTERM, parent gone (lifecycle)
            status = "KILLED"
        raise
    finally:
        wait = cfg.mlflow.lock_wait_s  # a store locked by another process: bounded retries, not a RUNNING run
        store.when_unlocked(lambda: mlflow.end_run(status), wait)
        # Every stage ends the parent; the next stage resumes it, so its end is the last stage's.
        end = int(time.time() * 1000)
        if status == "FINISHED":
            wall = (end - client.get_run(parent_id).info.start_time) / 1000
            client.log_batch(parent_id, metrics=metric_batch(parent_headline({"wall_s": wall})))
            view.update(client, exp_id, ["wall_s"])
        store.when_unlocked(lambda: client.set_terminated(parent_id, status, end_time=end), wait)
