"""The Core ML fakes (`tests/fakes.py`) held to coremltools' real API.

The Apple latency backends and the compute-plan summary can only run for real on a
Mac, so their tests use fakes. Here the coremltools 9.0 signatures the code calls are
written out by hand (from coremltools' source), the installed coremltools is checked
against them (an upgrade that changes a call fails here, not on a user's Mac), and
each fake's methods are checked against the real ones: same parameter names, kinds
and defaults, same sync/async, and attributes that are real fields.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from fakes import FakeBenchmarker, FakeBlock, FakeCost, FakeDevice, FakeDevices, FakeOperation, FakePlan, FakeUsage, FakeValue


def shape(fn) -> str:
    """A signature as a call sees it: names, kinds and defaults, annotations dropped."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def real(name: str):
    import importlib

    module, _, attr = name.rpartition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


REMOTE = "coremltools.models.ml_program.experimental.remote_device"
PERF = "coremltools.models.ml_program.experimental.perf_utils"
PLAN = "coremltools.models.compute_plan"

#: What pipeline/deploy calls, as coremltools 9.0 defines it: (object, its signature, async).
CALLED = [
    (f"{REMOTE}:Device.get_connected_devices", "(device_type)", False),
    (f"{REMOTE}:Device.prepare_for_model_debugging", "(self, credentials=None, working_directory=None, clean=False)",
     True),
    (f"{REMOTE}:AppSigningCredentials",
     "(development_team='', provisioning_profile_uuid=None, bundle_identifier=None)", False),
    (f"{PERF}:MLModelBenchmarker.__init__", "(self, model, device=None)", False),
    (f"{PERF}:MLModelBenchmarker.benchmark_predict", "(self, inputs=None, iterations=1, warmup=False)", True),
    (f"{PERF}:MLModelBenchmarker.Measurement.from_samples", "(samples)", False),
    (f"{PLAN}:MLComputePlan.get_compute_device_usage_for_mlprogram_operation", "(self, operation)", False),
    (f"{PLAN}:MLComputePlan.get_estimated_cost_for_mlprogram_operation", "(self, operation)", False),
    (f"{PLAN}:MLComputePlan.load_from_path", "(path, compute_units=<ComputeUnit.ALL: 1>)", False),
]


@pytest.mark.parametrize("name, expected, is_async", CALLED, ids=[c[0].rpartition(":")[2] for c in CALLED])
def test_coremltools_signatures_are_the_ones_the_code_was_written_for(name, expected, is_async):
    import coremltools

    fn = real(name)
    assert shape(fn) == expected, f"coremltools {coremltools.__version__} changed {name}; update pipeline/deploy and tests/fakes.py"
    assert inspect.iscoroutinefunction(fn) == is_async


#: (fake method, the real one it stands in for)
FAKED = [
    (FakeDevice.prepare_for_model_debugging, f"{REMOTE}:Device.prepare_for_model_debugging"),
    (FakeDevices().get_connected_devices, f"{REMOTE}:Device.get_connected_devices"),  # bound: no self, as the static
    (FakeBenchmarker.__init__, f"{PERF}:MLModelBenchmarker.__init__"),
    (FakeBenchmarker.benchmark_predict, f"{PERF}:MLModelBenchmarker.benchmark_predict"),
    (FakePlan.get_compute_device_usage_for_mlprogram_operation,
     f"{PLAN}:MLComputePlan.get_compute_device_usage_for_mlprogram_operation"),
    (FakePlan.get_estimated_cost_for_mlprogram_operation, f"{PLAN}:MLComputePlan.get_estimated_cost_for_mlprogram_operation"),
]


@pytest.mark.parametrize("fake, name", FAKED, ids=[f[1].rpartition(".")[2] for f in FAKED])
def test_each_fake_method_has_the_real_signature(fake, name):
    assert shape(fake) == shape(real(name))
    assert inspect.iscoroutinefunction(fake) == inspect.iscoroutinefunction(real(name))


def test_the_device_fields_the_code_reads_are_real_device_fields():
    device = real(f"{REMOTE}:Device")
    fields = {f.name for f in dataclasses.fields(device)}
    # backends.select_device / run_coreml read name, udid, os_version, os_build_number;
    # FakeDevices filters on type; prepare_for_model_debugging returns a copy with a session.
    assert {"name", "udid", "type", "os_version", "os_build_number", "session"} <= fields
    assert {f.name for f in dataclasses.fields(FakeDevice)} - {"fail"} <= fields
    assert isinstance(inspect.getattr_static(device, "get_connected_devices"), staticmethod)
    assert real(f"{REMOTE}:DeviceType").IPHONE.value == "iphone"


def test_the_benchmark_measurement_holds_samples():
    measurement = real(f"{PERF}:MLModelBenchmarker.Measurement")
    assert "samples" in {f.name for f in dataclasses.fields(measurement)}  # run_coreml reads `.samples`
    assert list(measurement.from_samples([2.0, 1.0, 3.0]).samples) == [2.0, 1.0, 3.0]


@pytest.mark.parametrize("fake, args, cls", [
    (FakeValue, ("x",), "MLModelStructureProgramNamedValueType"),
    (FakeOperation, ("conv", "x"), "MLModelStructureProgramOperation"),
    (FakeBlock, (), "MLModelStructureProgramBlock"),
    (FakeUsage, (None, []), "MLComputePlanDeviceUsage"),
    (FakeCost, (0.5,), "MLComputePlanCost"),
])
def test_the_plan_structure_fakes_carry_real_fields(fake, args, cls):
    assert set(vars(fake(*args))) <= {f.name for f in dataclasses.fields(real(f"{PLAN}:{cls}"))}


def test_the_plan_fake_walks_the_real_structure_path():
    """summarize reads plan.model_structure.program.functions["main"].block.operations."""
    assert isinstance(inspect.getattr_static(real(f"{PLAN}:MLComputePlan"), "model_structure"), property)
    for cls, field in (("MLModelStructure", "program"), ("MLModelStructureProgram", "functions"),
                       ("MLModelStructureProgramFunction", "block"), ("MLModelStructureProgramBlock", "operations")):
        assert field in {f.name for f in dataclasses.fields(real(f"{PLAN}:{cls}"))}, (cls, field)
    plan = FakePlan(FakeBlock(FakeOperation("relu", "y")), {}, {})
    assert [op.operator_name for op in plan.model_structure.program.functions["main"].block.operations] == ["relu"]
    assert {"model_structure"} == {k for k in vars(plan) if not k.startswith("_")}


def test_the_device_kinds_are_coremltools_compute_devices():
    from coremltools.models import compute_device as cd

    for cls in (cd.MLNeuralEngineComputeDevice, cd.MLGPUComputeDevice, cd.MLCPUComputeDevice):
        assert issubclass(cls, cd.MLComputeDevice)


def test_mlmodel_takes_the_keywords_the_code_passes():
    import coremltools as ct

    from pipeline.deploy.backends import COMPUTE_UNITS

    params = inspect.signature(ct.models.MLModel.__init__).parameters
    assert {"compute_units", "skip_model_load"} <= set(params)  # backends.run_coreml, compute_plan.plan_for
    assert set(COMPUTE_UNITS.values()) <= set(ct.ComputeUnit.__members__)
