"""Op census of a saved Core ML ML Program: operations by type and weight size.

Read from the saved `.mlpackage` spec, so it counts what ships. The headline is
`ops_without_const`, the operations that compute: a network has the same count
whatever its weights. `ops_total` adds the `const` ops (weights, biases and
every operation's parameters), which Core ML merges where their values are
equal, so the total depends on the weight values (iformer_m at 224: 877 with
timm's initial weights, 938 with random ones; 208 without const in both). The
paper's single-head attention argument is about reshape/transpose traffic; the
census makes it visible (`reshape_transpose`) next to the attention count
(`softmax`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"


def count_ops(spec) -> Counter:
    """MIL operations by type in every function and nested block of an ML Program spec."""
    counts: Counter = Counter()

    def walk(block) -> None:
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return counts


def census(spec, weight_bytes: int) -> dict:
    counts = count_ops(spec)
    total = sum(counts.values())
    return {
        "ops_without_const": total - counts.get("const", 0),
        "ops_total": total,
        "reshape_transpose": counts.get("reshape", 0) + counts.get("transpose", 0),
        "weight_bytes": weight_bytes,
        "by_type": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def census_of(package: Path) -> dict:
    """The census of a saved `.mlpackage` (no model load; works on any OS)."""
    import coremltools as ct

    package = Path(package)
    weights = package / WEIGHTS_DIR
    size = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0
    return census(ct.utils.load_spec(str(package)), size)


#: The op counts on the MLflow parent run and in the report: the headline, then the total beside it.
COUNTS = ("ops_without_const", "ops_total")
#: The census figures logged as metrics (the full table is in census.json).
HEADLINE = (*COUNTS, "reshape_transpose", "conv", "matmul", "softmax", "reshape", "transpose")


def headline(c: dict) -> dict:
    out = {k: c[k] for k in (*COUNTS, "reshape_transpose")}
    out.update({k: c["by_type"].get(k, 0) for k in HEADLINE[3:]})
    out["weight_mb"] = c["weight_bytes"] / 1e6
    return out
