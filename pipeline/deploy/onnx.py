"""ONNX for Android / ONNX Runtime users, checked against torch in FP32.

`export` uses torch's dynamo exporter on the same `torch.export` program Core
ML converts. Where it cannot give the requested opset (opset 17: its
down-conversion from 18 fails on this network) or fails, the TorchScript
exporter takes over; the manifest records which one wrote the file.
"""
from __future__ import annotations

from pathlib import Path

from . import numerics


def opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export(program, module, example, path: Path, opset: int, input_name: str, output_names: list[str]) -> dict:
    """Write `path`; returns {"exporter", "opset"} (and why dynamo was not used, if it was not)."""
    import torch

    names = dict(input_names=[input_name], output_names=output_names)
    why = None
    try:
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset, verbose=False,
                                         **names)
        onnx_program.save(str(path))
        got = opset_of(path)
        if got == opset:
            return {"exporter": "dynamo", "opset": got}
        why = f"the dynamo exporter wrote opset {got}, not {opset}"
    except Exception as err:  # the exporter's own error types vary by torch version
        why = f"the dynamo exporter failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, **names)
    return {"exporter": "torchscript", "opset": opset_of(path), "dynamo_not_used": why}


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_abs_diff(path: Path, example, reference: list, tolerance: float) -> dict[str, float]:
    """ONNX Runtime vs torch on `example`, per output (`numerics.max_abs_diff`)."""
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})
    return numerics.max_abs_diff(path, "ONNX Runtime", "export.onnx.tolerance", [o.name for o in sess.get_outputs()],
                                 got, reference, tolerance)
