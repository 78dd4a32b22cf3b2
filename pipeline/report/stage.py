"""`run`: write `artifacts/report/` (report.md, report.html, report.json, PNG figures) and log it."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .. import baseline, console, layout
from ..config import Config
from ..tracking import StageRun, git_commit, write_manifest
from . import compare, figures, page, runs
from .sections import Inputs, build


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    final = layout.stage_dir("report", root)
    out = final.with_name(final.name + ".tmp")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    client = srun.client()
    markdown, summary = build(cfg, inputs)
    figures.plot_curves(inputs.history, out / "curves.png")

    rows = runs.pipeline_runs(client, srun.experiment_id)
    changed = baseline.differing(cfg, root)
    extra = compare.identity(cfg.mlflow.experiment, git_commit(root), srun.parent_run_id, changed)
    note = compare.head_note(cfg.model.variant, summary["ours"]["params_m"], inputs.prepare.get("num_classes", 1000))
    if note:
        extra += ["", note]
    extra += compare.classification_table(rows, srun.parent_run_id)
    summary["pareto"] = {}
    for backend in runs.backends(rows):
        image = f"pareto_{backend}.png"
        points = figures.plot_pareto(rows, backend, out / image)
        summary["pareto"][backend] = points
        extra += compare.pareto_section(backend, image, points)
    extra += compare.dense_table(rows) + compare.census_table(rows)
    head, _, rest = markdown.partition("\n## ")
    markdown = head + "\n".join(extra) + "\n\n## " + rest if rest else head + "\n".join(extra) + "\n"
    summary.update(identity={"experiment": cfg.mlflow.experiment, "commit": git_commit(root),
                             "parent_run_id": srun.parent_run_id, "params_changed": changed}, runs=rows)

    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.html").write_text(page.render(markdown, out, f"iFormer pipeline report: {cfg.model.variant}"))
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    mlflow.log_artifacts(str(final), "report")
    client.log_artifacts(srun.parent_run_id, str(final), "report")
    write_manifest("report", root, srun, top1=summary["ours"]["top1"], runs=len(rows),
                   files=sorted(p.name for p in final.iterdir()))
    # The console gets the headline table (this run beside the paper); the rest is in the page.
    table = [line for line in markdown.split("\n## ")[0].splitlines() if line.startswith("|")]
    print("\n".join(table), file=sys.stderr)
    console.say("report", f"{len(rows)} pipeline runs compared; the full report: {final / 'report.html'}")
