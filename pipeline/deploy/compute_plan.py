"""Where Core ML would run each operation: `MLComputePlan`, summarised (macOS only).

A model that is slow on the phone usually has operations that fall off the
Neural Engine. `summarize(plan)` reads, for every ML Program operation, the
preferred and supported compute devices and the estimated cost share, and
returns the share of operations and of cost per device plus the operations
not on the Neural Engine. It reads only these attributes of coremltools'
objects: `plan.model_structure.program.functions["main"].block.operations`,
each operation's `operator_name`, `outputs[i].name` and `blocks`, and
`plan.get_compute_device_usage_for_mlprogram_operation(op)`
(`preferred_compute_device`, `supported_compute_devices`) and
`plan.get_estimated_cost_for_mlprogram_operation(op)` (`weight`).
"""
from __future__ import annotations

import platform
import sys
from collections import Counter
from pathlib import Path

KINDS = ("neural_engine", "gpu", "cpu")


def device_kind(device) -> str:
    from coremltools.models import compute_device as cd

    for cls, kind in ((cd.MLNeuralEngineComputeDevice, "neural_engine"), (cd.MLGPUComputeDevice, "gpu"),
                      (cd.MLCPUComputeDevice, "cpu")):
        if isinstance(device, cls):
            return kind
    return "unknown"


def _operations(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def summarize(plan, top: int = 30) -> dict:
    """Shares per device of operations and estimated cost, and what falls off the Neural Engine."""
    program = plan.model_structure.program
    if program is None:
        raise ValueError("the compute plan is not of an ML Program")
    ops, total_cost = 0, 0.0
    n_ops: Counter = Counter()
    cost: Counter = Counter()
    off = []
    for op in _operations(program.functions["main"].block):
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        if usage is None:  # constants and other operations that do not run
            continue
        estimate = plan.get_estimated_cost_for_mlprogram_operation(op)
        weight = float(estimate.weight) if estimate is not None else 0.0
        kind = device_kind(usage.preferred_compute_device)
        ops += 1
        total_cost += weight
        n_ops[kind] += 1
        cost[kind] += weight
        if kind != "neural_engine":
            off.append({"type": op.operator_name, "output": op.outputs[0].name if op.outputs else "",
                        "device": kind, "supported": sorted({device_kind(d) for d in usage.supported_compute_devices}),
                        "cost": weight})
    off.sort(key=lambda o: -o["cost"])
    return {
        "ops": ops,
        "op_share": {k: n_ops[k] / ops if ops else 0.0 for k in KINDS},
        "cost_share": {k: cost[k] / total_cost if total_cost else 0.0 for k in KINDS},
        "off_neural_engine_ops": len(off),
        "off_neural_engine_by_type": dict(Counter(o["type"] for o in off).most_common()),
        "off_neural_engine": off[:top],
    }


def unavailable() -> str | None:
    """Why no compute plan can be made on this host (None: it can)."""
    if sys.platform != "darwin":
        return f"MLComputePlan needs macOS (Core ML framework); this host runs {platform.system()}"
    from coremltools.models import compute_plan

    if compute_plan._MLModelProxy is None:
        return "coremltools has no native Core ML bindings on this host (libcoremlpython did not load)"
    return None


def plan_for(package: Path, compute_units: str = "ALL") -> dict:
    """The summary of `package`'s compute plan, or `{"skipped": reason}`."""
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    try:
        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit[compute_units])
        plan = MLComputePlan.load_from_path(model.get_compiled_path(), ct.ComputeUnit[compute_units])
        return summarize(plan)
    except Exception as err:  # e.g. macOS older than 14.4: the plan API is missing
        return {"skipped": f"MLComputePlan failed on this host: {type(err).__name__}: {err}"}
