"""Console lines said once: the export stage's Core ML predict skip is one line per export, not one per
model (the per-model conversion is stubbed; `coreml.predict_unavailable` is the real check of this host)."""
from __future__ import annotations

import copy
import logging
import sys

import pytest

from conftest import TINY
from pipeline.config import parse_config
from pipeline.deploy import coreml, export


@pytest.mark.skipif(sys.platform == "darwin", reason="a Mac may run Core ML predict")
def test_the_core_ml_predict_skip_is_said_once_per_export(tmp_path, monkeypatch, caplog):
    targets = [export.Target("classifier", 224), export.Target("classifier", 32), export.Target("backbone", 512)]
    inputs = export.Inputs(weights={}, weights_path=tmp_path / "model.pt", classes=[], targets=targets)
    stub = {"coreml_predict_check": {"skipped": "stub"}, "seconds": 1.0, "onnx_max_abs_diff": {"logits": 1e-6},
            "onnx_export": {"exporter": "dynamo", "opset": 18},
            "census": {"ops_without_const": 172, "ops_total": 774, "reshape_transpose": 20, "weight_bytes": 5.2e6}}
    monkeypatch.setattr(export, "export_one", lambda t, *a: stub)
    cfg = parse_config(copy.deepcopy(TINY))
    cfg.export.processes = 1  # in-process: the stub stays in place
    with caplog.at_level(logging.INFO, logger=export.__name__):
        models = export.export_all(cfg, tmp_path, inputs, tmp_path, tmp_path / "failed.log")
    assert list(models) == ["classifier_224", "classifier_32", "backbone_512"]
    said = [r.getMessage() for r in caplog.records if "predict check skipped" in r.getMessage()]
    assert said == [f"Core ML predict check skipped for the 3 models: {coreml.predict_unavailable()}"]
    assert "macOS" in said[0]
    # Then one line per model, in the targets' order.
    lines = [r.getMessage() for r in caplog.records if "MIL ops" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["classifier_224", "classifier_32", "backbone_512"]
    assert lines[0] == ("classifier_224: 172 MIL ops without const (774 with), 20 reshape+transpose, 5.2 MB weights; "
                        "ONNX dynamo opset 18, max diff 1.0e-06; 1.0 s")


def test_the_ray_log_keeps_the_autoscalers_events_not_its_status_table(tmp_path, monkeypatch):
    """A one-node Ray's autoscaler monitor (v1, the local Ray's) logs its whole status table every 5 s,
    and Ray forwards that log whole; Ray's own printer keeps only the lines tagged `:event_summary:`."""
    import ray.autoscaler.v2.utils as autoscaler_utils

    from pipeline.core import console

    monkeypatch.setattr(autoscaler_utils, "cached_is_autoscaler_v2", False)
    sink = console._RayLog("pretrain", tmp_path / "ray.log")
    sink({"pid": "autoscaler", "lines": [
        "2026-12-06 07:36:17,576\tINFO autoscaler.py:147 -- The autoscaler took 0.0 seconds to fetch the list "
        "of non-terminated nodes.",
        "======== Autoscaler status: 2026-12-06 07:36:17.576899 ========",
        "Node status",
        " 0.0/2.0 CPU",
        "2026-12-06 07:36:18,002\tINFO autoscaler.py:470 -- :event_summary:Resized to 2 CPUs.",
    ]})
    sink({"pid": 4242, "actor_name": "RayTrainWorker", "lines": ["a warning from a worker", "[pretrain] epoch 1/6"]})
    text = (tmp_path / "ray.log").read_text()
    assert "(ray pid=autoscaler) Resized to 2 CPUs.\n" in text
    for status in ("Autoscaler status", "Node status", "0.0/2.0 CPU", "took 0.0 seconds"):
        assert status not in text
    assert "(RayTrainWorker pid=4242) a warning from a worker\n(RayTrainWorker pid=4242) [pretrain] epoch 1/6\n" in text
