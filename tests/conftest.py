"""Shared fixtures: throw-away copies of the repo to run real stages, DVC and MLflow in."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.dense.scenes import DIGIT_CLASSES, SEG_CLASSES

ROOT = Path(__file__).resolve().parents[1]

# The 2-node loopback cluster and its MLflow server, shared by the tests on it (`cluster_fixture.cluster`);
# `leaks`: no Ray daemon outlives the test module that started it.
pytest_plugins = ["cluster_fixture", "leaks"]


#: Session fixtures that several test files share, each with those files: they run as one work
#: unit, named after the fixture, so that one worker builds it once (each pytest-xdist worker has
#: its own session). `cluster`: the 2-node loopback cluster (`cluster_fixture`); `exported`: the
#: tiny repo with the export stage run.
SHARED_UNITS = {
    "cluster": ("test_cluster", "test_faults", "test_submit", "test_submit_experiments", "test_sweep"),
    "exported": ("test_export", "test_latency"),
}
#: The slow tier's work units, with the worker-seconds each took (setup, call and teardown of its
#: tests; `--durations=0` on two workers, 2-core AMD EPYC, 2026-12-06). The units are handed out
#: longest first, so the cluster's and the default-params repro's start at once, one on each
#: worker, and the last to finish are short ones. A unit missing here goes last; a rough figure is
#: enough, only the order counts.
UNIT_SECONDS = {"cluster": 1321, "test_pipeline_e2e": 999, "test_runtime": 382, "test_browser": 282,
                "test_stale": 273, "test_field": 253, "test_dense_train": 238, "test_pretrain": 228,
                "exported": 158, "test_distill": 143, "test_reproducible": 132, "test_dense_resume": 132,
                "test_data_parallel": 125, "test_released_weights": 125, "test_dense_backbone": 95,
                "test_recipes": 11, "test_dvc_deps": 9}

#: The fast tier's heaviest files, with the worker-seconds their tests took (`--durations=0`, two
#: workers, 2-core AMD EPYC, 2026-12-07); the rest took under 6 s each. Handed out first, as the
#: slow tier's units are, so that what is left to the end is short.
FAST_SECONDS = {"test_stage_errors": 28, "test_dense_mmengine": 14, "test_dense_backbone": 23, "test_export": 18,
                "test_field": 16, "test_units_compute": 15, "test_dense_data": 14, "test_dense_config": 14,
                "test_compare": 11, "test_run_model": 10, "test_recipes": 9, "test_tracking": 7}


def unit(module: str) -> str:
    return next((name for name, modules in SHARED_UNITS.items() if module in modules), module)


def uses(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def uses_cluster(item) -> bool:
    return uses(item, "cluster")


def pytest_collection_modifyitems(items):
    """The longest units first (`UNIT_SECONDS`, `FAST_SECONDS`; a stable sort keeps each unit's tests
    together, in file order), and the cluster's tests one after another: it is started for the first
    and stopped after the last, so its daemons never idle beside the other tests."""
    def order(item) -> tuple:
        name = unit(item.path.stem)
        seconds = UNIT_SECONDS if item.get_closest_marker("slow") else FAST_SECONDS
        return -seconds.get(name, 0), name, not uses_cluster(item)

    strays = [f"{item.nodeid} ({fixture})" for item in items for fixture, modules in SHARED_UNITS.items()
              if uses(item, fixture) and item.path.stem not in modules]
    if strays:
        raise pytest.UsageError(f"tests on a shared fixture outside its SHARED_UNITS modules: {strays}")
    items.sort(key=order)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`: one work unit per test file (its module-scoped fixtures built once), and one
    for each of SHARED_UNITS (its session fixture built once). xdist's own `loadgroup` cannot do it:
    on pytest 9.2 it loses its groups (pytest-dev/pytest-xdist#1386)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Units(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return unit(Path(path).stem) if path.endswith(".py") else path

    return Units(config, log)


# The tests stop stages with Ctrl-C (SIGINT). A suite started in the background of a
# script inherits SIGINT ignored, and so would every process it starts: give them Python's
# own handling back (a handler here becomes the default disposition in the children).
signal.signal(signal.SIGINT, signal.default_int_handler)
VENV_BIN = Path(sys.executable).parent
# Two tests at once (pytest-xdist): torch's OpenMP threads wait for each other by spinning, and
# two 2-thread trainings on 2 cores then spin away each other's time slices. One Semantic FPN step
# took 0.23 s alone and 4.1 s beside another; with waiting threads that sleep, 0.46 s (2x).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Small but real: 32 px digits, iformer_t, two epochs.
TINY = {
    "data": {"image_size": 32},
    "train": {"epochs": 2, "log_every_batches": 50},
    "mlflow": {"log_model": False},
}


#: The dense stages' `data` entries for building their mmengine configs (digit classes; no files read).

def cpu_flags() -> set[str]:
    """This CPU's feature flags as the kernel lists them (/proc/cpuinfo), empty where it has none."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16_cpu() -> bool:
    """Whether the CPU computes bf16 in hardware: AVX512-BF16 or AMX-BF16 (the dense stages' `amp: auto`)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())

DET_DATA = {"root": "/data/coco", "classes": list(DIGIT_CLASSES)}
SEG_DATA = {"root": "/data/ade", "classes": list(SEG_CLASSES), "dataset": "BaseSegDataset",
            "palette": [[i, i, i] for i in range(len(SEG_CLASSES))]}


def wait_for(predicate, timeout: float, what: str):
    """`predicate()`'s first truthy value, polled every 0.5 s; an AssertionError after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def latest_checkpoint(storage: Path, stage: str = "pretrain", unit: str = "epoch") -> int:
    """The epoch or iteration (`unit`) of the newest checkpoint Ray Train has registered for
    `stage`'s runs in `storage` (0: none yet)."""
    import json

    newest = 0
    for snap in storage.glob(f"{stage}-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            continue  # being rewritten
        name = latest.get("checkpoint_dir_name", "")
        if name.startswith(f"{unit}-"):
            newest = max(newest, int(name.removeprefix(f"{unit}-")))
    return newest


def deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def env_for(repo: Path) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.pop("IFORMER_PIPELINE_RUN", None)
    env.pop("DVC_ROOT", None)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        IFORMER_ROOT=str(repo),
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
    )
    return env


class Repo:
    """A git + DVC copy of this project in a temp dir."""

    def __init__(self, path: Path):
        self.path = path
        self.env = env_for(path)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, over: dict) -> None:
        data = deep_update(self.params(), over)
        (self.path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def run(self, *cmd: str, check: bool = True, timeout: float = 900, env: dict | None = None):
        proc = subprocess.run(list(cmd), cwd=self.path, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return proc

    def stage(self, name: str, *args: str, check: bool = True, env: dict | None = None):
        return self.run(sys.executable, "-m", f"stages.{name}", *args, check=check, env=env)

    def stage_error(self, name: str, needle: str, env: dict | None = None):
        """Run a stage that must reject its input: exit 2, one `error:` line containing `needle`."""
        out = self.stage(name, check=False, env=env)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        return out

    def git(self, *args: str):
        return self.run("git", *args)

    def mlflow_client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(f"sqlite:///{self.path / 'mlflow' / 'mlflow.db'}")

    def runs(self, filter_string: str = ""):
        client = self.mlflow_client()
        exp = client.get_experiment_by_name(self.params()["mlflow"]["experiment"])
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)


def make_repo(dest: Path, params: dict | None = None) -> Repo:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("metrics/", "plots/", "dvc.lock")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    repo = Repo(dest)
    if params:
        repo.set_params(params)
    repo.git("init", "-q")
    # What `dvc config --local core.site_cache_dir ...` writes (git ignores it), without a dvc process.
    (dest / ".dvc" / "config.local").write_text(f"[core]\n    site_cache_dir = {dest / '.dvc' / 'tmp' / 'site'}\n")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "init")
    return repo


def exported_repo(dest: Path, over: dict, run: str) -> Repo:
    """A tiny repo (TINY + `over`): prepared digits, untrained weights, the export stage run."""
    import copy

    repo = make_repo(dest, deep_update(copy.deepcopy(TINY), copy.deepcopy(over)))
    repo.stage("prepare")
    write_weights(repo)
    repo.stage("export", env={"IFORMER_PIPELINE_RUN": run})
    return repo


def write_weights(repo: Repo, variant: str = "iformer_t", classes: list[str] | None = None) -> Path:
    """A real (untrained) `artifacts/pretrain/model.pt` for the prepared classes: stages after
    pretrain run on it without a training run."""
    import json

    from iformer.models import build_model
    from pipeline.core import checkpoint

    if classes is None:
        classes = json.loads((repo.path / "artifacts/prepare/manifest.json").read_text())["classes"]
    model = build_model(variant, len(classes))
    path = repo.path / "artifacts/pretrain/model.pt"
    checkpoint.save_weights(path, model.state_dict(), variant=variant, num_classes=len(classes),
                            distillation=False, classes=classes, image_size=repo.params()["data"]["image_size"],
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return path


#: The shared export: digits at 32 px, a 64 px classifier beside the 32 px one, and a 64 px backbone
#: whose 4x4 stage-3 map takes windows of 2 (its windowed attention path exported); latency times
#: two of them briefly.
SHARED_EXPORT = {"export": {"classifier_sizes": [64], "backbone_size": 64, "processes": 2},
                 "detection": {"backbone": {"window_size": 2, "window_chunks": 2}},
                 "latency": {"models": ["classifier_32", "backbone_64"], "runs": 4, "warmup": 1}}


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Repo:
    """One tiny repo with prepared digits, untrained iformer_t weights and the export stage run (under the
    pipeline run `export-test`), shared by the export and latency tests: they read it, and what one
    changes (params, weights) it puts back."""
    return exported_repo(tmp_path_factory.mktemp("export") / "repo", SHARED_EXPORT, "export-test")


@pytest.fixture
def orphan():
    """`orphan(env, title=None, ignore_term=False)`: a `sleep 60` re-parented to init (its shell exits at
    once), with `env` over ours, titled `title` as Ray titles its agents, ignoring SIGTERM if asked (as
    Ray's dashboard agent does); its PID. Every one is killed when the test ends."""
    pids: list[int] = []

    def start(env: dict[str, str], title: str | None = None, ignore_term: bool = False) -> int:
        trap = "trap '' TERM; " if ignore_term else ""  # an ignored signal stays ignored across exec
        sleep = f"exec -a '{title}' sleep 60" if title else "sleep 60"
        script = f"{trap}{sleep} </dev/null >/dev/null 2>&1 & echo $!"
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})  # no pipe held open: the shell's exit ends the run
        pids.append(int(out.stdout.strip()))
        return pids[-1]

    yield start
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def tiny_repo(tmp_path) -> Repo:
    import copy

    return make_repo(tmp_path / "repo", copy.deepcopy(TINY))


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory) -> Repo:
    """A tiny repo whose prepare stage has run (shared by a module's tests)."""
    import copy

    repo = make_repo(tmp_path_factory.mktemp("prepared") / "repo", copy.deepcopy(TINY))
    repo.stage("prepare")
    return repo


#: The pipeline's stage graph in miniature, for tests of what DVC records (`stub_project`).
STUB_STAGES = {
    "prepare": {"params": ["data"]},
    "pretrain": {"deps": ["artifacts/prepare"], "params": ["train", "optim"]},
    "evaluate": {"deps": ["artifacts/pretrain"], "params": ["evaluate"],
                 "metrics": [{"metrics/evaluate.json": {"cache": False, "persist": True}}]},
    "report": {"deps": ["artifacts/pretrain", "metrics/evaluate.json"], "params": ["recipe"]},
}
#: A stub stage on the real stage machinery (`stage.main`: config, MLflow runs, outputs) with a
#: made-up result: pretrain's "model" is its epoch count, evaluate's top-1 a tenth of it.
STUB_STAGE = """import json, sys
from pipeline import stage
from pipeline.core.outputs import Outputs

NAME = sys.argv.pop(1)  # the rest are the stage entry's own arguments


def run(cfg, root, _inputs, srun):
    out = Outputs.begin(NAME, root)
    if NAME == "pretrain":
        (out.dir / "model.txt").write_text(str(cfg.train.epochs))
        srun.log_headline({"train_s": 10.0 * cfg.train.epochs})
    if NAME == "evaluate":
        top1 = int((root / "artifacts/pretrain/model.txt").read_text()) / 10
        out.file(root / "metrics/evaluate.json").write_text(json.dumps({"top1": top1}))
        srun.log_headline({"top1": top1})
    (out.dir / "seen.json").write_text(json.dumps({"stale": srun.stale, "stale_upstream": srun.stale_upstream}))
    out.manifest(srun)
    out.commit()


stage.exit_with(NAME, lambda: stage.Work(lambda cfg, root: None, run))
"""


def stub_project(root: Path, params: dict) -> Path:
    """A git + DVC project at `root` with `STUB_STAGES` (outputs `artifacts/<stage>`) and `params`.

    Its stages run `STUB_STAGE` (`dvc repro` with `stub_env`), or a test runs
    their MLflow side itself and records the outputs it wrote with `dvc_record`.
    """
    root.mkdir(parents=True, exist_ok=True)
    stages = {name: {"cmd": f"python stub_stage.py {name}", **spec, "outs": [{f"artifacts/{name}": {"persist": True}}]}
              for name, spec in STUB_STAGES.items()}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "stub_stage.py").write_text(STUB_STAGE)
    (root / ".gitignore").write_text("/mlflow/\n/ray_results/\n*.tmp\n")
    for cmd in (["git", "init", "-q"], [str(VENV_BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "baseline"]):
        subprocess.run(cmd, cwd=root, env=stub_env(root), check=True, capture_output=True)
    return root


def stub_env(root: Path) -> dict:
    """The environment of a stub project's commands: this checkout's `pipeline` on the path, and no
    IFORMER_ROOT (a queued or `--temp` experiment runs its stages in a copy of the project)."""
    env = {**env_for(root), "PYTHONPATH": str(ROOT)}
    env.pop("IFORMER_ROOT")
    return env


def dvc_record(root: Path, *stages: str) -> None:
    """`dvc commit -f STAGES`: dvc.lock records the stages' current deps, params and outputs."""
    subprocess.run([str(VENV_BIN / "dvc"), "commit", "-f", "-q", *stages], cwd=root, env=stub_env(root), check=True,
                   capture_output=True)
