"""Latency backends: time one model, and say what ran it or why it could not.

`BACKENDS` is the one registry, by the name `latency.backends` uses: the latency
stage, the sweep's latency objective and the benchmarks all time through it. A
backend gets a `Subject` (the model in the forms a backend may want: the torch
module, an ONNX file, a Core ML package, made on first use) and a `Context`.
Adding one: a `Backend` entry here and its name in `pipeline.config.deploy`'s
`LATENCY_BACKENDS` (the schema sits below this layer; a test keeps the two in step).

- `torch`: the deploy-form network (fused, eval) on the CPU, or CUDA when present.
- `onnxruntime`: the `.onnx` file, CPU execution provider.
- `executorch`: the `.pte` file (XNNPACK delegate) with ExecuTorch's runtime on
  the CPU, as an Android or iOS app runs it (`pipeline.deploy.executorch`).
- `mac`: Core ML predict of the `.mlpackage` on the macOS host.
- `iphone`: Core ML predict on a connected iPhone through the macOS host, with
  coremltools' experimental remote-device API: `remote_device.Device` lists the
  connected devices, `prepare_for_model_debugging` builds, signs and launches
  the model-runner app, and `perf_utils.MLModelBenchmarker` times predictions
  on it. Signing comes from the environment only: `IFORMER_SIGNING_TEAM`
  (Apple developer team ID), or `IFORMER_PROVISIONING_PROFILE` with
  `IFORMER_BUNDLE_ID`.

A backend that cannot run here raises `Skipped` with the reason. The Apple
backends reach coremltools through `AppleAPI`, whose two fields default to
coremltools' own classes; tests pass fakes with the same calls.
"""
from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np

from ..core.cpus import usable_cpus
from ..errors import PipelineError

COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU", "cpu_only": "CPU_ONLY"}
TEAM_ENV, PROFILE_ENV, BUNDLE_ENV = "IFORMER_SIGNING_TEAM", "IFORMER_PROVISIONING_PROFILE", "IFORMER_BUNDLE_ID"


class Skipped(Exception):
    """The backend cannot run on this host; the message says why."""


def summary(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"median": float(np.median(a)), "mean": float(a.mean()), "p90": float(np.percentile(a, 90)),
            "std": float(a.std()), "min": float(a.min()), "max": float(a.max()), "runs": int(a.size)}


def time_calls(fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall time of `runs` calls of `fn` in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict:
    return {"os": platform.platform(), "cpu": cpu_name(), "logical_cpus": os.cpu_count(),
            "python": platform.python_version()}


def check_threads(threads: int, field: str) -> None:
    """`field` (a thread count) must not exceed this machine's CPUs (more only makes the threads wait on each other)."""
    cpus = usable_cpus()
    if threads > cpus:
        raise PipelineError(f"{field}: {threads} is more than the {cpus} CPUs this machine gives the stage")


def host_label(ran_on: dict) -> str:
    """What timed a latency figure, in a table cell: `Intel Xeon ..., 2 threads` or `iPhone 13, Core ML ALL`."""
    device = str(ran_on.get("device", "unknown device")).removeprefix("CPU: ")
    if "compute_units" in ran_on:
        return f"{device}, Core ML {ran_on['compute_units']}"
    threads = ran_on.get("threads")
    return device if threads is None else f"{device}, {threads} thread{'s' if threads != 1 else ''}"


# -- torch and ONNX Runtime ------------------------------------------------------
def run_torch(module, size: int, runs: int, warmup: int, threads: int) -> tuple[list[float], dict]:
    import timm
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(threads)
    module = module.to(device).eval()
    x = torch.randn(1, 3, size, size, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        samples = time_calls(lambda: module(x), runs, warmup, sync)
    ran = {"device": torch.cuda.get_device_name() if cuda else f"CPU: {cpu_name()}", "threads": threads,
           "precision": "fp32", "model": "fused eval network (deploy form), eager",
           "versions": {"torch": torch.__version__, "timm": timm.__version__}}
    return samples, ran


def run_onnxruntime(path: Path, size: int, runs: int, warmup: int, threads: int) -> tuple[list[float], dict]:
    import onnxruntime as ort

    from .onnx import session

    sess = session(path, threads)
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, size, size), np.float32)}
    samples = time_calls(lambda: sess.run(None, feed), runs, warmup)
    ran = {"device": f"CPU: {cpu_name()}", "threads": threads, "precision": "fp32",
           "provider": sess.get_providers()[0], "versions": {"onnxruntime": ort.__version__}}
    return samples, ran


def run_executorch(path: Path, size: int, runs: int, warmup: int, threads: int) -> tuple[list[float], dict]:
    from . import executorch

    reason = executorch.available()
    if reason:
        raise Skipped(reason)
    return executorch.run(path, size, runs, warmup, threads, time_calls, cpu_name())


# -- Core ML on the Mac and on an iPhone ---------------------------------------------
@dataclass
class AppleAPI:
    """The coremltools objects the Apple backends call (None: coremltools' own)."""

    #: like `remote_device.Device`: `get_connected_devices(DeviceType.IPHONE)` -> devices with
    #: name, udid, os_version, os_build_number and async `prepare_for_model_debugging(credentials=, working_directory=)`.
    devices: Any = None
    #: like `perf_utils.MLModelBenchmarker(model=, device=)` with async `benchmark_predict(iterations=)`
    #: returning a Measurement whose `samples` are milliseconds.
    benchmarker: Any = None

    @property
    def real(self) -> bool:
        """coremltools' own objects, which need a Mac with Core ML (fakes do not)."""
        return self.devices is None and self.benchmarker is None

    def device_api(self):
        if self.devices is None:
            from coremltools.models.ml_program.experimental.remote_device import Device

            return Device
        return self.devices

    def benchmarker_cls(self):
        if self.benchmarker is None:
            from coremltools.models.ml_program.experimental.perf_utils import MLModelBenchmarker

            return MLModelBenchmarker
        return self.benchmarker


def mac_host_problem(backend: str) -> Optional[str]:
    if sys.platform != "darwin":
        return f"{backend} needs a macOS host with Core ML; this host runs {platform.system()}"
    from .coreml import predict_unavailable

    reason = predict_unavailable()
    if reason:
        return reason
    if backend == "iphone" and not shutil.which("xcrun"):
        return "iphone needs Xcode (xcrun devicectl, xcodebuild) on this Mac; none found"
    return None


def signing_credentials(env: dict):
    """`AppSigningCredentials` from the environment (never from params.yaml)."""
    from coremltools.models.ml_program.experimental.remote_device import AppSigningCredentials

    team, profile, bundle = env.get(TEAM_ENV), env.get(PROFILE_ENV), env.get(BUNDLE_ENV)
    if not team and not profile:
        raise Skipped(f"no signing team: set {TEAM_ENV} to your Apple developer team ID "
                      f"(or {PROFILE_ENV} and {BUNDLE_ENV})")
    if team and not re.fullmatch(r"[A-Z0-9]{10}", team):
        raise Skipped(f"{TEAM_ENV}={team!r} is not an Apple developer team ID (10 letters and digits)")
    if profile and not bundle:
        raise Skipped(f"{PROFILE_ENV} is set but {BUNDLE_ENV} is not: the bundle ID must match the profile")
    return AppSigningCredentials(development_team=team or None, provisioning_profile_uuid=profile or None,
                                 bundle_identifier=bundle or None)


def select_device(devices: list, wanted: Optional[str]):
    if not devices:
        raise Skipped("no iPhone is connected and paired with this Mac (xcrun devicectl list devices)")
    if wanted is None:
        if len(devices) > 1:
            names = ", ".join(f"{d.name} ({d.udid})" for d in devices)
            raise Skipped(f"{len(devices)} iPhones are connected ({names}); set latency.device to one name or UDID")
        return devices[0]
    found = [d for d in devices if wanted in (d.name, d.udid)]
    if not found:
        names = ", ".join(f"{d.name} ({d.udid})" for d in devices)
        raise Skipped(f"latency.device {wanted!r} is not connected; connected: {names}")
    return found[0]


def connect_iphone(wanted: Optional[str], env: dict, workdir: Path, api: AppleAPI):
    """The chosen iPhone with the model-runner app built, signed and launched on it."""
    if api.real:
        reason = mac_host_problem("iphone")
        if reason:
            raise Skipped(reason)
    from coremltools.models.ml_program.experimental.remote_device import DeviceType

    credentials = signing_credentials(env)
    try:
        devices = list(api.device_api().get_connected_devices(DeviceType.IPHONE))
    except Exception as err:
        raise Skipped(f"listing connected devices failed: {type(err).__name__}: {err}") from None
    device = select_device(devices, wanted)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(device.prepare_for_model_debugging(credentials=credentials, working_directory=workdir))
    except Exception as err:  # xcodebuild signing errors, a locked phone, developer mode off, ...
        raise Skipped(f"could not build and launch the model-runner app on {device.name}: "
                      f"{type(err).__name__}: {err}") from None


def run_coreml(package: Path, runs: int, warmup: int, compute_units: str, api: AppleAPI,
               device=None) -> tuple[list[float], dict]:
    """Core ML predict timings of `package` on the Mac (`device` None) or on a prepared device."""
    if api.real and device is None:
        reason = mac_host_problem("mac")
        if reason:
            raise Skipped(reason)
    import coremltools as ct

    units = ct.ComputeUnit[COMPUTE_UNITS[compute_units]]
    model = ct.models.MLModel(str(package), compute_units=units, skip_model_load=True)
    bench = api.benchmarker_cls()(model=model, device=device)

    async def measure():
        if warmup:
            await bench.benchmark_predict(iterations=warmup)
        return await bench.benchmark_predict(iterations=runs)

    try:
        samples = [float(s) for s in asyncio.run(measure()).samples]
    except Exception as err:
        where = device.name if device is not None else "this Mac"
        raise Skipped(f"Core ML predict on {where} failed: {type(err).__name__}: {err}") from None
    if len(samples) != runs or not all(np.isfinite(samples)):
        raise Skipped(f"the benchmarker returned {len(samples)} timings for {runs} runs")
    ran = {"compute_units": compute_units, "versions": {"coremltools": ct.__version__}}
    if device is None:
        ran.update(device=f"Mac {platform.machine()}", os=f"macOS {platform.mac_ver()[0]}")
    else:
        ran.update(device=f"{device.name} ({device.udid})", os=f"iOS {device.os_version} ({device.os_build_number})",
                   host=f"macOS {platform.mac_ver()[0]}")
    return samples, ran


# -- the registry ------------------------------------------------------------------------
class Subject(Protocol):
    """One model to time, batch 1 at `size` x `size`, in whichever form a backend asks for."""

    size: int

    def torch_module(self): ...  # the deploy-form network, eval

    def onnx_file(self) -> Path: ...

    def executorch_file(self) -> Path: ...  # a `.pte` (XNNPACK delegate); raises Skipped if there is none

    def coreml_package(self, into: Path) -> Path: ...  # an unpacked `.mlpackage`


@dataclass
class Context:
    """What a backend may use besides the model: scratch space, the Apple API, the environment."""

    workdir: Path
    apple: AppleAPI = field(default_factory=AppleAPI)
    env: dict = field(default_factory=lambda: dict(os.environ))
    device: Any = None  # what `Backend.open` prepared (the iPhone running the model-runner app)


@dataclass(frozen=True)
class Backend:
    """How one backend times a `Subject` with the `latency` section's runs, warm-up, threads and units."""

    time: Callable[[Subject, Any, Context], tuple[list[float], dict]]
    macos: bool = False  # needs a macOS host with Core ML
    open: Callable[[Any, Context], Any] = lambda lat, ctx: None  # once before its models; kept in ctx.device
    short: str = ""  # its column header in `python -m pipeline.exps` (default: its name)


BACKENDS: dict[str, Backend] = {
    "torch": Backend(lambda s, lat, ctx: run_torch(s.torch_module(), s.size, lat.runs, lat.warmup, lat.threads)),
    "onnxruntime": Backend(lambda s, lat, ctx: run_onnxruntime(s.onnx_file(), s.size, lat.runs, lat.warmup,
                                                               lat.threads), short="ort"),
    "executorch": Backend(lambda s, lat, ctx: run_executorch(s.executorch_file(), s.size, lat.runs, lat.warmup,
                                                             lat.threads), short="et"),
    "mac": Backend(lambda s, lat, ctx: run_coreml(s.coreml_package(ctx.workdir / "mac"), lat.runs, lat.warmup,
                                                  lat.compute_units, ctx.apple), macos=True),
    "iphone": Backend(lambda s, lat, ctx: run_coreml(s.coreml_package(ctx.workdir / "iphone"), lat.runs, lat.warmup,
                                                     lat.compute_units, ctx.apple, ctx.device), macos=True,
                      open=lambda lat, ctx: connect_iphone(lat.device, ctx.env, ctx.workdir / "iphone", ctx.apple)),
}


def measure(name: str, subjects: dict[str, Subject], lat, ctx: Context) -> tuple[dict[str, dict], dict]:
    """({model: summary + samples}, what ran them) for each of `subjects` on backend `name`; raises Skipped."""
    backend = BACKENDS[name]
    if backend.macos and ctx.apple.real:  # before any model is converted for it
        reason = mac_host_problem(name)
        if reason:
            raise Skipped(reason)
    ctx.device = backend.open(lat, ctx)
    results, ran = {}, {}
    for model, subject in subjects.items():
        samples, ran = backend.time(subject, lat, ctx)
        results[model] = {**summary(samples), "samples": samples}
    return results, ran
