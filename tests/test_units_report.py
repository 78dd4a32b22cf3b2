"""The report's tables and figures in-process (no stage run): our runs and the paper's rows never share a
column, each latency figure names its host, the accuracy axis stops at 100 %, labels at one point stack,
dense samples say which half is ground truth. The paper's figures are its Table 3 / 5 values for iFormer-T/M."""
from __future__ import annotations

from types import SimpleNamespace

from PIL import Image

from pipeline.dense.samples import caption
from pipeline.deploy.backends import host_label
from pipeline.report import compare, figures, history
from pipeline.report.sections import first_table, measured_latency


def _run(run_id: str, name: str, metrics: dict, tags: dict | None = None):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=name, status="FINISHED", start_time=0),
                           data=SimpleNamespace(metrics=metrics, tags={"iformer.variant": "iformer_t", **(tags or {})}))


def _table(lines: list[str], heading: str) -> list[list[str]]:
    """The rows (header first) of the markdown table under `heading`."""
    at = lines.index(heading)
    end = next((i for i, line in enumerate(lines[at + 1:]) if line.startswith("## ")), len(lines))
    rows = [line for line in lines[at + 1: at + 1 + end] if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows if not r.startswith("|---")]


ROWS = [
    # A run of this issue (percent metrics, the host tag) and one logged before it (fractions, no host).
    history.row(_run("a", "baseline d0e5f90", {"top1_pct": 98.89, "top5_pct": 100.0, "params_m": 2.03,
                                               "latency_ms.onnxruntime.classifier_224": 14.84},
                     {"latency_host.onnxruntime": "Intel Xeon, 2 threads", "iformer.data": "digits"})),
    history.row(_run("b", "optim.base_lr=0.004", {"top1": 0.9722, "top5": 0.9958,
                                                  "latency_ms.onnxruntime.classifier_224": 15.1})),
]


def test_rows_read_percent_and_older_fractions_alike():
    assert (ROWS[0]["top1"], ROWS[1]["top1"]) == (98.89, 97.22)
    assert ROWS[0]["latency_host"] == {"onnxruntime": "Intel Xeon, 2 threads"} and ROWS[1]["latency_host"] == {}


def test_our_runs_and_the_paper_stand_in_separate_tables():
    ours = compare.classification_table(ROWS, "a")
    table = _table(ours, "## Our runs: classification (Table 3 style)")
    header, body = table[0], table[1:]
    assert [r[0] for r in body] == ["baseline d0e5f90 (this run)", "optim.base_lr=0.004"]
    assert not any("paper" in c.lower() or "iphone" in c.lower() for row in table for c in row)
    # Each latency column is one backend, the host that timed it in the next column.
    at = header.index("latency onnxruntime (ms)")
    assert header[at + 1] == "onnxruntime host"
    assert [(r[at], r[at + 1]) for r in body] == [("14.84", "Intel Xeon, 2 threads"), ("15.10", "not recorded")]
    assert [r[header.index("data")] for r in body] == ["digits", "–"]

    paper = compare.paper_table(["iformer_t", "iformer_m", "iformer_t"])
    ptable = _table(paper, "## Paper reference (not measured here)")
    assert [r[0] for r in ptable[1:]] == ["paper iformer_m", "paper iformer_t"]
    t = dict(zip(ptable[0], ptable[2]))
    assert (t["ImageNet-1K top-1 (%)"], t["iPhone 13 latency @224 (ms)"], t["Params (M)"]) == ("74.10", "0.60", "2.90")
    m = dict(zip(ptable[0], ptable[1]))
    assert (m["COCO AP box (%)"], m["ADE20K mIoU (%)"], m["iPhone 13 backbone @512 (ms)"]) == ("40.80", "42.40", "4.00")


def test_the_reports_first_table_is_this_run_alone_with_its_hosts():
    latency = {"onnxruntime": {"ran_on": {"device": "CPU: Intel Xeon", "threads": 2, "label": "Intel Xeon, 2 threads"},
                               "models": {"classifier_32": {"median": 3.2}, "backbone_64": {"median": 9.0}}},
               "coreml": {"skipped": "not a Mac"}}
    measured = measured_latency(latency)
    assert measured == [("onnxruntime", "classifier_32", 3.2, "Intel Xeon, 2 threads")]
    lines = first_table("digits", ["2.03", "0.53"], ["98.89", "100.00"], measured, stale=False)
    header, row = ([c.strip() for c in line.strip("|").split("|")] for line in (lines[0], lines[2]))
    assert len(lines) == 3 and row[0] == "this run"
    assert dict(zip(header, row))["latency onnxruntime 32 px (ms)"] == "3.20"
    assert dict(zip(header, row))["onnxruntime host"] == "Intel Xeon, 2 threads"
    stale = first_table("digits", ["stale"] * 2, ["stale"] * 2, [], stale=True)
    assert stale[2] == "| this run | digits | stale | stale | stale | stale | stale |"


def test_host_labels_name_the_cpu_and_threads():
    assert host_label({"device": "CPU: AMD EPYC 7B13", "threads": 1}) == "AMD EPYC 7B13, 1 thread"
    assert host_label({"device": "CPU: AMD EPYC 7B13", "threads": 4}) == "AMD EPYC 7B13, 4 threads"
    assert host_label({"device": "iPhone 13 (0000)", "compute_units": "ALL"}) == "iPhone 13 (0000), Core ML ALL"


def test_the_accuracy_axis_stops_at_100_and_labels_at_one_point_stack():
    assert figures.accuracy_limits([98.89, 100.0])[1] == 100.0
    assert figures.accuracy_limits([3.0, 4.0])[0] == 2.5 and figures.accuracy_limits([0.2])[0] == 0.0
    # Two runs at one point (and a third nearby) get their labels one line apart; a far one keeps its place.
    pts = [(14.84, 98.89), (14.84, 98.89), (14.85, 98.9), (30.0, 50.0)]
    assert figures.label_offsets(pts, (0.5, 0.5)) == [0, 1, 2, 0]


def test_a_dense_sample_says_which_half_is_ground_truth(tmp_path):
    path = tmp_path / "s.png"
    Image.new("RGB", (256, 128), "black").save(path)  # the visualizers' size: ground truth | prediction
    caption(path, "000001: detection")
    img = Image.open(path)
    assert img.size == (512, 256 + 36)
    strip = img.crop((0, 0, 512, 36))
    left, right = strip.crop((0, 0, 256, 18)), strip.crop((256, 0, 512, 18))
    assert left.getextrema() != ((255, 255),) * 3 and right.getextrema() != ((255, 255),) * 3, "both halves captioned"
    assert img.getpixel((10, 100)) == (0, 0, 0), "the picture below, enlarged"


def test_the_report_shows_the_measured_field_only_once_it_has_run():
    from pipeline.report.compare import field_section

    assert field_section(None, None) == [] and field_section({"backends": {}}, None) == []
    field = {"backends": {
        "onnxruntime": {"front": ["mobilenetv3_large_075", "iformer_t"], "iformer_on_front": ["iformer_t"],
                        "spearman_vs_iphone13": 0.4166, "pairs": 27, "timed": 27},
        "executorch": {"front": [], "iformer_on_front": [], "spearman_vs_iphone13": None, "pairs": 0, "timed": 0}}}
    text = "\n".join(field_section(field, {"mlflow_run_id": "abc123"}))
    assert "MLflow run `abc123`" in text
    assert ("- **onnxruntime**: front mobilenetv3_large_075, iformer_t; iFormer on it: iformer_t; "
            "Spearman vs iPhone 13 0.42 over 27 networks") in text
    assert "![measured front on onnxruntime](field_front_onnxruntime.png)" in text
    assert "- **executorch**: front none; iFormer on it: none; Spearman vs iPhone 13 n/a over 0 networks" in text
    assert "field_front_executorch.png" not in text  # nothing timed, no figure


def test_the_head_note_uses_the_evaluate_stages_imagenet_count_and_the_report_needs_no_torch():
    import subprocess
    import sys

    from pipeline.classify.evaluate import params_with_imagenet_head

    # The official code's iFormer-T with ImageNet's 1000-class head: 2,886 k parameters (tests/test_models.py).
    assert round(params_with_imagenet_head("iformer_t") / 1e3) == 2886
    note = compare.head_note("iformer_t", 2.6186, 2.886456, 10)
    assert note == ("Params 2.62 M vs the paper's 2.90 M: the head here has 10 classes; "
                    "the same network with ImageNet's 1000-class head has 2.89 M.")
    assert compare.head_note("iformer_t", 2.6186, None, 10) is None  # an evaluate output from before the count
    assert compare.head_note("iformer_t", 2.886, 2.886, 1000) is None  # nothing to explain
    # The report stage's modules import neither torch nor timm (each a second or two of every report).
    code = ("import sys, pipeline.report.write, pipeline.report.sections, pipeline.core.checkpoint; "
            "print(sorted({'torch', 'timm'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
