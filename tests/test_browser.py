"""Two short real pipeline runs, the cross-run report, and the MLflow UI in headless Chromium.

The store comes from real stages (prepare, pretrain, evaluate, export, latency,
report) run twice with different params; `mlflow server` serves it on
127.0.0.1 and Debian's chromium (driven by selenium through chromedriver)
opens the runs table, the compare view and the report page.
"""
from __future__ import annotations

import copy
import json
import shutil
import time

import pytest
from cluster_fixture import MlflowServer
from conftest import TINY, deep_update, make_repo

from pipeline.tracking import runs

pytestmark = pytest.mark.slow

SHORT = deep_update(copy.deepcopy(TINY), {
    "train": {"epochs": 1},
    "export": {"classifier_sizes": [], "backbone_size": None},
    "latency": {"backends": ["onnxruntime"], "models": ["classifier_32"], "runs": 4, "warmup": 1},
})
STAGES = ("pretrain", "evaluate", "export", "latency", "report")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("browser") / "repo", SHORT)
    repo.stage("prepare", env={"IFORMER_PIPELINE_RUN": "run-a"})
    for stage in STAGES:
        repo.stage(stage, env={"IFORMER_PIPELINE_RUN": "run-a"})
    repo.set_params({"optim": {"base_lr": 0.004}})  # an experiment: not committed
    for stage in STAGES:
        repo.stage(stage, env={"IFORMER_PIPELINE_RUN": "run-b"})
    return repo


def _parents(repo):
    return sorted(repo.runs(f"tags.`{runs.TAG_KIND}` = 'pipeline'"), key=lambda r: r.info.start_time)


def _child(repo, parent, stage: str):
    return next(r for r in repo.runs(f"tags.`{runs.TAG_PARENT}` = '{parent.info.run_id}'")
                if r.data.tags[runs.TAG_STAGE] == stage)


def _cpu() -> str:
    """The CPU model as /proc/cpuinfo names it (read here, not through the pipeline)."""
    return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))


def test_parents_hold_headlines_and_the_report_compares_runs(two_runs):
    repo = two_runs
    a, b = _parents(repo)
    for p in (a, b):
        m = p.data.metrics
        assert {"top1_pct", "top5_pct", "params_m", "gmacs_224", "latency_ms.onnxruntime.classifier_32",
                "img_per_sec", "wall_s"} <= set(m), sorted(m)
        assert "top1" not in m, "one unit on the parent: percent"
        # The evaluate child holds the fraction metrics/evaluate.json has; the parent percent, to 0.01.
        assert m["top1_pct"] == round(100 * _child(repo, p, "evaluate").data.metrics["top1"], 2)
        assert p.data.tags["latency_host.onnxruntime"] == f"{_cpu()}, 1 thread"  # params.yaml latency.threads
        assert p.data.tags["mlflow.source.git.commit"] == p.data.tags["iformer.git_commit"]
        assert p.info.end_time - p.info.start_time >= 1000 * m["wall_s"] - 1000
    assert a.data.tags["iformer.params_changed"] == "baseline"
    assert b.data.tags["iformer.params_changed"] == "optim.base_lr=0.004"
    # Named after what they changed (no DVC experiment here), not pipeline-<timestamp>.
    assert a.info.run_name == f"baseline {a.data.tags['iformer.git_commit'][:7]}"
    assert b.info.run_name == "optim.base_lr=0.004"

    client = repo.mlflow_client()
    name = f"{repo.params()['mlflow']['experiment']}.iformer_t"
    versions = client.search_model_versions(f"name='{name}'")
    pre_a, pre_b = _child(repo, a, "pretrain"), _child(repo, b, "pretrain")
    # mlflow.register_model: baseline (the default): run b changed a param and registers nothing.
    assert [v.run_id for v in versions] == [pre_a.info.run_id]
    va = versions[0]
    assert va.tags["export.classifier_32.onnx"].startswith("runs:/")
    assert any(k.endswith(".mlpackage.zip") for k in va.tags)
    assert va.tags["top1_pct"] == f"{a.data.metrics['top1_pct']:g}" and va.tags["iformer.params_changed"] == "baseline"
    assert a.info.run_name in va.description and a.info.run_id in va.description
    assert {a.path for a in client.list_artifacts(pre_b.info.run_id, "checkpoints")} == {"checkpoints/model.pt"}
    assert not list((repo.path / "ray_results").glob("pretrain-*/epoch-*")), "checkpoints pruned after success"

    out = repo.path / "artifacts/report"
    summary = json.loads((out / "report.json").read_text())
    assert [r["run_id"] for r in summary["runs"]] == [a.info.run_id, b.info.run_id]
    assert summary["identity"]["parent_run_id"] == b.info.run_id
    assert summary["identity"]["params_changed"] == {"optim.base_lr": {"baseline": 0.002, "value": 0.004}}
    assert abs(summary["ours"]["top1"] - b.data.metrics["top1_pct"]) <= 0.005, "percent, as the paper's"
    points = summary["pareto"]["onnxruntime"]
    assert len(points) == 2 and any(p["on_front"] for p in points)
    md = (out / "report.md").read_text()
    assert "Table 3 style" in md and "paper iformer_t" in md and "`optim.base_lr` 0.002 → 0.004" in md
    assert "1000-class head" in md
    page = (out / "report.html").read_text()
    assert "src=\"data:image/png;base64," in page and "http://" not in page and "https://" not in page
    files = {f.path for f in client.list_artifacts(b.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/report.json", "report/pareto_onnxruntime.png"} <= files


@pytest.fixture(scope="module")
def server(two_runs, tmp_path_factory):
    """The UI over the two runs' own store (`mlflow/mlflow.db` in their repo): its URL."""
    ui = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), store=two_runs.path / "mlflow" / "mlflow.db",
                      env=two_runs.env, cwd=two_runs.path)
    try:
        yield ui.uri
    finally:
        ui.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium / chromedriver missing: scripts/setup.sh installs Debian's chromium and chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=3600,1000",
                "--disable-gpu"):
        opts.add_argument(arg)
    b = webdriver.Chrome(options=opts, service=Service(driver))
    b.set_page_load_timeout(60)
    yield b
    b.quit()


def _wait_text(browser, needles, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = browser.find_element("tag name", "body").text
        if all(n in text for n in needles):
            return text
        time.sleep(1)
    raise AssertionError(f"{needles} not on {browser.current_url}:\n{text[:3000]}")


def test_mlflow_ui_lists_parent_runs_and_compares_them(two_runs, server, browser, tmp_path):
    from pipeline.tracking import store, view

    a, b = _parents(two_runs)
    exp = a.info.experiment_id
    # What `make mlflow-ui` prints: the runs table (model-training view) opened on the headline view.
    port = int(server.rsplit(":", 1)[1])
    browser.get(store.ui_url(exp, port, view.KEY))
    # No Columns menu: the headline columns are there, in percent (the evaluate child's fraction x 100).
    pct = [f"{100 * _child(two_runs, p, 'evaluate').data.metrics['top1']:.2f}" for p in (a, b)]
    text = _wait_text(browser, [a.info.run_name, b.info.run_name, "top1_pct", "top5_pct", "params_m",
                                "latency_ms.onnxruntime.classifier_32", *pct])
    assert "iformer.params_changed" in text
    browser.save_screenshot(str(tmp_path / "runs.png"))

    ids = json.dumps([a.info.run_id, b.info.run_id])
    browser.get(f"{server}/#/compare-runs?runs={ids}&experiments={json.dumps([exp])}")
    text = _wait_text(browser, ["top1_pct", "params_m", a.info.run_name, b.info.run_name])
    assert "latency_ms.onnxruntime.classifier_32" in text and "optim.base_lr" in text and all(v in text for v in pct)
    browser.save_screenshot(str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_report_and_dvc_plots_render_in_the_browser(two_runs, browser, tmp_path):
    page = two_runs.path / "artifacts/report/report.html"
    browser.get(page.as_uri())
    widths = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) >= 2 and all(w > 0 for w in widths), widths
    assert "Accuracy vs latency: onnxruntime" in browser.find_element("tag name", "body").text
    browser.save_screenshot(str(tmp_path / "report.png"))
    # Tables as the page shows them: the first is this run alone; no table holds our rows and the paper's.
    tables = browser.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(t => Array.from(t.rows).map(r => Array.from(r.cells)"
        ".map(c => c.innerText)))")
    first = tables[0]
    assert [r[0] for r in first[1:]] == ["this run"], first
    assert not any("paper" in c.lower() or "iphone" in c.lower() for row in first for c in row), first
    for t in tables:
        paper = [r[0].lower().startswith("paper") for r in t[1:]]
        assert all(paper) or not any(paper), t
    assert any(all(r[0].startswith("paper ") for r in t[1:]) for t in tables), "the paper's rows, as reference"

    two_runs.run("dvc", "plots", "show")
    browser.get((two_runs.path / "dvc_plots/index.html").as_uri())
    deadline = time.time() + 30
    while time.time() < deadline and not browser.execute_script(
            "return document.querySelectorAll('svg.marks, canvas.marks').length"):
        time.sleep(0.5)
    # One chart per quantity (loss, accuracy), axes named in dvc.yaml; no third chart from a stage's own entry.
    assert browser.execute_script("return document.querySelectorAll('svg.marks, canvas.marks').length") == 2
    spec = (two_runs.path / "dvc_plots/index.html").read_text()  # the charts' vega specs, as dvc wrote them
    assert '"title": "cross-entropy loss"' in spec and '"text": "Validation accuracy per epoch"' in spec
    browser.save_screenshot(str(tmp_path / "dvc-plots.png"))
