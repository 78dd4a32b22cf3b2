"""Stand-ins for the coremltools objects that need a Mac (Core ML) or a connected iPhone.

Each implements only what `pipeline.deploy` reads or calls, with coremltools 9.0's
own parameter names and defaults; `test_fake_contracts.py` holds them to the real
classes (`inspect.signature`, dataclass fields), so a fake cannot drift from the API it
stands in for.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path


# -- remote_device / perf_utils: the Apple latency backends (tests/test_latency.py) ---------------
@dataclass(frozen=True)
class FakeDevice:
    """What the code reads and calls on `remote_device.Device` (`fail`: the fake's own knob)."""

    name: str
    udid: str
    type: object
    os_version: str = "18.5"
    os_build_number: str = "22F76"
    session: object = None
    fail: str = ""

    async def prepare_for_model_debugging(self, credentials=None, working_directory=None, clean=False):
        if self.fail:
            raise ValueError(self.fail)
        assert Path(working_directory).is_dir()
        return replace(self, session=("app", credentials))


class FakeDevices:
    """`remote_device.Device.get_connected_devices(device_type)`."""

    def __init__(self, *devices):
        self.devices = devices

    def get_connected_devices(self, device_type):
        return [d for d in self.devices if d.type == device_type]


class FakeBenchmarker:
    """`perf_utils.MLModelBenchmarker(model=, device=)`: `benchmark_predict` returns coremltools' Measurement."""

    calls = []

    def __init__(self, model, device=None):
        self.model, self.device = model, device

    async def benchmark_predict(self, inputs=None, iterations=1, warmup=False):
        from coremltools.models.ml_program.experimental.perf_utils import MLModelBenchmarker

        FakeBenchmarker.calls.append((self.device, iterations, self.model.get_spec().description.input[0].name))
        await asyncio.sleep(0)
        return MLModelBenchmarker.Measurement.from_samples([1.0 + i for i in range(iterations)])


# -- compute_plan: `MLComputePlan` and the model structure it walks (tests/test_export.py) -------
class FakeValue:
    """`MLModelStructureProgramNamedValueType`: an operation's output."""

    def __init__(self, name):
        self.name = name


class FakeOperation:
    """`MLModelStructureProgramOperation`."""

    def __init__(self, operator_name, output, blocks=()):
        self.operator_name, self.outputs, self.blocks = operator_name, [FakeValue(output)], list(blocks)


class FakeBlock:
    """`MLModelStructureProgramBlock`."""

    def __init__(self, *operations):
        self.operations = list(operations)


class FakeUsage:
    """`MLComputePlanDeviceUsage`."""

    def __init__(self, preferred, supported):
        self.preferred_compute_device, self.supported_compute_devices = preferred, supported


class FakeCost:
    """`MLComputePlanCost`."""

    def __init__(self, weight):
        self.weight = weight


class FakePlan:
    """Implements what `compute_plan.summarize` reads from coremltools' `MLComputePlan`."""

    def __init__(self, block, usage, cost):
        function = type("F", (), {"block": block})()
        program = type("P", (), {"functions": {"main": function}})()
        self.model_structure = type("S", (), {"program": program})()
        self._usage, self._cost = usage, cost

    def get_compute_device_usage_for_mlprogram_operation(self, operation):
        return self._usage.get(operation.outputs[0].name)

    def get_estimated_cost_for_mlprogram_operation(self, operation):
        return self._cost.get(operation.outputs[0].name)
