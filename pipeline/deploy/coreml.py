"""Core ML: ML Program conversion, the interface check, and predict where Core ML runs.

`convert` takes a `torch.export` program at a static shape (the window and
reshape arithmetic becomes constants, which is what lets coremltools 9
convert it). Inputs and outputs are float32 whatever the compute precision;
with `export.coreml.input: image` the input is an RGB image whose scaling to
[0, 1] Core ML does and whose mean/std normalisation is part of the graph.
`check_interface` reads the saved spec back and checks names, shapes and
types. Core ML `predict` exists only on macOS (`predict_unavailable`).
"""
from __future__ import annotations

import platform
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import PipelineError

INPUT = "image"
LABEL = "classLabel"


def convert(program, size: int, outputs: list[str], cfg, labels: list[str] | None = None):
    """An ML Program (`coremltools.models.MLModel`) from a `torch.export.ExportedProgram`."""
    import coremltools as ct

    shape = (1, 3, size, size)
    if cfg.input == "image":
        inp = ct.ImageType(name=INPUT, shape=shape, scale=1 / 255.0, bias=[0.0, 0.0, 0.0],
                           color_layout=ct.colorlayout.RGB)
    else:
        inp = ct.TensorType(name=INPUT, shape=shape, dtype=np.float32)
    classifier = ct.ClassifierConfig([str(c) for c in labels], predicted_feature_name=LABEL) if labels else None
    precision = ct.precision.FLOAT16 if cfg.precision == "fp16" else ct.precision.FLOAT32
    return ct.convert(
        program.run_decompositions({}),
        inputs=[inp],
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],
        classifier_config=classifier,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, cfg.target),
        compute_precision=precision,
    )


def _feature(f) -> dict:
    kind = f.type.WhichOneof("Type")
    if kind == "multiArrayType":
        from coremltools.proto import FeatureTypes_pb2 as ft

        dtype = ft.ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType)
        return {"name": f.name, "type": "tensor", "dtype": dtype.lower(), "shape": list(f.type.multiArrayType.shape)}
    if kind == "imageType":
        from coremltools.proto import FeatureTypes_pb2 as ft

        it = f.type.imageType
        return {"name": f.name, "type": "image", "color": ft.ImageFeatureType.ColorSpace.Name(it.colorSpace),
                "shape": [1, 3, it.height, it.width]}
    return {"name": f.name, "type": {"stringType": "string", "dictionaryType": "dict"}.get(kind, kind)}


def interface(spec) -> dict:
    return {"inputs": [_feature(f) for f in spec.description.input],
            "outputs": [_feature(f) for f in spec.description.output]}


def expected_interface(size: int, outputs: dict[str, list[int]], cfg, labels: list[str] | None) -> dict:
    """What the saved model must declare: `outputs` maps name -> torch output shape."""
    shape = [1, 3, size, size]
    inp = ({"name": INPUT, "type": "image", "color": "RGB", "shape": shape} if cfg.input == "image"
           else {"name": INPUT, "type": "tensor", "dtype": "float32", "shape": shape})
    if labels:
        outs = [{"name": LABEL, "type": "string"}, {"name": f"{LABEL}_probs", "type": "dict"}]
    else:
        outs = [{"name": n, "type": "tensor", "dtype": "float32", "shape": s} for n, s in outputs.items()]
    return {"inputs": [inp], "outputs": outs}


def check_interface(package: Path, expected: dict) -> dict:
    """The saved model's inputs/outputs; a mismatch with `expected` is an error naming the file."""
    import coremltools as ct

    got = interface(ct.utils.load_spec(str(package)))
    if got != expected:
        raise PipelineError(f"{package.name}: Core ML interface is {got}, expected {expected}")
    return got


def predict_unavailable() -> str | None:
    """Why Core ML cannot predict on this host (None: it can)."""
    if sys.platform != "darwin":
        return f"Core ML predict needs macOS; this host runs {platform.system()}"
    from coremltools.models import model as ct_model

    if getattr(ct_model, "_MLModelProxy", None) is None:
        return "coremltools has no native Core ML bindings on this host (libcoremlpython did not load)"
    return None


def check_predictions(package: Path, module, size: int, cfg, labels: list[str] | None, n: int = 4) -> dict:
    """macOS: Core ML vs torch on `n` random inputs: max abs diff relative to max |torch|, top-1 agreement."""
    import coremltools as ct
    import torch

    model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.ALL)
    rng = np.random.default_rng(0)
    worst, agree = 0.0, 0
    for _ in range(n):
        if cfg.input == "image":
            from PIL import Image

            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            feed = {INPUT: Image.fromarray(pixels)}
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
        else:
            arr = rng.standard_normal((1, 3, size, size)).astype(np.float32)
            feed = {INPUT: arr}
            x = torch.from_numpy(arr)
        with torch.no_grad():
            ref = module(x)
        ref = [t.numpy() for t in (ref if isinstance(ref, (list, tuple)) else [ref])]
        out = model.predict(feed)
        got = ([np.array([out[f"{LABEL}_probs"][str(c)] for c in labels])[None]] if labels
               else [np.asarray(out[name]) for name in _output_names(model)])
        for g, r in zip(got, ref):
            worst = max(worst, float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-12)))
        agree += int(np.argmax(got[0]) == np.argmax(ref[0]))
    if worst > cfg.tolerance:
        raise PipelineError(f"{package.name}: Core ML differs from torch by {worst:.3g} of max |output| "
                            f"(export.coreml.tolerance {cfg.tolerance})")
    return {"max_rel_diff": worst, "top1_agreement": agree / n, "inputs": n}


def _output_names(model) -> list[str]:
    return [o.name for o in model.get_spec().description.output]


def zip_package(package: Path) -> Path:
    """`name.mlpackage` -> `name.mlpackage.zip` (the directory is removed)."""
    dest = package.with_name(package.name + ".zip")
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(package.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(package.parent))
    shutil.rmtree(package)
    return dest


def unzip_package(archive: Path, into: Path) -> Path:
    """Extract `name.mlpackage.zip` under `into`; returns the `.mlpackage` path."""
    with zipfile.ZipFile(archive) as z:
        z.extractall(into)
    return Path(into) / archive.name.removesuffix(".zip")
