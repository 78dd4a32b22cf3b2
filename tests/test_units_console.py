"""Console lines said once: the export stage's Core ML predict skip is one line per export, not one per
model (the per-model conversion is stubbed; `coreml.predict_unavailable` is the real check of this host)."""
from __future__ import annotations

import logging
import sys

import pytest

from pipeline.deploy import coreml, export


@pytest.mark.skipif(sys.platform == "darwin", reason="a Mac may run Core ML predict")
def test_the_core_ml_predict_skip_is_said_once_per_export(tmp_path, monkeypatch, caplog):
    targets = [export.Target("classifier", 224), export.Target("classifier", 32), export.Target("backbone", 512)]
    inputs = export.Inputs(weights={}, weights_path=tmp_path / "model.pt", classes=[], targets=targets)
    monkeypatch.setattr(export, "export_one", lambda t, *a: {"coreml_predict_check": {"skipped": "stub"}})
    with caplog.at_level(logging.INFO, logger=export.__name__):
        models = export.export_all(None, inputs, tmp_path, tmp_path / "failed.log")
    assert list(models) == ["classifier_224", "classifier_32", "backbone_512"]
    said = [r.getMessage() for r in caplog.records if "predict check skipped" in r.getMessage()]
    assert said == [f"Core ML predict check skipped for the 3 models: {coreml.predict_unavailable()}"]
    assert "macOS" in said[0]
