"""Comparing experiments: the compact `dvc exp show` view and offline `dvc plots`."""
from __future__ import annotations

import csv
import io
import json
import sys

import yaml
from conftest import make_repo


def _write(repo, rel, body):
    path = repo.path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def test_compact_exp_show_keeps_what_differs_and_headlines(tmp_path):
    repo = make_repo(tmp_path / "repo")
    _write(repo, "metrics/evaluate.json", {"top1": 0.9, "top5": 1.0, "num_images": 10, "fuse_max_abs_diff": 1e-6})
    _write(repo, "metrics/latency.json", {"onnxruntime": {"classifier_224": {"median": 1.5, "p90": 2.0, "std": 0.1}}})
    repo.git("add", "-A")
    repo.git("commit", "-qm", "baseline metrics")
    repo.set_params({"optim": {"base_lr": 0.004}})
    _write(repo, "metrics/evaluate.json", {"top1": 0.8, "top5": 1.0, "num_images": 10, "fuse_max_abs_diff": 2e-6})

    out = repo.run(sys.executable, "-m", "pipeline.exps", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["Experiment", "optim.base_lr", "top1 %", "top5 %", "params M", "GMACs", "ort 224 ms",
                             "box AP", "mask AP", "mIoU", "img/s"], list(rows[0])
    by_name = {r["Experiment"]: r for r in rows}
    assert by_name["workspace"]["optim.base_lr"] == "0.004" and by_name["workspace"]["top1 %"] == "80.00"
    baseline = next(r for name, r in by_name.items() if name != "workspace")
    assert baseline["optim.base_lr"] == "0.002" and baseline["top1 %"] == "90.00"
    assert baseline["ort 224 ms"] == "1.50" and baseline["mIoU"] == "–"
    text = repo.run(sys.executable, "-m", "pipeline.exps").stdout
    assert max(len(line) for line in text.splitlines()) < 120, text

    # `--dvc`: DVC's own table, without the dependency-hash and detail columns.
    out = repo.run(sys.executable, "-m", "pipeline.exps", "--dvc", "--csv").stdout
    cols = set(next(csv.reader(io.StringIO(out))))
    assert {"top1", "top5", "optim.base_lr", "onnxruntime.classifier_224.median"} <= cols, cols
    deps = {d for s in yaml.safe_load((repo.path / "dvc.yaml").read_text())["stages"].values() for d in s["deps"]}
    assert not cols & deps, "dependency hashes are dropped"
    assert not {"num_images", "fuse_max_abs_diff", "onnxruntime.classifier_224.p90"} & cols


def test_dvc_plots_render_offline(tmp_path):
    """`dvc plots show` writes a page whose scripts are all inline (no CDN)."""
    import re

    repo = make_repo(tmp_path / "repo")
    hist = repo.path / "artifacts/pretrain/history.csv"
    hist.parent.mkdir(parents=True)
    hist.write_text("epoch,train_loss,val_loss,val_top1,val_top5\n1,2.0,1.9,0.5,0.9\n2,1.0,0.9,0.8,1.0\n")
    repo.run("dvc", "plots", "show")
    page = (repo.path / "dvc_plots/index.html").read_text()
    assert not re.search(r"<script[^>]+src\s*=\s*[\"']?https?:", page, re.I)
    assert "vegaEmbed(" in page and "vega-lite 5." in page and page.count("<script") >= 5
    assert "dvc_plots" in (repo.path / ".gitignore").read_text()


def test_pareto_front_keeps_only_undominated_runs():
    from pipeline.core.fronts import pareto_front

    pts = [(1.0, 70.0), (0.8, 60.0), (1.2, 69.0), (2.0, 75.0), (0.8, 65.0)]
    assert sorted(pareto_front(pts)) == [0, 3, 4]


def test_report_page_is_self_contained(tmp_path):
    import base64

    from pipeline.report import page
    from pipeline.report.figures import plot_curves

    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "val_top1": 0.3 * e, "val_top5": 0.5,
                "lr": 1e-3 / e} for e in (1, 2, 3)]
    plot_curves(history, tmp_path / "curves.png")
    html = page.render("# T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![c](curves.png)\n", tmp_path, "T")
    assert "<table>" in html and "<td>1</td>" in html
    data = html.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(data) == (tmp_path / "curves.png").read_bytes()
    assert "http" not in html.lower().replace("http-equiv", "")
