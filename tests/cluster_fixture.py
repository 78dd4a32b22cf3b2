"""A real 2-node Ray cluster and a real MLflow tracking server on loopback, for the cluster tests.

Each node is a `ray start --block` in its own session, with its own temp dir,
CPU budget and free ports, and `--node-ip-address 127.0.0.1`; the dashboard
(Ray's job server) listens on 127.0.0.1 and token authentication is on, with
the token in the test's temp dir. (With more than one node Ray runs in its
cluster mode, where its GCS and raylet gRPC servers listen on every interface
of the machine; only token holders get an answer from them.) Every process of
a node carries the node's marker in its environment (`IFORMER_TEST_NODE`), so
a node is stopped by the PIDs that carry it — never by `ray stop`, which would
stop every Ray on the machine.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import uses_cluster, wait_for  # noqa: F401 (the cluster tests import wait_for from here)
from leaks import open_paths

from pipeline.compute.local import API_SERVER_ENV
from pipeline.core.lifecycle import end, environ

VENV_BIN = Path(sys.executable).parent
MARKER = "IFORMER_TEST_NODE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(value: str) -> list[psutil.Process]:
    """This machine's processes of the node `value` names (or of every node below it, for the cluster's
    own dir): its marker in their environment, or its temp dir (`value` is that path) on their
    command line or in the paths of the files they hold open (a Ray agent's title can wipe its
    environment and command line, not its open logs)."""
    found = []
    for p in psutil.process_iter():
        try:
            mark = environ(p.pid).get(MARKER, "")  # not p.environ(): Ray's agents' titles wipe its start
            if p.pid != os.getpid() and (mark == value or mark.startswith(value + "/")
                                         or any(value in a for a in p.cmdline())
                                         or any(value in f for f in open_paths(p))):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def kill_marked(value: str, grace: float = 10.0) -> None:
    """Every process of the node, until none is left: a raylet that is being stopped may still start an
    agent (`ray::DashboardAgent` ignores SIGTERM), which would outlive the node, re-parented to init,
    and take CPU from every later test."""
    for _ in range(5):
        procs = marked(value)
        if not procs:
            return
        end(procs, grace)
        grace = 0


class Node:
    def __init__(self, name: str, proc: subprocess.Popen, marker: str, temp_dir: Path, log: Path):
        self.name, self.proc, self.marker, self.temp_dir, self.log = name, proc, marker, temp_dir, log
        self.stopped = False

    def pids(self) -> set[int]:
        return {p.pid for p in marked(self.marker)}

    def stop(self, grace: float = 10.0) -> None:
        """Every process of this node, by PID: SIGTERM, then SIGKILL after `grace` s (0: a crash)."""
        self.stopped = True
        kill_marked(self.marker, grace)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class LoopbackCluster:
    """A head and `workers` more nodes on 127.0.0.1, `cpus` CPUs each, token auth on."""

    def __init__(self, base: Path, cpus: int = 1):
        self.base = base
        self.cpus = cpus
        # Unix socket paths are limited to ~107 bytes: the session dirs go under /tmp.
        self.short = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.token_path = base / "ray_token"
        self.token_path.touch(mode=0o600)
        self.token_path.write_text(secrets.token_hex(32))
        self.nodes: list[Node] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict:
        """What a client of this cluster needs: the address and the token, nothing else of ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_USAGE_STATS_ENABLED="0",
                   RAY_ADDRESS=self.address)
        env.pop(MARKER, None)
        return env

    def _start(self, name: str, head: bool) -> Node:
        temp_dir = self.short / name
        temp_dir.mkdir()
        marker = f"{self.short}/{name}"
        log = self.base / f"ray-{name}.log"
        args = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(self.cpus), "--temp-dir", str(temp_dir), "--disable-usage-stats",
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
        if head:
            args += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(free_port())]
        else:
            args += ["--address", self.address]
        # The state API at this cluster's dashboard, said outright: Ray's processes otherwise scan the
        # machine for one gcs_server, and a stage's private Ray beside this cluster fails that scan; a
        # placement-group cleaner whose controller died then polls in vain for the rest of the session.
        # Its temp files in its own dir too (the dashboard's forkserver otherwise leaves a /tmp/pymp-*).
        env = {**self.env, MARKER: marker, API_SERVER_ENV: self.dashboard_url, "TMPDIR": str(temp_dir)}
        env.pop("RAY_ADDRESS")
        with open(log, "w") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, marker, temp_dir, log)
        self.nodes.append(node)
        return node

    def start(self, nodes: int = 2) -> "LoopbackCluster":
        self._start("head", head=True)
        wait_for(lambda: self._alive_nodes() >= 1, 120, f"the head node ({self.nodes[0].log})")
        for i in range(1, nodes):
            self._start(f"node{i}", head=False)
        wait_for(lambda: self._alive_nodes() >= nodes, 120, f"{nodes} nodes ({self.base})")
        return self

    def _alive_nodes(self) -> int:
        for node in self.nodes:
            if not node.stopped and node.proc.poll() is not None:
                raise AssertionError(f"ray start for {node.name} exited: {node.log.read_text()[-3000:]}")
        out = subprocess.run([sys.executable, "-c", "import ray, json; ray.init(); "
                              "print(sum(n['Alive'] for n in ray.nodes()))"],
                             env=self.env, capture_output=True, text=True, timeout=120)
        lines = out.stdout.strip().splitlines()
        return int(lines[-1]) if out.returncode == 0 and lines and lines[-1].isdigit() else 0

    def stop(self) -> None:
        """The session's end: nothing on the cluster is kept, so no node gets the 10 s of a graceful stop
        (its dashboard agent ignores SIGTERM and used to hold each node's stop for the whole grace)."""
        for node in reversed(self.nodes):
            if not node.stopped or node.proc.poll() is None:
                node.stop(grace=1.0)
        time.sleep(2)  # an agent a dying raylet started late: found by the cluster's dir, ended too
        kill_marked(str(self.short), grace=0)
        shutil.rmtree(self.short, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with one web worker and without MLflow's job runner (eight more
    processes, about 1.8 GiB and 17 s of CPU at start, for GenAI jobs no stage or test submits; see
    README). Its log and, unless `store` names a repo's sqlite store, its own store and served
    artifacts live under `base`; `env` and `cwd` are its process's."""

    def __init__(self, base: Path, store: Path | None = None, env: dict | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = base / "mlflow-server.log"
        args = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{store or base / 'mlflow-server.db'}"]
        if store is None:
            args += ["--serve-artifacts", "--artifacts-destination", str(base / "mlflow-artifacts")]
        env = {**(env or os.environ), "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(self._healthy, 120, f"the MLflow server ({self.log})")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


def ray_query(cluster: LoopbackCluster, code: str, timeout: float = 120):
    """Run `code` (which prints one JSON line last) in a Ray driver of `cluster`; its value."""
    import json

    out = subprocess.run([sys.executable, "-c", "import json, ray\nray.init()\n" + code], env=cluster.env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


#: Per Ray Train worker that ever ran on the cluster: [pid, node_id, state].
TRAIN_WORKERS = """
from ray.util.state import list_actors
actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, raise_on_missing_output=False)
print(json.dumps([[a.pid, a.node_id, a.state] for a in actors]))
"""
ALIVE_NODES = "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))"


#: The running shared cluster, if any (`cluster`): one per pytest process at a time.
SHARED: dict[str, LoopbackCluster] = {}


def start_shared(base: Path) -> LoopbackCluster:
    ray_cluster = LoopbackCluster(base, cpus=1)
    try:
        ray_cluster.start(nodes=2)
        ray_cluster.mlflow = MlflowServer(base)
    except BaseException:
        ray_cluster.stop()
        raise
    ray_cluster.storage = base / "shared-storage"  # what every node reaches (NFS/S3 on a real cluster)
    return ray_cluster


def stop_shared() -> None:
    ray_cluster = SHARED.pop("cluster", None)
    if ray_cluster is not None:
        ray_cluster.mlflow.stop()
        ray_cluster.stop()


@pytest.fixture
def cluster(tmp_path_factory):
    """A 2-node loopback cluster (one CPU per node) with an MLflow server and a shared storage dir.

    Shared by the tests that use it, which run one after another (conftest groups them): started
    for the first, stopped after the last (the next test of this process needs none), so its
    daemons never idle beside the other tests. Each test works in its own repo, storage dir and
    run names.
    """
    if "cluster" not in SHARED:
        SHARED["cluster"] = start_shared(tmp_path_factory.mktemp("cluster"))
    return SHARED["cluster"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    if "cluster" in SHARED and (nextitem is None or not uses_cluster(nextitem)):
        stop_shared()
    return result


def pytest_sessionfinish():
    stop_shared()


def cluster_repo(path: Path, cluster: LoopbackCluster, over: dict | None = None):
    """A tiny repo whose pretrain runs 2 workers on `cluster`, tracked by its MLflow server."""
    import copy

    from conftest import TINY, deep_update, make_repo

    params = deep_update(copy.deepcopy(TINY), {
        "ray": {"address": cluster.address, "num_workers": 2, "cpus_per_worker": 1.0,
                "storage_path": str(cluster.storage)},
        "mlflow": {"tracking_uri": cluster.mlflow.uri},
    })
    repo = make_repo(path, deep_update(params, over or {}))
    repo.env.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_AUTH")})
    return repo
