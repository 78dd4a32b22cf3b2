"""The export stage as a user runs it: Core ML and ONNX files, checked, with an op census."""
import copy
import json
import shutil
import zipfile

import pytest

from conftest import TINY, exported_repo, make_repo, write_weights
from fakes import FakeBlock as _Block, FakeCost as _Cost, FakeOperation as _Op, FakePlan, FakeUsage as _Usage
from pipeline.deploy import census, compute_plan

def _unzip(repo, name, tmp_path):
    with zipfile.ZipFile(repo.path / "artifacts/export" / f"{name}.mlpackage.zip") as z:
        z.extractall(tmp_path)
    return tmp_path / f"{name}.mlpackage"


@pytest.mark.slow
def test_export_writes_checked_coreml_and_onnx(exported, tmp_path):
    out = exported.path / "artifacts/export"
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["models"]) == {"classifier_32", "classifier_64", "backbone_64"}
    for name, m in manifest["models"].items():
        assert (out / m["onnx"]).stat().st_size > 1e6 and (out / m["coreml"]).stat().st_size > 1e6
        assert m["onnx_export"] == {"exporter": "dynamo", "opset": 18}
        assert 0 < max(m["onnx_max_abs_diff"].values()) <= 1e-4
        assert "this host runs Linux" in m["coreml_predict_check"]["skipped"]
        assert "this host runs Linux" in m["compute_plan"]["skipped"]
        inp = m["coreml_interface"]["inputs"]
        assert inp == [{"name": "image", "type": "tensor", "dtype": "float32", "shape": [1, 3, m["size"], m["size"]]}]
    cls = manifest["models"]["classifier_32"]["coreml_interface"]["outputs"]
    assert cls == [{"name": "logits", "type": "tensor", "dtype": "float32", "shape": [1, 10]}]
    feats = manifest["models"]["backbone_64"]["coreml_interface"]["outputs"]
    assert [(f["name"], f["shape"]) for f in feats] == [
        ("stage0", [1, 32, 16, 16]), ("stage1", [1, 64, 8, 8]), ("stage2", [1, 128, 4, 4]), ("stage3", [1, 256, 2, 2])]
    assert all(f["dtype"] == "float32" for f in feats)
    assert len(manifest["models"]["backbone_64"]["onnx_max_abs_diff"]) == 4
    assert (manifest["models"]["backbone_64"]["window_size"], manifest["models"]["backbone_64"]["window_chunks"]) == (2, 2)

    # The census is what the saved package holds: recount it from the spec.
    package = _unzip(exported, "classifier_64", tmp_path)
    assert census.census_of(package) == manifest["models"]["classifier_64"]["census"]
    metrics = json.loads((exported.path / "metrics/export.json").read_text())
    c = metrics["classifier_64"]
    assert c["ops_total"] > c["ops_without_const"] > c["conv"] > 50 and c["softmax"] == 5 and c["transpose"] == 0
    assert 4 < c["weight_mb"] < 7  # 2.9 M parameters in FP16
    assert not (exported.path / "artifacts/export.tmp").exists()
    # Two conversion processes (SHARED_EXPORT): what the libraries said, whole and in the models' order.
    said = (out / "convert.log").read_text()
    heads = [line for line in said.splitlines() if line.startswith("== ")]
    assert heads == ["== classifier_32 ==", "== classifier_64 ==", "== backbone_64 =="]
    sections = said.split("== ")[1:]
    assert all("Converting PyTorch Frontend" in part for part in sections) and not list(out.glob("convert.*.log"))


@pytest.mark.slow
def test_export_is_logged_under_the_pipeline_run(exported):
    from pipeline.tracking import runs as tracking

    run = exported.runs(f"tags.`{tracking.TAG_STAGE}` = 'export'")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["census.classifier_64.ops_without_const"] > 100
    assert run.data.metrics["onnx_max_abs_diff.backbone_64"] <= 1e-4
    files = {a.path for a in exported.mlflow_client().list_artifacts(run.info.run_id, "export")}
    assert {"export/classifier_64.onnx", "export/classifier_64.mlpackage.zip", "export/census.json"} <= files
    parent = exported.mlflow_client().get_run(run.data.tags[tracking.TAG_PARENT])
    for count in ("ops_without_const", "ops_total"):  # the headline census, and the total beside it
        assert parent.data.metrics[f"census.backbone_64.{count}"] == run.data.metrics[f"census.backbone_64.{count}"]


@pytest.mark.slow
def test_image_input_class_labels_fp32_and_opset_17(tmp_path):
    repo = exported_repo(tmp_path / "repo", {"export": {
        "classifier_sizes": [], "backbone_size": None,
        "coreml": {"input": "image", "class_labels": True, "precision": "fp32"}, "onnx": {"opset": 17}}}, "image-io")
    m = json.loads((repo.path / "artifacts/export/manifest.json").read_text())["models"]
    assert list(m) == ["classifier_32"]
    io = m["classifier_32"]["coreml_interface"]
    assert io["inputs"] == [{"name": "image", "type": "image", "color": "RGB", "shape": [1, 3, 32, 32]}]
    assert io["outputs"] == [{"name": "classLabel", "type": "string"}, {"name": "classLabel_probs", "type": "dict"}]
    assert m["classifier_32"]["census"]["weight_bytes"] > 10e6  # FP32 weights: twice the FP16 size
    assert m["classifier_32"]["onnx_export"]["exporter"] == "torchscript"
    assert m["classifier_32"]["onnx_export"]["opset"] == 17
    assert "opset 18, not 17" in m["classifier_32"]["onnx_export"]["dynamo_not_used"]

    import coremltools as ct

    package = _unzip(repo, "classifier_32", tmp_path)
    spec = ct.utils.load_spec(str(package))
    assert spec.description.predictedFeatureName == "classLabel"
    (block,) = spec.mlProgram.functions["main"].block_specializations.values()
    (classify,) = [op for op in block.operations if op.type == "classify"]
    values = classify.inputs["classes"].arguments[0].value.immediateValue.list.values
    prepared = json.loads((repo.path / "artifacts/prepare/manifest.json").read_text())
    assert [v.immediateValue.tensor.strings.values[0] for v in values] == prepared["classes"]


@pytest.mark.slow
def test_single_head_attention_needs_fewer_reshapes_than_multi_head(tmp_path):
    """The paper's SHMA argument, counted: iformer_m vs EfficientFormerV2-S2 (12.7 M, 8 heads), same export."""
    import timm

    from iformer.export import deploy_form, explicit_attention

    ours = _census(deploy_form(timm.create_model("iformer_m")), 224, tmp_path / "iformer_m")
    theirs = _census(explicit_attention(timm.create_model("efficientformerv2_s2").eval()), 224, tmp_path / "effv2")
    assert ours["by_type"]["softmax"] == 6 and theirs["by_type"]["softmax"] == 9
    assert ours["reshape_transpose"] < theirs["reshape_transpose"]
    # Per attention block, too: the difference is not only that iformer_m has fewer of them.
    assert ours["reshape_transpose"] / 6 < theirs["reshape_transpose"] / 9
    # The official iFormer-M export at 224 holds 209 ops without const (875 in all with its initial weights).
    assert abs(ours["ops_without_const"] - 209) <= 1


def _census(model, size: int, path) -> dict:
    """The census of `model` converted as the export stage converts it (FP16 compute, float32 tensors)."""
    import torch

    from pipeline.config import CoreMLExportConfig
    from pipeline.deploy import coreml

    program = torch.export.export(model, (torch.randn(1, 3, size, size),))
    coreml.convert(program, size, ["logits"], CoreMLExportConfig()).save(str(path.with_suffix(".mlpackage")))
    return census.census_of(path.with_suffix(".mlpackage"))


def _computing(c: dict) -> dict:
    return {k: v for k, v in c["by_type"].items() if k != "const"}


@pytest.mark.slow
def test_census_of_a_network_counted_by_hand(tmp_path):
    """Three 3x3 convs, a ReLU before the last: counted by hand from the MIL ops Core ML writes."""
    import torch
    from torch import nn

    class ThreeConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(self.stem(x))))

    model = ThreeConvs().eval()
    distinct = _census(model, 8, tmp_path / "distinct")
    # Computing: the float32 input cast to FP16, three convs, the ReLU, the cast back. Constants: each conv's
    # weight, bias, pad_type, pad, strides, dilations and groups (7), each cast's dtype (1).
    assert _computing(distinct) == {"cast": 2, "conv": 3, "relu": 1} and distinct["ops_without_const"] == 6
    assert distinct["ops_total"] == 6 + 3 * 7 + 2
    model.b.load_state_dict(model.a.state_dict())  # b's weights now equal a's: Core ML keeps one copy
    shared = _census(model, 8, tmp_path / "shared")
    assert _computing(shared) == _computing(distinct) and shared["ops_without_const"] == 6
    assert distinct["ops_total"] - 2 <= shared["ops_total"] < distinct["ops_total"]  # the weight (and bias) merged


@pytest.mark.slow
def test_census_headline_is_the_same_for_any_weight_values(tmp_path):
    """iformer_t with timm's initial weights (many equal: ones and zeros) and with random ones."""
    import timm
    import torch

    from iformer.export import deploy_form

    initial = timm.create_model("iformer_t").eval()
    randomized = copy.deepcopy(initial)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*randomized.named_parameters(), *randomized.named_buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.02)
    a = _census(deploy_form(initial), 64, tmp_path / "initial")
    b = _census(deploy_form(randomized), 64, tmp_path / "random")
    assert _computing(a) == _computing(b) and a["ops_without_const"] == b["ops_without_const"]
    assert a["ops_total"] < b["ops_total"]  # Core ML merged the equal initial constants


def test_report_census_heads_with_the_ops_without_const():
    """The report's census table per run: a parent run of before this count was headline shows only its total."""
    from types import SimpleNamespace as NS

    from pipeline.report import compare, history

    def parent(name, metrics):
        return NS(info=NS(run_id=name, run_name=name, status="FINISHED", start_time=0),
                  data=NS(metrics=metrics, tags={"iformer.variant": "iformer_t"}))

    rows = [history.row(parent("old", {"census.classifier_224.ops": 774.0})),
            history.row(parent("new", {"census.classifier_224.ops_without_const": 172.0,
                                    "census.classifier_224.ops_total": 729.0}))]
    lines = compare.census_table(rows)
    assert "| old | iformer_t | – (774) |" in lines and "| new | iformer_t | 172 (729) |" in lines


# -- bad input: one error line, no export directory --------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("bad-export") / "repo", copy.deepcopy(TINY))
    repo.stage("prepare")
    return repo


def _rejects(repo, needle):
    repo.stage_error("export", needle)
    assert not (repo.path / "artifacts/export").exists() and not (repo.path / "artifacts/export.tmp").exists()
    assert not (repo.path / "metrics/export.json").exists()


def test_export_before_pretrain(prepared):
    _rejects(prepared, "run the pretrain stage first")


@pytest.mark.parametrize("variant, classes, needle", [
    ("iformer_s", None, "holds iformer_s, but model.variant is iformer_t"),
    ("iformer_t", [str(i) for i in range(12)], "holds 12 classes"),
])
def test_mismatched_checkpoint(prepared, variant, classes, needle):
    write_weights(prepared, variant, classes)
    try:
        _rejects(prepared, needle)
    finally:
        shutil.rmtree(prepared.path / "artifacts/pretrain")


def test_export_size_not_a_multiple_of_32(tiny_repo):
    tiny_repo.set_params({"export": {"classifier_sizes": [224, 100]}})
    _rejects(tiny_repo, "export.classifier_sizes = [224, 100]: must be a multiple of 32")


# -- the compute plan summary, against a fake plan with coremltools' attributes -----------------
def test_compute_plan_summary_from_a_fake_plan():
    from coremltools.models import compute_device as cd

    ane, gpu, cpu = (cls.__new__(cls) for cls in (cd.MLNeuralEngineComputeDevice, cd.MLGPUComputeDevice,
                                                   cd.MLCPUComputeDevice))
    inner = _Block(_Op("softmax", "attn"))
    block = _Block(_Op("const", "w"), _Op("conv", "c1"), _Op("cond", "branch", [inner]), _Op("gelu", "g1"),
                   _Op("reshape", "r1"))
    usage = {"c1": _Usage(ane, [ane, gpu, cpu]), "branch": _Usage(ane, [ane, cpu]), "attn": _Usage(gpu, [gpu, cpu]),
             "g1": _Usage(cpu, [cpu]), "r1": _Usage(ane, [ane, cpu])}
    cost = {"c1": _Cost(0.5), "branch": _Cost(0.0), "attn": _Cost(0.2), "g1": _Cost(0.3)}  # r1: no estimate
    s = compute_plan.summarize(FakePlan(block, usage, cost))
    assert s["ops"] == 5  # the const has no device usage and is not counted
    assert s["op_share"] == {"neural_engine": 0.6, "gpu": 0.2, "cpu": 0.2}
    assert s["cost_share"] == pytest.approx({"neural_engine": 0.5, "gpu": 0.2, "cpu": 0.3})
    assert s["off_neural_engine_ops"] == 2
    assert s["off_neural_engine_by_type"] == {"gelu": 1, "softmax": 1}
    assert s["off_neural_engine"][0] == {"type": "gelu", "output": "g1", "device": "cpu", "supported": ["cpu"],
                                         "cost": 0.3}
    assert s["off_neural_engine"][1]["supported"] == ["cpu", "gpu"]


def test_compute_plan_is_skipped_with_the_reason_off_macos(tmp_path):
    assert compute_plan.plan_for(tmp_path / "any.mlpackage") == {
        "skipped": "MLComputePlan needs macOS (Core ML framework); this host runs Linux"}


def test_onnx_check_scales_the_tolerance_with_the_output(tmp_path):
    import onnx as onnx_lib
    from onnx import TensorProto, helper

    import torch

    from pipeline.deploy import onnx as onnx_check
    from pipeline.errors import PipelineError

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "identity.onnx"
    onnx_lib.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    x = torch.tensor([[100.0, -50.0, 1.0, 0.0]])
    # 5e-3 off an output reaching 100 is 5e-5 of its scale: FP32 noise on deep features.
    assert onnx_check.max_abs_diff(path, x, [x + 5e-3], 1e-4) == {"y": pytest.approx(5e-3, rel=1e-3)}
    with pytest.raises(PipelineError, match="identity.onnx: ONNX Runtime differs from torch by 0.0005 of the output"):
        onnx_check.max_abs_diff(path, x, [x + 5e-2], 1e-4)
    small = torch.tensor([[0.5, 0.1, 0.0, 0.0]])  # below 1 the tolerance stays absolute
    with pytest.raises(PipelineError):
        onnx_check.max_abs_diff(path, small, [small + 2e-4], 1e-4)


# -- conversion processes ---------------------------------------------------------------------------
def test_the_models_convert_one_process_per_usable_cpu_at_most_one_per_model(monkeypatch):
    from pipeline.config import parse_config
    from pipeline.deploy import export

    cfg = parse_config(copy.deepcopy(TINY))
    monkeypatch.setattr(export, "usable_cpus", lambda: 2)
    assert cfg.export.processes == "auto"
    assert [export.processes(cfg, models) for models in (1, 2, 3)] == [1, 2, 2]
    cfg.export.processes = 8
    assert [export.processes(cfg, models) for models in (1, 3)] == [1, 3]


def test_a_model_failing_in_its_conversion_process_is_one_error_line(tmp_path):
    """Each conversion process reads the pretrain weights itself and hands its failure back as data: the
    stage's one error line names the model and the library's exception (weights with no tensors: the
    network refuses them as it loads them, before any exporter runs, so there is no library output to
    keep; `keep_log` is tested in test_robust); no conversion process is left running."""
    import multiprocessing

    from pipeline.config import parse_config
    from pipeline.core import checkpoint, spawned
    from pipeline.deploy import export
    from pipeline.errors import PipelineError

    cfg = parse_config(copy.deepcopy(TINY))
    weights = tmp_path / "artifacts/pretrain/model.pt"  # the pretrain stage's file, no manifest to check it against
    weights.parent.mkdir(parents=True)
    checkpoint.save_weights(weights, {}, variant="iformer_t", num_classes=2, distillation=False, classes=["0", "1"],
                            image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    targets = [export.Target("classifier", 32), export.Target("backbone", 64)]
    inputs = export.Inputs(weights={}, weights_path=weights, classes=["0", "1"], targets=targets)
    cfg.export.processes = 2
    with pytest.raises(PipelineError) as err:
        export.export_all(cfg, tmp_path, inputs, tmp_path, tmp_path / "export.failed.log")
    assert str(err.value).startswith("classifier_32: export failed: RuntimeError: Error(s) in loading state_dict")
    assert str(err.value).endswith("(no library output)") and "\n" not in str(err.value)
    assert multiprocessing.active_children() == []
    # A process that dies before it answers fails the models not converted by then, by name.
    pending = {"backbone_64": _settled(spawned.DIED), "classifier_32": _settled(spawned.DIED)}
    assert str(export._died(pending)) == ("export failed: a conversion process died (killed, or crashed inside a library) "
                              "before backbone_64, classifier_32 were converted")


def _settled(result):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    future = Future()
    if result == "died":
        future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
    else:
        future.set_result(result)
    return future
