"""The measured field: the paper's networks through our export and timing path, ExecuTorch as a backend.

Checked against independent sources: Spearman's rank correlation against values
worked by hand, the networks' parameter counts against the paper's Table 3, the
`.pte`'s outputs against torch, and timm's own model list for the name mapping.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import timm
import torch

from conftest import exported_repo, make_repo
from iformer.reference import BASELINES, FIELD_IFORMERS
from pipeline.core.fronts import pareto_front, ranks, spearman
from pipeline.deploy import bench, executorch
from pipeline.errors import PipelineError
from pipeline.field import measured

SMALL = ["mobilenetv3_large_075", "mobilenetv2_100"]  # two Table 3 rows, quick to export


def test_ranks_share_ties_and_spearman_matches_hand_worked_values():
    assert ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    # No ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120 = 0.8.
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # Ties: ranks of b are 1, 2, 3.5, 5, 3.5; covariance of the ranks 8, variances 10 and 9.5.
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 2, 3], [4, 4, 4]) is None


def test_the_fields_default_networks_are_table_3_rows_timm_has_at_the_papers_resolution():
    rows = measured.paper_rows()
    others = [n for n in rows if n not in FIELD_IFORMERS]
    assert len(others) >= 20 and set(FIELD_IFORMERS) <= set(rows)
    assert not [n for n in rows if n not in timm.list_models()]
    by_row = {b.model: b for b in BASELINES}
    # The paper's resolutions (Table 3): FastViT and MNV4-M at 256, EfficientViT-B1 at 288.
    assert rows["fastvit_t12"]["size"] == 256 and rows["efficientvit_b1"]["size"] == 288
    assert rows["mobilenetv4_conv_medium"]["size"] == 256 and rows["repvit_m1_0"]["size"] == 224
    assert rows["iformer_m"] == {"paper_name": "iFormer-M", "size": 224, "paper_params_m": 8.9, "paper_gmacs": 1.64,
                                 "iphone13_ms": 1.10, "paper_top1": 80.4}
    assert by_row["RepViT-M1.5 (2024)"].timm == "repvit_m1_5" and by_row["SBCFormer-XS (2024)"].timm is None


def test_a_front_on_measured_latencies():
    # (ms, top-1): the second is slower and less accurate than the first; equal points both stay.
    assert sorted(pareto_front([(1.0, 75.0), (2.0, 74.0), (3.0, 80.0), (3.0, 80.0)])) == [0, 2, 3]
    rows = [{"model": m, "paper_top1": top1, "iphone13_ms": phone, "backends": {"x": {"median": ms}}}
            for m, top1, phone, ms in (("a", 72.0, 0.7, 5.0), ("iformer_t", 74.1, 0.6, 6.0), ("b", 73.0, 0.9, 9.0))]
    s = measured.backend_summary(rows, "x")
    assert s["front"] == ["a", "iformer_t"] and s["iformer_on_front"] == ["iformer_t"]
    assert s["spearman_vs_iphone13"] == pytest.approx(0.5)  # ranks here 1, 2, 3 vs iPhone 2, 1, 3
    assert {m["model"]: m["moved"] for m in s["moved_most"]} == {"a": -1, "iformer_t": 1, "b": 0}


@pytest.mark.slow  # three exporters for two networks: ~40 s, past the fast tier's budget
def test_two_networks_export_and_time_on_onnxruntime_torch_and_executorch(tmp_path):
    names = ["onnxruntime", "torch", "executorch", "mac"]
    rows = bench.time_all([(m, 224) for m in SMALL], names, bench.Settings(runs=3, warmup=1), tmp_path)
    paper = {b.timm: b for b in BASELINES}
    for row in rows:
        # Our count of the network we time is the paper's Table 3 figure, within 5 % (MobileNetV2 1.0x:
        # 3.50 M in timm, printed 3.4 M as in its own paper).
        assert row["params_m"] == pytest.approx(paper[row["model"]].params_m, rel=0.05), row
        for b in ("onnxruntime", "torch", "executorch"):
            r = row["backends"][b]
            assert r["runs"] == 3 and 0 < r["min"] <= r["median"] <= r["p90"] <= r["max"], (b, r)
        assert row["backends"]["executorch"]["label"].endswith("1 thread")
        if sys.platform != "darwin":
            assert "macOS" in row["backends"]["mac"]["skipped"]
    table = bench.table(rows, names)
    assert table.count("\n") == 3 and "mobilenetv2_100 | 224 | 3.50 |" in table


def test_a_network_that_cannot_be_built_is_a_row_with_its_reason(tmp_path):
    rows = bench.time_all([("not_a_network", 224)], ["torch"], bench.Settings(runs=1, warmup=0), tmp_path)
    assert "failed" in rows[0]["backends"]["torch"], rows


def test_the_pte_matches_torch_and_says_what_xnnpack_took(tmp_path):
    # timm's own test network (convolutions, batch norm, SiLU, squeeze-excite, a head): lowered in
    # a third of mobilenetv2_100's time; the field's networks are lowered by the slow tests below.
    net = bench.Network("test_efficientnet", 96, tmp_path)
    path = tmp_path / "test_efficientnet.pte"
    ops = executorch.export(net._export(), path)  # one lowering: the file and its census
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [net.torch_module()(x)]
    diffs = executorch.max_abs_diff(path, x, ref, tolerance=1e-4)
    assert list(diffs) == ["output0"] and diffs["output0"] < 1e-4 * max(1.0, ref[0].abs().max().item())
    with pytest.raises(PipelineError, match="ExecuTorch differs from torch"):
        executorch.max_abs_diff(path, x, [ref[0] + 1.0], tolerance=1e-4)
    assert ops["delegated_subgraphs"] >= 1 and ops["portable_ops"] == sum(ops["portable_by_type"].values())


def test_bench_refuses_an_unknown_backend_in_one_line(capsys):
    assert bench.main(["mobilenetv2_100", "--backends", "torch,tflite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --backends: unknown tflite"), err


def test_field_refuses_a_network_timm_lacks(tmp_path):
    repo = make_repo(tmp_path / "repo", {"field": {"networks": ["mobilenetv2_100", "sbcformer_xs"]}})
    repo.stage_error("field", "field.networks: sbcformer_xs not in timm")


@pytest.mark.slow
def test_dvc_repro_of_the_field_stage_measures_the_front_and_logs_it(tmp_path):
    repo = make_repo(tmp_path / "repo", {"field": {"networks": SMALL + ["iformer_t"], "runs": 3, "warmup": 1,
                                                   "backends": ["onnxruntime", "executorch"]}})
    out = repo.run("dvc", "repro", "field/dvc.yaml", timeout=900)
    assert "Running stage 'field/dvc.yaml:field'" in out.stdout + out.stderr
    art = repo.path / "artifacts/field"
    data = json.loads((art / "field.json").read_text())
    assert [r["model"] for r in data["rows"]] == SMALL + ["iformer_t"]
    assert {r["paper_top1"] for r in data["rows"]} == {73.3, 72.0, 74.1}  # Table 3, not measured
    for b in ("onnxruntime", "executorch"):
        assert (art / f"front_{b}.png").stat().st_size > 10_000
        assert data["backends"][b]["front"], data["backends"][b]
    metrics = json.loads((repo.path / "metrics/field.json").read_text())
    assert metrics["networks"] == 3 and -1 <= metrics["onnxruntime"]["spearman_vs_iphone13"] <= 1
    md = (art / "field.md").read_text()
    assert "![front on executorch](front_executorch.png)" in md and "paper top-1" in md
    run = repo.runs("tags.`iformer.stage` = 'field'")
    assert len(run) == 1 and run[0].data.metrics["field.onnxruntime.timed"] == 3
    # The default `dvc repro` does not run it; a second `dvc repro field/dvc.yaml` has nothing to do.
    assert "field" not in repo.run("dvc", "status").stdout
    again = repo.run("dvc", "repro", "field/dvc.yaml")
    assert "didn't change, skipping" in again.stdout + again.stderr


@pytest.mark.slow
def test_the_export_stage_writes_a_checked_pte_and_the_latency_stage_times_it(tmp_path):
    over = {"export": {"classifier_sizes": [], "backbone_size": 64, "executorch": {"enabled": True}},
            "detection": {"backbone": {"window_size": 2, "window_chunks": 2}},
            "latency": {"backends": ["executorch", "onnxruntime"], "models": ["classifier_32", "backbone_64"],
                        "runs": 3, "warmup": 1}}
    repo = exported_repo(tmp_path / "repo", over, "executorch-test")
    manifest = json.loads((repo.path / "artifacts/export/manifest.json").read_text())
    for name, model in manifest["models"].items():
        assert (repo.path / "artifacts/export" / model["executorch"]).stat().st_size > 10_000, name
        assert len(model["executorch_sha256"]) == 64
        ops = model["executorch_census"]
        assert ops["delegated_subgraphs"] >= 1 and ops["portable_ops"] == sum(ops["portable_by_type"].values())
        # Within the tolerance of each output's scale (max |torch|, at least 1), as for ONNX.
        assert len(model["executorch_max_abs_diff"]) == (4 if model["kind"] == "backbone" else 1)
    repo.stage("latency", env={"IFORMER_PIPELINE_RUN": "executorch-test"})
    table = json.loads((repo.path / "metrics/latency.json").read_text())
    for model in ("classifier_32", "backbone_64"):
        s = table["executorch"][model]
        assert s["runs"] == 3 and 0 < s["min"] <= s["median"] <= s["max"], s
    full = json.loads((repo.path / "artifacts/latency/latency.json").read_text())
    assert full["executorch"]["ran_on"]["delegate"] == "XNNPACK"
    assert "executorch" in full["executorch"]["ran_on"]["versions"]
