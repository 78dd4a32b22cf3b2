"""The search: Tune over the pretrain loop, one TorchTrainer per trial, ASHA on the metric."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from ..classify.datasets import Prepared
from ..compute import cluster
from ..config import Config, parse_config
from ..config.apply import with_dotted
from ..config.sweep import SPACE_FIELDS
from ..core import layout
from ..deploy.backends import check_threads
from ..errors import PipelineError
from ..tracking import invocation, runs
from ..tracking.metrics import metric_batch
from . import objective as sweep_latency

log = logging.getLogger(__name__)
STAGE = "sweep"
TAG_TRIAL = "iformer.trial_id"
TAG_EARLY = "iformer.early_stopped"


def check(cfg: Config, root: Path) -> Prepared:
    prepared = Prepared.load(layout.stage_dir("prepare", root))
    if cfg.distill.enabled:
        raise PipelineError("distill.enabled: sweeps train without a teacher; set it to false for the sweep")
    if cfg.model.weights is not None:
        raise PipelineError("model.weights: sweeps train from random initialisation; set it to null for the sweep")
    space = cfg.sweep.space
    base = cfg.to_dict()
    # Every corner of the space must be a valid config.
    corners = [{}]
    for name, field in SPACE_FIELDS.items():
        value = getattr(space, name)
        options = list(value) if value else []
        if options:
            corners = [{**c, field: v} for c in corners for v in options]
    for corner in corners:
        try:
            candidate = parse_config(with_dotted(base, corner), "sweep.space")
        except PipelineError as err:
            raise PipelineError(f"{err} (a value the sweep would try)") from None
        if candidate.train.batch_size > prepared.manifest["counts"]["train"]:
            raise PipelineError(f"sweep.space.batch_size: {candidate.train.batch_size} is larger than the "
                                f"{prepared.manifest['counts']['train']} training images")
    if cfg.sweep.latency.backend:
        check_threads(cfg.latency.threads, "latency.threads")  # the sweep times variants with latency.threads
    cluster.check(cfg)
    return prepared


def param_space(cfg: Config, variants: list[str] | None = None) -> dict:
    """Tune's search space; `variants` narrows the variant choices (the latency budget's)."""
    from ray import tune

    s, out = cfg.sweep.space, {}
    for name, field in SPACE_FIELDS.items():
        value = getattr(s, name)
        if name == "variant" and value and variants is not None:
            value = [v for v in value if v in variants]
        if not value:
            continue
        if name in ("base_lr", "weight_decay"):
            out[field] = tune.loguniform(*value)
        elif name == "drop_path":
            out[field] = tune.uniform(*value)
        else:
            out[field] = tune.choice(list(value))
    return out


def trial(values: dict, setup: dict) -> None:
    """One trial, inside Tune: a TorchTrainer of the pretrain loop with this trial's values."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.train import RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.train.v2.api.config import LoggingConfig

    from ..classify.worker import train_loop_per_worker
    from ..compute.trainer import trainer_class

    cfg = Config.model_validate(with_dotted(setup["cfg"], values))
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(setup["tracking_uri"])
    run = client.create_run(setup["experiment_id"], run_name=f"trial {trial_id}",
                            tags={runs.TAG_PARENT: setup["parent_run_id"], runs.TAG_KIND: "sweep-trial",
                                  TAG_TRIAL: trial_id, runs.TAG_STAGE: STAGE})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])
    job = trainer_class()(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "prepared_dir": setup["prepared_dir"], "teacher_path": None,
                           "tracking_uri": setup["tracking_uri"], "run_id": run.info.run_id},
        scaling_config=cluster.scaling_config(cfg), torch_config=cluster.torch_config(cfg),
        run_config=RunConfig(name=f"{setup['name']}-{trial_id}", storage_path=setup["storage_path"],
                             callbacks=[TuneReportCallback()], logging_config=LoggingConfig(log_level="WARNING")))
    try:
        job.fit()
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def with_room_for_trials(cfg: Config) -> Config:
    """On the local Ray, one logical CPU more than the machine has, for the trials' drivers.

    A trial is a Tune function holding 0.01 CPU while its trainer's workers
    take `ray.cpus_per_worker` each; with the default 2 CPUs per worker on a
    2-core machine no trial would ever fit. The drivers only wait on their
    trainers, so the extra logical CPU oversubscribes nothing.
    """
    if cluster.address(cfg) is not None or cfg.ray.local_num_cpus is not None:
        return cfg
    ray_cfg = cfg.ray.model_copy(update={"local_num_cpus": cluster.local_cpus(cfg) + 1})
    return cfg.model_copy(update={"ray": ray_cfg})


def run(cfg: Config, root: Path, prepared: Prepared) -> Path:
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    cfg = with_room_for_trials(cfg)
    s = cfg.sweep
    epochs = s.epochs or cfg.train.epochs
    base = cfg.to_dict()
    base["train"]["epochs"] = epochs
    name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = runs.tracking_uri(cfg, root)
    client = MlflowClient(uri)
    exp_id = runs.experiment_id(client, cfg.mlflow.experiment,
                                    runs.artifact_location(root) if uri.startswith("sqlite:") else None)
    parent = client.create_run(exp_id, run_name=name, tags={
        runs.TAG_KIND: "sweep", runs.TAG_REPO: str(layout.state_root(root)), runs.TAG_OWNER: invocation.owner(),
        "iformer.git_commit": invocation.git_commit(root), "iformer.params_hash": cfg.params_hash()}).info.run_id
    client.log_dict(parent, s.model_dump(mode="json"), "sweep/config.yaml")
    status = "FAILED"
    try:
        timed, allowed = {}, None
        if s.latency.backend:
            timed = sweep_latency.measure(cfg, prepared.num_classes)
            client.log_dict(parent, timed, "sweep/latency.json")
            allowed = sweep_latency.within_budget(cfg, timed)
        setup = {"cfg": base, "prepared_dir": str(prepared.dir), "tracking_uri": uri, "experiment_id": exp_id,
                 "parent_run_id": parent, "name": name, "storage_path": cluster.storage_path(cfg, root)}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, setup=setup), {"CPU": 0.01}),
            param_space=param_space(cfg, allowed),
            tune_config=tune.TuneConfig(
                metric=s.metric, mode="max", num_samples=s.num_samples,
                scheduler=ASHAScheduler(max_t=epochs, grace_period=min(s.grace_period, epochs),
                                        reduction_factor=s.reduction_factor),
                # The limit goes to the generator: Tune ignores TuneConfig's max_concurrent_trials
                # (with a warning) when the search algorithm is a BasicVariantGenerator.
                search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials)),
            run_config=tune.RunConfig(name=name, storage_path=setup["storage_path"], verbose=0))
        log_file = cluster.run_dir(cfg, root, name) / "ray.log"
        with cluster.session(cfg, root, STAGE, log_file):
            log.info("%d trials, %d at a time, %d epochs each (Ray's log: %s)", s.num_samples, s.max_concurrent_trials,
                     epochs, log_file)
            results = tuner.fit()
        best = summarize(client, exp_id, parent, results, s.metric, epochs,
                         {v: t["median"] for v, t in timed.items()}, cfg)
        path = write_best(cfg, root, name, parent, best, s.metric)
        status = "FINISHED"
        return path
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)


def summarize(client, exp_id: str, parent: str, results, metric: str, epochs: int,
              latency_ms: dict[str, float], cfg: Config) -> dict:
    """Close every trial's MLflow run, log the sweep's outcome on the parent; the best trial.

    With `latency_ms` (per variant), every trial carries its model's latency
    and the parent records the accuracy-latency Pareto front of the trials.
    """

    children = {r.data.tags.get(TAG_TRIAL): r for r in
                client.search_runs([exp_id], filter_string=f"tags.`{runs.TAG_PARENT}` = '{parent}'", max_results=1000)}
    rows = []
    for result in results:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        epochs_done = int(result.metrics.get("training_iteration", 0)) if result.metrics else 0
        value = result.metrics.get(metric) if result.metrics else None
        run = children.get(trial_id)
        if run is not None:
            early = result.error is None and epochs_done < epochs
            client.set_tag(run.info.run_id, TAG_EARLY, str(early).lower())
            # Tune's word, not the trial's: a trial ASHA stops is interrupted
            # mid-fit (or killed) and may have closed its run as FAILED, or not at all.
            client.set_terminated(run.info.run_id, "FAILED" if result.error is not None else "FINISHED")
        values = dict(result.config.items())
        latency = latency_ms.get(values.get("model.variant", cfg.model.variant))
        if run is not None and latency is not None:
            client.log_batch(run.info.run_id, metrics=metric_batch({"latency_ms": latency}))
        rows.append({"trial": trial_id, "values": values, "epochs": epochs_done, metric: value,
                     "latency_ms": latency,
                     "error": None if result.error is None else str(result.error).splitlines()[0],
                     "mlflow_run_id": run.info.run_id if run is not None else None})
        log.info("trial %s: %s %s after %d epochs%s", trial_id, metric,
                 "n/a" if value is None else f"{value:.4f}", epochs_done, " (stopped early)" if epochs_done < epochs else "")
    done = [r for r in rows if r[metric] is not None and r["error"] is None]
    if not done:
        raise PipelineError(f"sweep: no trial finished an epoch ({rows[0]['error'] if rows else 'no trials ran'})")
    best = max(done, key=lambda r: r[metric])
    client.log_batch(parent, metrics=metric_batch({f"best_{metric}": best[metric], "trials": len(rows),
                                                   "trials_stopped_early": sum(r["epochs"] < epochs for r in done)}))
    client.log_dict(parent, rows, "sweep/trials.json")
    if latency_ms:
        log_front(client, parent, done, metric, cfg.sweep.latency.backend)
    client.set_tag(parent, "iformer.best_trial_run", best["mlflow_run_id"] or "")
    return best


def log_front(client, parent: str, done: list[dict], metric: str, backend: str) -> None:
    """The accuracy-latency Pareto front of the finished trials, on the sweep's parent run."""
    import tempfile

    on_front = sweep_latency.front(done, metric)
    client.log_dict(parent, on_front, "sweep/pareto.json")
    client.log_batch(parent, metrics=metric_batch({"pareto_trials": len(on_front)}))
    client.set_tag(parent, "iformer.pareto_trials", ",".join(str(r["trial"]) for r in on_front))
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "pareto.png"
        sweep_latency.plot(done, on_front, metric, backend, png)
        client.log_artifact(parent, str(png), "sweep")
    for r in on_front:
        log.info("Pareto front: trial %s %s %.4f at %.2f ms %s", r["trial"], metric, r[metric], r["latency_ms"],
                 r["values"])


def write_best(cfg: Config, root: Path, name: str, parent: str, best: dict, metric: str) -> Path:
    out = layout.stage_dir(STAGE, root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    body = {"sweep": name, "metric": metric, "value": best[metric], "latency_ms": best.get("latency_ms"),
            "epochs": best["epochs"],
            "trial": best["trial"], "mlflow_run_id": best["mlflow_run_id"], "mlflow_parent_run_id": parent,
            "params": with_dotted({}, best["values"])}
    path = out / "best.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(f"# The best trial of {name}; merge `params` into params.yaml to train with it.\n"
                   + yaml.safe_dump(body, sort_keys=False))
    tmp.replace(path)
    manifest = out / "manifest.json.tmp"
    manifest.write_text(json.dumps({"stage": STAGE, "sweep": name, "mlflow_parent_run_id": parent,
                                    "best": "best.yaml"}, indent=2) + "\n")
    manifest.replace(out / "manifest.json")
    log.info("best: %s %.4f with %s -> %s", metric, best[metric], best["values"], path)
    return path
