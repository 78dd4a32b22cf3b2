"""The MLflow Model Registry: one registered model per variant, one version per trained model.

`pretrain` logs the trained network once (the MLflow model when
`mlflow.log_model` is on, else the checkpoint under `checkpoints/`) and, as
`mlflow.register_model` asks (`wanted`: by default only runs with the committed
params), registers it as a new version of `<mlflow.experiment>.<variant>`,
tagged with the run's identity and the params it changed, its description
naming the pipeline run. The parent run names the version (`TAG_VERSION`), and
each headline metric the later stages log on the parent is also set on the
version (`annotate`: `top1_pct`, `latency_ms.*`, ...). `export` attaches its Core ML and ONNX files to the version
of the run that trained the weights it converted, as `export.<file>` tags
holding `runs:/` URIs (a model version has no files of its own).
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


#: On a parent run: `<registered model>/<version>` its pretrain stage registered.
TAG_VERSION = "iformer.model_version"


def wanted(cfg, changed: str) -> bool:
    """Whether this run registers its model (`mlflow.register_model`; `changed`: the parent's `iformer.params_changed`,
    `baseline` when no param differs from HEAD's)."""
    policy = cfg.mlflow.register_model
    return policy == "always" or (policy == "baseline" and changed in ("", "baseline"))


def annotate(client, name_version: str, metrics: dict) -> None:
    """Set headline `metrics` as tags on the version `<name>/<version>` (a version holds no metrics)."""
    name, _, version = name_version.rpartition("/")
    for k, v in metrics.items():
        client.set_model_version_tag(name, version, k, f"{v:g}")


def model_name(cfg) -> str:
    return f"{cfg.mlflow.experiment}.{cfg.model.variant}"


def register(client, cfg, source: str, run_id: str, tags: dict, description: str | None = None) -> str:
    """A new version of this variant's registered model; returns its version number."""
    from mlflow.exceptions import MlflowException

    name = model_name(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"iFormer {cfg.model.variant} trained by the pipeline's "
                                                         "pretrain stage; export files are tagged on each version.")
    # A logged MLflow model (`models:/m-...`) is linked as such, so the UI shows the version on it.
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    version = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id,
                                          tags={k: str(v)[:5000] for k, v in tags.items()},
                                          description=description)
    if model_id:
        link_logged_model(client, model_id, name, version.version)
    log.info("registered %s version %s", name, version.version)
    return version.version


def link_logged_model(client, model_id: str, name: str, version) -> None:
    """List the version in the logged model's `mlflow.modelVersions` tag, where the UI looks for it.

    A tracking server does this itself, and so does `mlflow.register_model`; a client on a
    database store (the default sqlite one) does not, and the version would not show.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in listed):
        listed.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


def version_of(client, cfg, run_id: str):
    """The registered version trained by `run_id`, or None."""
    found = client.search_model_versions(f"name='{model_name(cfg)}' and run_id='{run_id}'")
    return found[0] if found else None


def attach(client, cfg, run_id: str, files: dict[str, str]) -> str | None:
    """Tag the version trained by `run_id` with `export.<file>` = its artifact URI."""
    version = version_of(client, cfg, run_id)
    if version is None:
        return None
    for name, uri in files.items():
        client.set_model_version_tag(version.name, version.version, f"export.{name}", uri)
    return version.version
