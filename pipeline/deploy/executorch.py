"""ExecuTorch: the `.pte` an Android or iOS app runs, with the XNNPACK delegate on the CPU.

PyTorch Mobile (the official iFormer repo's path to Android) is deprecated; its
successor is ExecuTorch. `export` lowers a `torch.export` program to the edge
dialect, hands what XNNPACK supports to its delegate and writes the program;
`census` counts what the partitioner delegated and what stayed on ExecuTorch's
portable kernels; `max_abs_diff` checks the file against torch through
ExecuTorch's own runtime, relative to each output's scale as for ONNX; `run`
times it with that runtime (the `executorch` latency backend). On macOS the Core
ML delegate is the other choice an iOS app has; it is not built here.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import numerics

#: The call that runs a delegated subgraph in the lowered program.
DELEGATE_CALL = "executorch_call_delegate"


def available() -> str | None:
    """Why ExecuTorch cannot be used here, or None."""
    try:
        import executorch.exir  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    except Exception as err:  # not installed, or its native runtime failed to load
        return f"executorch is not importable here: {type(err).__name__}: {err}"
    return None


def census(edge_program) -> dict:
    """Delegated subgraphs and the operations left on the portable kernels, by type."""
    portable: Counter = Counter()
    delegated = 0
    for node in edge_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == DELEGATE_CALL:
            delegated += 1
        elif name != "getitem":
            portable[name.split("::")[-1]] += 1
    return {"delegate": "XnnpackBackend", "delegated_subgraphs": delegated,
            "portable_ops": sum(portable.values()), "portable_by_type": dict(portable.most_common())}


def export(program, path: Path) -> dict:
    """Write `path` (a `.pte`) from a `torch.export` program; returns its census."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    ops = census(lowered.exported_program())
    path.write_bytes(lowered.to_executorch().buffer)
    return ops


def _method(path: Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def set_threads(threads: int) -> None:
    """The size of ExecuTorch's CPU thread pool (XNNPACK's kernels run on it)."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def max_abs_diff(path: Path, example, reference: list, tolerance: float) -> dict[str, float]:
    """ExecuTorch vs torch on `example`, per output (`numerics.max_abs_diff`)."""
    got = _method(path).execute([example])
    return numerics.max_abs_diff(path, "ExecuTorch", "export.executorch.tolerance",
                                 [f"output{i}" for i in range(len(reference))], got, reference, tolerance)


def run(path: Path, size: int, runs: int, warmup: int, threads: int, time_calls, cpu: str) -> tuple[list, dict]:
    """Timings of `path` in ms with ExecuTorch's runtime on this CPU, and what ran them."""
    import executorch
    import torch

    set_threads(threads)
    method = _method(path)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    samples = time_calls(lambda: method.execute([x]), runs, warmup)
    version = getattr(executorch, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("executorch")
    ran = {"device": f"CPU: {cpu}", "threads": threads, "precision": "fp32", "delegate": "XNNPACK",
           "versions": {"executorch": version}}
    return samples, ran
