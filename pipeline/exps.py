"""`python -m pipeline.exps`: the DVC experiments side by side, headline figures first.

The rows are `dvc exp show --json`'s (`pipeline.report.experiments`): the
params each experiment changed, its headline metrics, latency, and a mark on
rows made before a change to their params or code. Any argument not listed
below goes to `dvc exp show` (`-A`, `--rev REV`, `-n N`, ...).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

from .core import freshness, layout
from .errors import PipelineError, report
from .report import experiments


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.exps", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    form = ap.add_mutually_exclusive_group()
    form.add_argument("--md", dest="fmt", action="store_const", const="md", default="text",
                      help="a Markdown table instead of the text table")
    form.add_argument("--csv", dest="fmt", action="store_const", const="csv", help="CSV instead of the text table")
    ap.add_argument("--dvc", action="store_true",
                    help="run `dvc exp show` itself (its own table; --md / --csv go to it), with the dependency "
                         "and detail columns dropped")
    ap.add_argument("--summary", action="store_true",
                    help="one line of the workspace's headline figures from metrics/*.json (what `make pipeline` "
                         "ends with), without asking DVC")
    known, args = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    fmt = known.fmt
    try:
        root = layout.repo_root()
    except PipelineError as err:
        return report(err)
    if known.summary:
        print(f"[pipeline] this run: {experiments.workspace_summary(root)}")
        print("[pipeline] every experiment: make exps; the report: artifacts/report/report.html; "
              "MLflow: make mlflow-ui")
        return 0
    if known.dvc:
        cmd = experiments.dvc_command(root, ([f"--{fmt}"] if fmt != "text" else []) + args)
        print(shlex.join(cmd), file=sys.stderr)
        return subprocess.call(cmd, cwd=root)
    proc = subprocess.run(["dvc", "exp", "show", "--json", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr.strip() or f"error: dvc exp show exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode
    rows = experiments.mark_stale(root, experiments.rows_of(json.loads(proc.stdout or "[]")))
    sys.stdout.write(experiments.render(*experiments.table(rows), fmt))
    causes = [f"{r['name'].strip()}: {freshness.describe(r['stale_stages'])}" for r in rows if r["stale"]]
    if causes and fmt != "csv":
        sys.stdout.write(f"\n{experiments.STALE}: made before a change to its row's params or code; `dvc repro` (or `dvc exp run` "
                         "without a target) reruns what changed. Not up to date:\n" + "".join(f"  {c}\n" for c in causes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
