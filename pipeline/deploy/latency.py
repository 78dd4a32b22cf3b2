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

from .. import checkpoint, layout
from ..config import Config
from ..errors import PipelineError
from ..tracking import StageRun, read_stage_manifest, write_manifest
from . import backends
from .backends import AppleAPI, Skipped

log = logging.getLogger(__name__)
STAGE = "latency"
APPLE = ("iphone", "mac")


@dataclass
class Inputs:
    export_dir: Path
    models: dict  # name -> export manifest entry
    weights: dict
    apple: AppleAPI = field(default_factory=AppleAPI)
    env: dict = field(default_factory=lambda: dict(os.environ))


def check(cfg: Config, root: Path) -> Inputs:
    lat = cfg.latency
    export_dir = layout.stage_dir("export", root)
    manifest = read_stage_manifest("export", root)
    if manifest is None:
        raise PipelineError(f"{layout.manifest_path('export', root)}: missing; run the export stage first")
    exported = manifest["models"]
    unknown = [m for m in lat.models if m not in exported]
    if unknown:
        raise PipelineError(f"latency.models: {', '.join(unknown)} not exported; exported: {', '.join(exported)}")
    for name in lat.models:
        for key in ("onnx", "coreml"):
            if not (export_dir / exported[name][key]).is_file():
                raise PipelineError(f"{export_dir / exported[name][key]}: missing; rerun the export stage")
    path = layout.stage_dir("pretrain", root) / "model.pt"
    weights = checkpoint.load_weights(path, "pretrain weights", expect_variant=cfg.model.variant)
    if checkpoint.sha256(path) != manifest.get("weights_sha256"):
        raise PipelineError(f"{path}: not the weights {export_dir} was exported from; rerun the export stage")
    for backend in lat.require:
        if backend in APPLE and sys.platform != "darwin":
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
        return dense_backbone(weights["variant"], weights["state_dict"], entry["window_size"], entry["window_chunks"])
    return deploy_form(checkpoint.build_from_weights(weights))


def measure_backend(backend: str, cfg: Config, inputs: Inputs, workdir: Path) -> dict:
    """{"ran_on": ..., "models": {name: stats + samples}} for one backend; raises Skipped."""
    lat = cfg.latency
    results, ran = {}, {}
    device = None
    if backend == "iphone":
        device = backends.connect_iphone(lat.device, inputs.env, workdir / "iphone", inputs.apple)
    for name, entry in inputs.models.items():
        size = entry["size"]
        if backend == "torch":
            samples, ran = backends.run_torch(_torch_module(entry, inputs.weights), size, lat.runs, lat.warmup,
                                              lat.threads)
        elif backend == "onnxruntime":
            samples, ran = backends.run_onnxruntime(inputs.export_dir / entry["onnx"], size, lat.runs, lat.warmup,
                                                    lat.threads)
        else:
            from .coreml import unzip_package

            package = unzip_package(inputs.export_dir / entry["coreml"], workdir / backend)
            samples, ran = backends.run_coreml(package, lat.runs, lat.warmup, lat.compute_units, inputs.apple,
                                               device)
        results[name] = {**backends.summary(samples), "samples": samples}
        log.info("%s %s: median %.2f ms (p90 %.2f) over %d runs", backend, name, results[name]["median"],
                 results[name]["p90"], lat.runs)
    return {"ran_on": {**ran, "host": backends.host()}, "warmup": lat.warmup, "models": results}


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
    out = layout.stage_dir(STAGE, root)
    out.mkdir(parents=True, exist_ok=True)
    full = out / "latency.json"
    tmp = full.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(full)
    mpath = layout.metrics_path(STAGE, root)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = mpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(mpath)

    metrics = headline(results)
    if metrics:
        mlflow.log_metrics(metrics)
        srun.log_headline(metrics)
    mlflow.set_tags({f"latency.skipped.{b}": r["skipped"][:5000] for b, r in results.items() if "skipped" in r})
    mlflow.log_artifact(str(mpath), "metrics")
    mlflow.log_artifact(str(full), "latency")
    write_manifest(STAGE, root, srun, models=list(inputs.models), runs=cfg.latency.runs, warmup=cfg.latency.warmup,
                   ran_on={b: r["ran_on"] for b, r in results.items() if "ran_on" in r},
                   skipped={b: r["skipped"] for b, r in results.items() if "skipped" in r})
    log.info("measured: %s", ", ".join(f"{k.removeprefix('latency_ms.')} {v:.2f} ms" for k, v in metrics.items()))
