"""The `export` stage: Core ML and ONNX files of the trained network, checked.

Models: the classifier at its training resolution and at each of
`export.classifier_sizes`, named `classifier_<size>`, and the dense backbone
at `export.backbone_size` (`backbone_<size>`, four feature maps). Each is
exported from one `torch.export` program of its deploy form
(`iformer.export`) to

- `<name>.mlpackage.zip`: Core ML ML Program (interface checked from the saved
  spec; predictions checked against torch on macOS, skipped elsewhere);
- `<name>.onnx`: checked against torch with ONNX Runtime in FP32;
- `<name>.pte` (with `export.executorch.enabled`): ExecuTorch with the XNNPACK
  delegate, checked against torch with ExecuTorch's runtime in FP32; its census
  says what was delegated and what stayed on the portable kernels.

`census.json` holds the op census of every ML Program and, on macOS, its
compute-plan summary; `metrics/export.json` the headline census figures
(`ops_without_const` first, `ops_total` beside it: see `census`) and ONNX
differences. The models convert `export.processes` at a time, each in a
process of its own (conversion is single-threaded Python); their lines and
`convert.log` (what the libraries said) keep the targets' order. Everything
is written aside and moved in place when complete (`pipeline.core.outputs`);
the manifest comes last.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..classify.datasets import Prepared
from ..config import Config
from ..core import checkpoint, console, integrity, layout, lifecycle, spawned
from ..core.cpus import usable_cpus
from ..core.outputs import Outputs
from ..errors import PipelineError
from ..tracking.runs import StageRun
from . import census, compute_plan, coreml, executorch, onnx

log = logging.getLogger(__name__)
STAGE = "export"


@dataclass(frozen=True)
class Target:
    kind: str  # "classifier" | "backbone"
    size: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.size}"


@dataclass
class Inputs:
    weights: dict
    weights_path: Path
    classes: list[str]
    targets: list[Target]


def targets(cfg: Config, train_size: int) -> list[Target]:
    sizes = dict.fromkeys([train_size, *cfg.export.classifier_sizes])
    out = [Target("classifier", s) for s in sizes]
    if cfg.export.backbone_size is not None:
        out.append(Target("backbone", cfg.export.backbone_size))
    return out


def check(cfg: Config, root: Path) -> Inputs:
    import onnx as onnx_lib

    prepared = Prepared.load(layout.stage_dir("prepare", root))
    path, weights = checkpoint.pretrain_weights(root, cfg.model.variant, prepared.classes)
    log.info("%s weights: %s", weights["variant"], checkpoint.describe_source(weights.get("source")))
    newest = onnx_lib.defs.onnx_opset_version()
    if cfg.export.onnx.opset > newest:
        raise PipelineError(f"export.onnx.opset: {cfg.export.onnx.opset} is newer than this onnx package knows ({newest})")
    unavailable = cfg.export.executorch.enabled and executorch.available()
    if unavailable:
        raise PipelineError(f"export.executorch.enabled: {unavailable}")
    return Inputs(weights, path, prepared.classes, targets(cfg, int(weights["image_size"])))


#: The files an exported model's manifest entry may name (executorch only with export.executorch.enabled).
FILE_KEYS = ("onnx", "coreml", "executorch")
#: The backbone's window attention settings (IFormerBackbone's arguments), recorded per exported backbone.
WINDOW_KEYS = ("window_size", "window_chunks", "window_layout", "window_padding")


def window(cfg: Config) -> dict:
    """The backbone's window attention: as the detector fine-tunes and deploys it."""
    return {k: getattr(cfg.detection.backbone, k) for k in WINDOW_KEYS}


def deploy_module(target: Target, weights: dict, cfg: Config) -> torch.nn.Module:
    """The torch network a target exports, in deploy form (fused, explicit attention)."""
    from iformer.export import deploy_form, dense_backbone

    if target.kind == "backbone":
        return dense_backbone(weights["variant"], weights["state_dict"], checkpoint.layer_scale_of(weights),
                              **window(cfg))
    return deploy_form(checkpoint.build_from_weights(weights))


def output_names(target: Target, labels: bool = False) -> list[str]:
    from iformer.export import FEATURE_NAMES

    if target.kind == "backbone":
        return list(FEATURE_NAMES)
    return ["probabilities" if labels else "logits"]


def export_one(target: Target, inputs: Inputs, cfg: Config, out: Path, chatter_log: Path) -> dict:
    """Both files of one target in `out`, checked; returns its manifest entry."""
    from iformer.export import with_io

    ecfg = cfg.export
    start = time.perf_counter()
    module = deploy_module(target, inputs.weights, cfg)
    example = torch.randn(1, 3, target.size, target.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = module(example)
    ref = list(ref) if isinstance(ref, (list, tuple)) else [ref]
    names = output_names(target)
    with console.to_log(chatter_log):
        program = torch.export.export(module, (example,))
        onnx_info = onnx.export(program, module, example, out / f"{target.name}.onnx", ecfg.onnx.opset,
                                coreml.INPUT, names)
    onnx_diff = onnx.max_abs_diff(out / f"{target.name}.onnx", example, ref, ecfg.onnx.tolerance)
    pte = {}
    if ecfg.executorch.enabled:
        with console.to_log(chatter_log):
            et_census = executorch.export(program, out / f"{target.name}.pte")
        pte = {"executorch": f"{target.name}.pte", "executorch_census": et_census,
               "executorch_max_abs_diff": executorch.max_abs_diff(out / f"{target.name}.pte", example, ref,
                                                                  ecfg.executorch.tolerance)}

    labels = inputs.classes if (ecfg.coreml.class_labels and target.kind == "classifier") else None
    image = ecfg.coreml.input == "image"
    cm_module = with_io(module, mean=inputs.weights["mean"] if image else None,
                        std=inputs.weights["std"] if image else None, softmax=bool(labels))
    cm_names = output_names(target, labels=bool(labels))
    package = out / f"{target.name}.mlpackage"
    with console.to_log(chatter_log):
        cm_program = program if cm_module is module else torch.export.export(cm_module, (example,))
        coreml.convert(cm_program, target.size, cm_names, ecfg.coreml, labels).save(str(package))
    expected = coreml.expected_interface(target.size, {n: list(r.shape) for n, r in zip(cm_names, ref)},
                                         ecfg.coreml, labels)
    interface = coreml.check_interface(package, expected)
    reason = coreml.predict_unavailable()
    if reason:  # said once for all models (export_all)
        predict = {"skipped": reason}
    else:
        predict = coreml.check_predictions(package, cm_module, target.size, ecfg.coreml, labels)
    ops = census.census_of(package)
    plan = compute_plan.plan_for(package)
    zipped = coreml.zip_package(package)
    seconds = time.perf_counter() - start
    return {
        "kind": target.kind, "size": target.size, "seconds": seconds,
        "coreml": zipped.name, "onnx": f"{target.name}.onnx",
        "coreml_interface": interface, "coreml_predict_check": predict,
        "onnx_export": onnx_info, "onnx_max_abs_diff": onnx_diff,
        "census": ops, "compute_plan": plan, **pte, **(window(cfg) if target.kind == "backbone" else {}),
    }


def describe(name: str, m: dict) -> str:
    """The line a converted model gets in the stage's log."""
    ops = m["census"]
    return (f"{name}: {ops['ops_without_const']} MIL ops without const ({ops['ops_total']} with), "
            f"{ops['reshape_transpose']} reshape+transpose, {ops['weight_bytes'] / 1e6:.1f} MB weights; "
            f"ONNX {m['onnx_export']['exporter']} opset {m['onnx_export']['opset']}, "
            f"max diff {max(m['onnx_max_abs_diff'].values()):.1e}; {m['seconds']:.1f} s")


def processes(cfg: Config, models: int) -> int:
    """How many models convert at once (`export.processes`): never more than there are models."""
    wanted = cfg.export.processes
    return max(1, min(usable_cpus() if wanted == "auto" else wanted, models))


def export_all(cfg: Config, root: Path, inputs: Inputs, out: Path, failed_log: Path) -> dict:
    """Every target into `out`, `export.processes` at a time; a failure inside a library is one error
    line, naming the model, with what the libraries said kept beside the outputs. The models' lines
    and `convert.log` come in the order of the targets, however many convert at once."""
    reason = coreml.predict_unavailable()
    if reason:
        log.info("Core ML predict check skipped for the %d models: %s", len(inputs.targets), reason)
    n = processes(cfg, len(inputs.targets))
    chatter = {t.name: out / (f"convert.{t.name}.log" if n > 1 else "convert.log") for t in inputs.targets}
    if n == 1:
        results = ((t, _converted(t, inputs, cfg, out, chatter[t.name])) for t in inputs.targets)
        return {t.name: _entry(t, got, chatter[t.name], failed_log) for t, got in results}
    with spawned.pool(n) as pool:
        apart = replace(inputs, weights=None)  # each process reads the file (`_converted_apart`)
        # The costliest first, so the last to finish is a short one.
        pending = {t.name: pool.submit(_converted_apart, t, root, apart, cfg, out, chatter[t.name])
                   for t in sorted(inputs.targets, key=lambda t: (t.kind != "backbone", -t.size))}
        models = {}
        for t in inputs.targets:
            got = spawned.outcome(pending[t.name])
            if got == spawned.DIED:
                lifecycle.raise_if_stopping()
                raise _died(pending)
            models[t.name] = _entry(t, got, chatter[t.name], failed_log)
    with open(out / "convert.log", "w") as whole:
        for t in inputs.targets:
            whole.write(f"== {t.name} ==\n{chatter[t.name].read_text()}")
            chatter[t.name].unlink()
    return models


def _converted(target: Target, inputs: Inputs, cfg: Config, out: Path, chatter_log: Path) -> tuple:
    """`export_one`, its failure as data: ("ok", entry), ("error", message) for a PipelineError, or
    ("failed", type name, first line) for a library's exception (which may not survive pickling)."""
    try:
        return ("ok", export_one(target, inputs, cfg, out, chatter_log))
    except PipelineError as err:
        return ("error", str(err))
    except Exception as err:  # a network coremltools or the exporter cannot take
        return ("failed", type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")


def _converted_apart(target: Target, root: Path, inputs: Inputs, cfg: Config, out: Path, chatter_log: Path) -> tuple:
    """`_converted` in a conversion process, which reads the weights as `check` did (tensors handed
    to a spawned process would travel as shared memory through a socket in a temp dir that the
    stage's quick exit leaves behind)."""
    try:
        _, weights = checkpoint.pretrain_weights(root, cfg.model.variant, inputs.classes)
    except PipelineError as err:
        return ("error", str(err))
    return _converted(target, replace(inputs, weights=weights), cfg, out, chatter_log)


def _died(pending: dict) -> PipelineError:
    """A conversion process died: every model not converted by then fails with it, each named."""
    lost = [name for name, f in pending.items() if spawned.outcome(f) == spawned.DIED]
    return PipelineError(f"export failed: a conversion process died (killed, or crashed inside a library) "
                         f"before {', '.join(lost)} {'was' if len(lost) == 1 else 'were'} converted")


def _entry(target: Target, got: tuple, chatter_log: Path, failed_log: Path) -> dict:
    """The manifest entry of a converted model (and its line in the log), or its one error line."""
    if got[0] == "error":
        raise PipelineError(got[1])
    if got[0] == "failed":
        lifecycle.raise_if_stopping()  # unless a stop signal broke it (a library turned it into its own error)
        raise PipelineError(f"{target.name}: export failed: {got[1]}: {got[2]} "
                            f"({keep_log(chatter_log, failed_log)})")
    log.info("%s", describe(target.name, got[1]))
    return got[1]


def keep_log(log_file: Path, kept: Path) -> str:
    """Copy the libraries' output beside the outputs; says where it is, or why it could not be kept.

    A full disk (the likely cause of the failure itself) must not hide the original error.
    """
    if not log_file.exists():
        return "no library output"
    try:
        shutil.copy(log_file, kept)
    except OSError as err:
        kept.unlink(missing_ok=True)  # no 0-byte or half copy passing for the log
        return f"library output not kept: {err.strerror or type(err).__name__} writing {kept}"
    return f"library output: {kept}"


def attach_to_registry(cfg: Config, root: Path, srun: StageRun, models: dict) -> None:
    """Tag the registered version of the weights converted here with the Core ML / ONNX files."""
    from ..tracking import registry
    from ..core.outputs import read_stage_manifest

    trained_by = (read_stage_manifest("pretrain", root) or {}).get("mlflow_run_id")
    if not trained_by:  # weights put in place by hand: no registered version to attach to
        return
    files = {m[k]: f"runs:/{srun.run_id}/export/{m[k]}" for m in models.values() for k in FILE_KEYS if k in m}
    version = registry.attach(srun.client(), cfg, trained_by, files)
    if version:
        log.info("attached %d files to %s version %s", len(files), registry.model_name(cfg), version)


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    outputs = Outputs.begin(STAGE, root)
    out = outputs.dir
    failed_log = outputs.final.with_name(outputs.final.name + ".failed.log")
    failed_log.unlink(missing_ok=True)
    models = export_all(cfg, root, inputs, out, failed_log)
    for m in models.values():  # what the latency stage verifies before it times them
        m.update({f"{key}_sha256": integrity.sha256(out / m[key]) for key in FILE_KEYS if key in m})
    (out / "census.json").write_text(json.dumps(
        {n: {"census": m["census"], "compute_plan": m["compute_plan"]} for n, m in models.items()}, indent=2) + "\n")
    metrics = {n: {**census.headline(m["census"]), "onnx_max_abs_diff": max(m["onnx_max_abs_diff"].values())}
               for n, m in models.items()}
    mpath = outputs.metrics(metrics)

    flat = {f"census.{n}.{k}": v for n, m in metrics.items() for k, v in m.items() if k != "onnx_max_abs_diff"}
    flat.update({f"onnx_max_abs_diff.{n}": m["onnx_max_abs_diff"] for n, m in metrics.items()})
    flat.update({f"export_seconds.{n}": m["seconds"] for n, m in models.items()})
    flat.update({f"executorch.{n}.{k}": m["executorch_census"][k] for n, m in models.items() if "executorch" in m
                 for k in ("delegated_subgraphs", "portable_ops")})
    for n, m in models.items():
        if "skipped" not in m["compute_plan"]:
            flat.update({f"compute_plan.{n}.{k}_cost_share": v for k, v in m["compute_plan"]["cost_share"].items()})
    mlflow.log_metrics(flat)
    srun.log_headline({f"census.{n}.{k}": m[k] for n, m in metrics.items() for k in census.COUNTS})
    mlflow.log_artifacts(str(out), "export")
    mlflow.log_text(mpath.read_text(), f"metrics/{STAGE}.json")
    attach_to_registry(cfg, root, srun, models)
    ecfg = cfg.export
    outputs.manifest(srun, models=models, variant=inputs.weights["variant"],
                     weights_sha256=checkpoint.sha256(inputs.weights_path),
                     coreml={"target": ecfg.coreml.target, "precision": ecfg.coreml.precision,
                             "input": ecfg.coreml.input, "class_labels": ecfg.coreml.class_labels},
                     onnx={"opset": ecfg.onnx.opset, "tolerance": ecfg.onnx.tolerance},
                     executorch={"enabled": ecfg.executorch.enabled, "tolerance": ecfg.executorch.tolerance})
    outputs.commit()
    log.info("%d models (%s) as Core ML and ONNX -> %s", len(models), ", ".join(models), outputs.final)
