"""The latency stage: ONNX Runtime and torch timed for real; the Apple backends' orchestration
against fake devices implementing the coremltools calls the code makes."""
import json

import pytest

from conftest import write_weights
from fakes import FakeBenchmarker, FakeDevice, FakeDevices
from pipeline import report
from pipeline.tracking import runs
from pipeline.config import Config
from pipeline.deploy import backends, latency
from pipeline.deploy.backends import AppleAPI, Skipped
from pipeline.errors import PipelineError
from iformer.reference import reference_for

STATS = {"median", "mean", "p90", "std", "min", "max", "runs"}


@pytest.mark.slow
def test_latency_measures_cpu_backends_and_skips_apple_ones_on_linux(exported):
    exported.stage("latency", env={"IFORMER_PIPELINE_RUN": "latency-test"})
    table = json.loads((exported.path / "metrics/latency.json").read_text())
    assert list(table) == ["iphone", "mac", "onnxruntime", "torch"]
    assert "this host runs Linux" in table["iphone"]["skipped"] and "this host runs Linux" in table["mac"]["skipped"]
    full = json.loads((exported.path / "artifacts/latency/latency.json").read_text())
    for backend in ("onnxruntime", "torch"):
        for model in ("classifier_32", "backbone_64"):
            s = table[backend][model]
            assert set(s) == STATS and s["runs"] == 4
            assert 0 < s["min"] <= s["median"] <= s["p90"] <= s["max"] and s["min"] <= s["mean"] <= s["max"]
            assert len(full[backend]["models"][model]["samples"]) == 4
            assert full[backend]["models"][model]["median"] == s["median"]
        ran = full[backend]["ran_on"]
        assert ran["threads"] == 1 and ran["device"].startswith("CPU") and ran["host"]["os"].startswith("Linux")
    assert "onnxruntime" in full["onnxruntime"]["ran_on"]["versions"]

    run = exported.runs(f"tags.`{runs.TAG_STAGE}` = 'latency'")[0]
    parent = exported.mlflow_client().get_run(run.data.tags[runs.TAG_PARENT])
    for name in ("latency_ms.onnxruntime.classifier_32", "latency_ms.torch.backbone_64"):
        assert parent.data.metrics[name] == round(run.data.metrics[name], 2) > 0  # the parent: ms to 0.01
    assert "this host runs Linux" in run.data.tags["latency.skipped.iphone"]
    manifest = json.loads((exported.path / "artifacts/latency/manifest.json").read_text())
    assert set(manifest["skipped"]) == {"iphone", "mac"}

    # The report's latency section: every backend, beside the paper's iPhone 13 figure.
    export = json.loads((exported.path / "artifacts/export/manifest.json").read_text())
    lines = "\n".join(report.latency_section(reference_for("iformer_t"), full, export))
    assert "| onnxruntime | CPU: " in lines and "| iphone | skipped: " in lines
    assert f"| {table['torch']['classifier_32']['median']:.2f} (" in lines
    # The paper times neither a 32 px classifier nor a 64 px backbone: nothing quoted, and its iPhone
    # figures are never a row of this table (they sit in a line under it when the sizes match).
    assert "| paper" not in lines and "Paper reference" not in lines
    assert "`backbone_64`: " in lines and "no compute plans (MLComputePlan needs macOS" in lines


# -- bad input: one error line, no latency.json ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("over, needle", [
    ({"backends": ["gpu"]}, "latency.backends.0 = 'gpu'"),
    ({"backends": []}, "latency.backends = []"),
    ({"runs": 0}, "latency.runs = 0"),
    ({"require": ["iphone"]}, "latency.require: iphone needs a macOS host"),
    ({"models": ["classifier_224"]}, "latency.models: classifier_224 not exported"),
])
def test_bad_latency_input(exported, over, needle):
    saved = exported.params()
    (exported.path / "metrics/latency.json").unlink(missing_ok=True)
    exported.set_params({"latency": over})
    try:
        exported.stage_error("latency", needle)
        assert not (exported.path / "metrics/latency.json").exists()
    finally:
        (exported.path / "params.yaml").write_text(__import__("yaml").safe_dump(saved, sort_keys=False))


@pytest.mark.slow
def test_weights_changed_since_export(exported):
    path = exported.path / "artifacts/pretrain/model.pt"
    saved = path.read_bytes()
    write_weights(exported)  # fresh random weights: not what was exported
    try:
        exported.stage_error("latency", "model.pt: not the weights")
    finally:
        path.write_bytes(saved)


def test_latency_before_export(tiny_repo):
    tiny_repo.stage_error("latency", "run the export stage first")
    assert not (tiny_repo.path / "metrics/latency.json").exists()


# -- Apple backends against fakes of coremltools' remote-device objects ------------------------------
def _iphones():
    from coremltools.models.ml_program.experimental.remote_device import DeviceType

    return (FakeDevice("Ana's iPhone", "00008110-AAA", DeviceType.IPHONE),
            FakeDevice("Test iPhone 13", "00008110-BBB", DeviceType.IPHONE),
            FakeDevice("Studio iPad", "00008110-CCC", DeviceType.IPAD))


TEAM = {backends.TEAM_ENV: "ABCDE12345"}


def test_device_selection_by_name_udid_or_the_only_one(tmp_path):
    ana, test13, ipad = _iphones()
    api = AppleAPI(devices=FakeDevices(ana, test13, ipad), benchmarker=FakeBenchmarker)
    assert backends.connect_iphone("Test iPhone 13", TEAM, tmp_path, api).udid == test13.udid
    got = backends.connect_iphone("00008110-AAA", TEAM, tmp_path, api)
    assert got.name == ana.name and got.session[0] == "app"
    assert got.session[1].development_team == "ABCDE12345"
    with pytest.raises(Skipped, match=r"2 iPhones are connected \(Ana's iPhone \(00008110-AAA\), Test iPhone 13"):
        backends.connect_iphone(None, TEAM, tmp_path, api)
    with pytest.raises(Skipped, match="latency.device 'Studio iPad' is not connected"):
        backends.connect_iphone("Studio iPad", TEAM, tmp_path, api)  # an iPad is not an iPhone
    only = AppleAPI(devices=FakeDevices(test13, ipad), benchmarker=FakeBenchmarker)
    assert backends.connect_iphone(None, TEAM, tmp_path, only).name == "Test iPhone 13"
    with pytest.raises(Skipped, match="no iPhone is connected"):
        backends.connect_iphone(None, TEAM, tmp_path, AppleAPI(devices=FakeDevices(ipad), benchmarker=FakeBenchmarker))


@pytest.mark.parametrize("env, needle", [
    ({}, "no signing team: set IFORMER_SIGNING_TEAM"),
    ({backends.TEAM_ENV: "my team"}, "IFORMER_SIGNING_TEAM='my team' is not an Apple developer team ID"),
    ({backends.PROFILE_ENV: "3f2a"}, "IFORMER_BUNDLE_ID is not"),
])
def test_missing_or_bad_signing_credentials(tmp_path, env, needle):
    api = AppleAPI(devices=FakeDevices(*_iphones()[:1]), benchmarker=FakeBenchmarker)
    with pytest.raises(Skipped, match=needle):
        backends.connect_iphone(None, env, tmp_path, api)


def test_a_failed_app_build_is_a_skip_with_the_reason(tmp_path):
    from coremltools.models.ml_program.experimental.remote_device import DeviceType

    phone = FakeDevice("Test iPhone 13", "X1", DeviceType.IPHONE, fail="xcodebuild: No signing certificate found")
    api = AppleAPI(devices=FakeDevices(phone), benchmarker=FakeBenchmarker)
    with pytest.raises(Skipped, match="on Test iPhone 13: ValueError: xcodebuild: No signing certificate found"):
        backends.connect_iphone(None, TEAM, tmp_path, api)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """An export directory holding one real (small) Core ML package, and its manifest entry."""
    import torch

    from pipeline.config import CoreMLExportConfig
    from pipeline.deploy import coreml

    d = tmp_path_factory.mktemp("tiny-export")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Flatten()).eval()
    program = torch.export.export(module, (torch.randn(1, 3, 32, 32),))
    package = d / "tiny_32.mlpackage"
    coreml.convert(program, 32, ["logits"], CoreMLExportConfig()).save(str(package))
    coreml.zip_package(package)
    return d, {"tiny_32": {"kind": "classifier", "size": 32, "coreml": "tiny_32.mlpackage.zip", "onnx": "-"}}


def _cfg(**latency):
    return Config.model_validate({"latency": {"models": ["tiny_32"], "runs": 5, "warmup": 2, **latency}})


def test_iphone_and_mac_timings_come_from_the_benchmarker(tiny_export):
    export_dir, models = tiny_export
    api = AppleAPI(devices=FakeDevices(*_iphones()[1:]), benchmarker=FakeBenchmarker)
    inputs = latency.Inputs(export_dir, models, weights={}, apple=api, env=TEAM)
    FakeBenchmarker.calls.clear()
    results = latency.measure(_cfg(backends=["iphone", "mac"], compute_units="cpu_and_ne"), inputs)
    phone = results["iphone"]
    assert phone["models"]["tiny_32"]["samples"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert phone["models"]["tiny_32"]["median"] == 3.0 and phone["models"]["tiny_32"]["p90"] == pytest.approx(4.6)
    assert phone["ran_on"]["device"] == "Test iPhone 13 (00008110-BBB)" and phone["ran_on"]["os"] == "iOS 18.5 (22F76)"
    assert phone["ran_on"]["compute_units"] == "cpu_and_ne" and "coremltools" in phone["ran_on"]["versions"]
    assert results["mac"]["ran_on"]["device"].startswith("Mac ")
    # warm-up first, then the timed runs; on the prepared iPhone, then locally (device None)
    assert [(d.session[0] if d else None, n, name) for d, n, name in FakeBenchmarker.calls] == [
        ("app", 2, "image"), ("app", 5, "image"), (None, 2, "image"), (None, 5, "image")]
    assert latency.headline(results) == {"latency_ms.iphone.tiny_32": 3.0, "latency_ms.mac.tiny_32": 3.0}


def test_a_required_backend_that_cannot_run_is_an_error(tiny_export):
    export_dir, models = tiny_export
    nobody = AppleAPI(devices=FakeDevices(), benchmarker=FakeBenchmarker)
    inputs = latency.Inputs(export_dir, models, weights={}, apple=nobody, env=TEAM)
    assert latency.measure(_cfg(backends=["iphone"]), inputs) == {
        "iphone": {"skipped": "no iPhone is connected and paired with this Mac (xcrun devicectl list devices)"}}
    with pytest.raises(PipelineError, match="latency.require: iphone could not run: no iPhone is connected"):
        latency.measure(_cfg(backends=["iphone"], require=["iphone"]), inputs)


def test_real_coremltools_objects_are_skipped_on_linux(tiny_export, tmp_path):
    export_dir, models = tiny_export
    with pytest.raises(Skipped, match="iphone needs a macOS host with Core ML; this host runs Linux"):
        backends.connect_iphone(None, TEAM, tmp_path, AppleAPI())
    results = latency.measure(_cfg(backends=["mac"]), latency.Inputs(export_dir, models, weights={}, env=TEAM))
    assert results == {"mac": {"skipped": "mac needs a macOS host with Core ML; this host runs Linux"}}


def test_summary_statistics():
    s = backends.summary([4.0, 1.0, 3.0, 2.0, 10.0])
    assert s == {"median": 3.0, "mean": 4.0, "p90": pytest.approx(7.6), "std": pytest.approx(3.1623, abs=1e-4),
                 "min": 1.0, "max": 10.0, "runs": 5}
