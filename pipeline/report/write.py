"""`run`: write `artifacts/report/` (report.md, report.html, report.json, PNG figures) and log it.

Inputs from stages that are not up to date with this run (`StageRun.stale`)
are dropped first: the report marks them stale instead of showing them.
"""
from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

from ..config import Config
from ..core import console, layout
from ..core.outputs import Outputs, read_stage_manifest
from ..tracking import baseline
from ..tracking.invocation import git_commit
from ..tracking.runs import StageRun
from . import compare, figures, history, page
from .sections import Inputs, build


def field_section(root: Path, out: Path) -> list[str]:
    """The measured field's summary and figures, copied beside the report, if `make field` has run."""
    field_dir = layout.stage_dir("field", root)
    manifest = read_stage_manifest("field", root)
    if not manifest or not (field_dir / "field.json").is_file():
        return []
    for png in field_dir.glob("front_*.png"):
        shutil.copy(png, out / f"field_{png.name}")
    return compare.field_section(json.loads((field_dir / "field.json").read_text()), manifest)


def run(cfg: Config, root: Path, inputs: Inputs, srun: StageRun) -> None:
    import mlflow

    outputs = Outputs.begin("report", root)
    out = outputs.dir
    client = srun.client()
    inputs = inputs.without_stale(srun.stale)  # the previous model's figures are not this run's
    markdown, summary = build(cfg, inputs)
    if inputs.history:  # none when released weights were passed through
        figures.plot_curves(inputs.history, out / "curves.png")

    rows = history.pipeline_runs(client, srun.experiment_id)
    changed = baseline.differing(cfg, root)
    extra = compare.identity(cfg.mlflow.experiment, git_commit(root), srun.parent_run_id, changed)
    note = compare.head_note(cfg.model.variant, summary["ours"]["params_m"], inputs.evaluation.get("params_m_1000_classes"),
                             inputs.prepare.get("num_classes", 1000))
    if note:
        extra += ["", note]
    extra += compare.classification_table(rows, srun.parent_run_id)
    summary["pareto"] = {}
    for backend in history.backends(rows):
        image = f"pareto_{backend}.png"
        points = figures.plot_pareto(rows, backend, out / image)
        summary["pareto"][backend] = points
        extra += compare.pareto_section(backend, image, points, rows)
    extra += compare.dense_table(rows) + compare.census_table(rows)
    extra += compare.paper_table(r["variant"] for r in rows if r["variant"])
    extra += field_section(root, out)
    head, _, rest = markdown.partition("\n## ")
    markdown = head + "\n".join(extra) + "\n\n## " + rest if rest else head + "\n".join(extra) + "\n"
    summary.update(identity={"experiment": cfg.mlflow.experiment, "commit": git_commit(root),
                             "parent_run_id": srun.parent_run_id, "params_changed": changed}, runs=rows)

    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.html").write_text(page.render(markdown, out, f"iFormer pipeline report: {cfg.model.variant}"))
    mlflow.log_artifacts(str(out), "report")
    client.log_artifacts(srun.parent_run_id, str(out), "report")
    outputs.manifest(srun, top1=summary["ours"]["top1"], runs=len(rows), stale=inputs.stale,
                     files=sorted(p.name for p in out.iterdir()))
    outputs.commit()
    final = outputs.final
    # The console gets the first table (this run alone); the paper's reference row and the rest are in the page.
    head = markdown.split("\n## ")[0].splitlines()
    start = next((i for i, line in enumerate(head) if line.startswith("|")), len(head))
    print("\n".join(itertools.takewhile(lambda line: line.startswith("|"), head[start:])), file=sys.stderr)
    console.say("report", f"{len(rows)} pipeline runs compared; the full report: {final / 'report.html'}")
