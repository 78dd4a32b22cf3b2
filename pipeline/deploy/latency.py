"""The `latency` stage: the exported models timed on each backend of `latency.backends`.

For every backend and model in `latency.models`: median, mean, p90, std, min
and max in ms over `latency.runs` timed runs after `latency.warmup`, and what
ran it (device, OS, compute units, threads, library versions). A backend
that cannot run here is reported as skipped with the reason, or is an error
when `latency.require` names it. Writes, only when every backend is done,
`metrics/latency.json` (the statistics, skip reasons) and
`artifacts/latency/latency.json` (also what ran them and every sample);
logs `latency_ms.<backend>.<model>` (the median) on the stage's run and on
the pipeline's parent run.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..core import checkpoint, integrity, layout
from ..core.outputs import Outputs
from ..core.outputs import read_stage_manifest
from ..errors import PipelineError
from ..tracking.runs import StageRun
from . import backends
from .backends import AppleAPI, Skipped
from .export import FILE_KEYS, WINDOW_KEYS

log = logging.getLogger(__name__)
STAGE = "latency"


@dataclass
class Inputs:
    export_dir: Path
    models: dict  # name -> export manifest entry
    weights: dict
    apple: AppleAPI = field(default_factory=AppleAPI)
    env: dict = field(default_factory=lambda: dict(os.environ))


def check(cfg: Config, root: Path) -> Inputs:
    lat = cfg.latency
    backends.check_threads(lat.threads, "latency.threads")
    export_dir = layout.stage_dir("export", root)
    manifest = read_stage_manifest("export", root)
    if manifest is None:
        raise PipelineError(f"{layout.manifest_path('export', root)}: missing; run the export stage first")
    exported = manifest["models"]
    unknown = [m for m in lat.models if m not in exported]
    if unknown:
        raise PipelineError(f"latency.models: {', '.join(unknown)} not exported; exported: {', '.join(exported)}")
    for name in lat.models:
        # onnx and coreml always; a .pte only when exported (without one the executorch backend says why)
        for key in [k for k in FILE_KEYS if k != "executorch" or k in exported[name]]:
            if not (export_dir / exported[name][key]).is_file():
                raise PipelineError(f"{export_dir / exported[name][key]}: missing; rerun the export stage")
            integrity.verify(export_dir / exported[name][key], exported[name].get(f"{key}_sha256"), "export")
        if exported[name]["kind"] == "backbone" and any(k not in exported[name] for k in WINDOW_KEYS):
            raise PipelineError(f"{layout.manifest_path('export', root)}: {name} does not record its window "
                                "attention (an older export); rerun the export stage")
    path, weights = checkpoint.pretrain_weights(root, cfg.model.variant)
    if checkpoint.sha256(path) != manifest.get("weights_sha256"):
        raise PipelineError(f"{path}: not the weights {export_dir} was exported from; rerun the export stage")
    log.info("%s weights: %s", weights["variant"], checkpoint.describe_source(weights.get("source")))
    for backend in lat.require:
        if backends.BACKENDS[backend].macos and sys.platform != "darwin":
            raise PipelineError(f"latency.require: {backend} needs a macOS host (Xcode and a paired iPhone for "
                                f"iphone); this host runs {platform.system()}")
    if "iphone" in lat.require:
        try:
            backends.signing_credentials(os.environ)
        except Skipped as err:
            raise PipelineError(f"latency.require: iphone: {err}") from None
    return Inputs(export_dir, {m: exported[m] for m in lat.models}, weights)


def _torch_module(entry: dict, weights: dict):
    """The exported network rebuilt in torch, with the window attention it was exported with."""
    from iformer.export import deploy_form, dense_backbone

    if entry["kind"] == "backbone":
        return dense_backbone(weights["variant"], weights["state_dict"], checkpoint.layer_scale_of(weights),
                              **{k: entry[k] for k in WINDOW_KEYS})
    return deploy_form(checkpoint.build_from_weights(weights))


@dataclass
class Exported:
    """One exported model as the backends time it (a `backends.Subject`)."""

    entry: dict  # its entry in the export manifest
    export_dir: Path
    weights: dict

    @property
    def size(self) -> int:
        return self.entry["size"]

    def torch_module(self):
        return _torch_module(self.entry, self.weights)

    def onnx_file(self) -> Path:
        return self.export_dir / self.entry["onnx"]

    def executorch_file(self) -> Path:
        if "executorch" not in self.entry:
            raise Skipped("no .pte was exported (set export.executorch.enabled and rerun the export stage)")
        return self.export_dir / self.entry["executorch"]

    def coreml_package(self, into: Path) -> Path:
        from .coreml import unzip_package

        return unzip_package(self.export_dir / self.entry["coreml"], into)


def measure_backend(backend: str, cfg: Config, inputs: Inputs, workdir: Path) -> dict:
    """{"ran_on": ..., "models": {name: stats + samples}} for one backend; raises Skipped."""
    lat = cfg.latency
    subjects = {name: Exported(entry, inputs.export_dir, inputs.weights) for name, entry in inputs.models.items()}
    results, ran = backends.measure(backend, subjects, lat, backends.Context(workdir, inputs.apple, inputs.env))
    for name, r in results.items():
        log.info("%s %s: median %.2f ms (p90 %.2f) over %d runs", backend, name, r["median"], r["p90"], lat.runs)
    # `label`: what timed these figures in one line (CPU model and threads), as the report's tables show it.
    return {"ran_on": {**ran, "host": backends.host(), "label": backends.host_label(ran)}, "warmup": lat.warmup,
            "models": results}


def measure(cfg: Config, inputs: Inputs) -> dict:
    """Every backend's result or skip reason; a required backend that cannot run is an error."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="iformer-latency-") as tmp:
        for backend in cfg.latency.backends:
            try:
                out[backend] = measure_backend(backend, cfg, inputs, Path(tmp))
            except Skipped as err:
                if backend in cfg.latency.require:
                    raise PipelineError(f"latency.require: {backend} could not run: {err}") from None
                log.info("%s skipped: %s", backend, err)
                out[backend] = {"skipped": str(err)}
    return out


def headline(results: dict) -> dict[str, float]:
    return {f"latency_ms.{b}.{m}": r["median"] for b, res in results.items() for m, r in res.get("models", {}).items()}


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    results = measure(cfg, inputs)
    # DVC metrics: the numbers (and skip reasons); what ran them and the samples are in the artifact.
    table = {b: ({"skipped": r["skipped"]} if "skipped" in r else
                 {m: {k: v for k, v in s.items() if k != "samples"} for m, s in r["models"].items()})
             for b, r in results.items()}
    outputs = Outputs.begin(STAGE, root)
    full = outputs.dir / "latency.json"
    full.write_text(json.dumps(results, indent=2) + "\n")
    mpath = outputs.metrics(table)

    metrics = headline(results)
    if metrics:
        mlflow.log_metrics(metrics)
        # Each latency figure names what timed it: the report's tables show it beside the figure.
        srun.log_headline(metrics, {f"latency_host.{b}": r["ran_on"]["label"] for b, r in results.items()
                                    if "ran_on" in r})
    mlflow.set_tags({f"latency.skipped.{b}": r["skipped"][:5000] for b, r in results.items() if "skipped" in r})
    mlflow.log_text(mpath.read_text(), f"metrics/{STAGE}.json")
    mlflow.log_artifact(str(full), "latency")
    outputs.manifest(srun, models=list(inputs.models), runs=cfg.latency.runs, warmup=cfg.latency.warmup,
                     ran_on={b: r["ran_on"] for b, r in results.items() if "ran_on" in r},
                     skipped={b: r["skipped"] for b, r in results.items() if "skipped" in r})
    outputs.commit()
    log.info("measured: %s", ", ".join(f"{k.removeprefix('latency_ms.')} {v:.2f} ms" for k, v in metrics.items()))
