"""The MLflow Model Registry: one registered model per variant, one version per trained model.

`pretrain` logs the trained network once (the MLflow model when
`mlflow.log_model` is on, else the checkpoint under `checkpoints/`) and
registers it as a new version of `<mlflow.experiment>.<variant>`, tagged with
the run's identity. `export` attaches its Core ML and ONNX files to the version
of the run that trained the weights it converted, as `export.<file>` tags
holding `runs:/` URIs (a model version has no files of its own).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def model_name(cfg) -> str:
    return f"{cfg.mlflow.experiment}.{cfg.model.variant}"


def register(client, cfg, source: str, run_id: str, tags: dict) -> str:
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
                                          tags={k: str(v)[:5000] for k, v in tags.items()})
    log.info("registered %s version %s", name, version.version)
    return version.version


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
