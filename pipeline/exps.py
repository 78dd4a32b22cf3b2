"""`python -m pipeline.exps`: `dvc exp show`, narrowed to what tells experiments apart.

The plain table has a column per dependency hash (every file in a stage's
`deps`) and per latency statistic; this drops those, keeps only params and
metrics whose values differ across the rows shown (`--only-changed`) plus the
headline metrics (top-1/5, params, GMACs, median latencies, AP, mIoU), and
passes any other argument on (`--md`, `--csv`, `-A`, `--sort-by top1`, ...).
`--print-command` shows the `dvc` command instead of running it.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from . import layout

#: Metric columns that are detail rather than headline: latency spread, op-census
#: breakdown, numerical checks. They stay in metrics/*.json and `dvc metrics show`.
NOISY_METRICS = (r".*\.(mean|std|min|max|p90|runs)", r".*(ops_without_const|reshape_transpose|weight_mb|softmax|"
                 r"layer_norm|gelu|matmul|conv)", r".*max_abs_diff.*", r"num_images", r".*_seconds", r".*\.skipped",
                 r"miou_majority_baseline", r"(bbox|segm)_ap(50|75)", r"macc|aacc")


#: Headline columns, shown even when every row agrees.
HEADLINE = (r"top1", r"top5", r"params_m", r"gmacs_224", r".*\.median", r"bbox_ap", r"segm_ap", r"miou", r"img_per_sec",
            r"train_s")


def dependency_paths(root: Path) -> list[str]:
    """Every `deps` path of every stage in dvc.yaml: the hash columns of `dvc exp show`."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return sorted({d for s in stages.values() for d in s.get("deps", [])})


def drop_pattern(root: Path) -> str:
    deps = [re.escape(d) for d in dependency_paths(root)]
    return "^(" + "|".join(deps + list(NOISY_METRICS) + ["Created"]) + ")$"


def command(root: Path, extra: list[str]) -> list[str]:
    keep = "^(" + "|".join(HEADLINE) + ")$"
    return ["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", drop_pattern(root), "--keep", keep, *extra]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    root = layout.repo_root()
    if "--print-command" in args:
        args.remove("--print-command")
        print(shlex.join(command(root, args)))
        return 0
    return subprocess.call(command(root, args), cwd=root)


if __name__ == "__main__":
    sys.exit(main())
