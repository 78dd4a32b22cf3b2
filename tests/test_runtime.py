"""The local runtime: Ray locked to loopback with a token, and stage processes that die cleanly.

Real Ray, real DVC, real MLflow; processes are killed by PID as a user (or the
OOM killer) would.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager

import psutil
import pytest

from conftest import latest_checkpoint, make_repo, wait_for
from pipeline.tracking import runs as tracking

pytestmark = pytest.mark.slow

FAST = {"train": {"epochs": 2, "log_every_batches": 5}, "data": {"image_size": 32},
        "mlflow": {"log_model": False}}

PROBE = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    import psutil
    from pipeline.compute import cluster, local, renice
    from pipeline.config import Config

    with cluster.session(Config(), Path.cwd(), "probe", Path(sys.argv[1]) / "ray.log"):
        import ray
        gcs = ray.get_runtime_context().gcs_address
        me = psutil.Process()
        listeners, unix = [], []
        for p in [me, *me.children(recursive=True)]:
            try:
                listeners += [[p.pid, p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN]
                unix += [c.laddr for c in p.net_connections("unix") if c.laddr]
            except psutil.Error:
                pass
        time.sleep(2)  # before anything asks for a worker: Ray would have prestarted one per CPU by now
        idle = []
        for p in me.children(recursive=True):
            try:
                if renice.is_unassigned_worker(p.cmdline(), p.name()):
                    idle.append(" ".join(p.cmdline()))
            except psutil.Error:
                continue
        worker_tmp = ray.get(ray.remote(lambda: __import__("tempfile").gettempdir()).remote())
        token = os.environ["RAY_AUTH_TOKEN_PATH"]
        from ray._private import worker
        ray_monitor = [info.process.pid for info in worker._global_node.all_processes["monitor"]]
        found_monitor = [p.pid for p in local.autoscaler_monitors()]
        # Someone on this machine with the address but not the token.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        intruder = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print('CONNECTED')"],
                                  env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                                  capture_output=True, text=True, timeout=300)
        print(json.dumps({"gcs": gcs, "listeners": listeners, "token": token,
                          "token_mode": os.stat(token).st_mode & 0o777,
                          "intruder": intruder.stdout + intruder.stderr[-2000:],
                          "ray_monitor": ray_monitor, "found_monitor": found_monitor, "unix": unix,
                          "worker_tmp": worker_tmp, "driver_tmp": __import__("tempfile").gettempdir(),
                          "idle": idle}))
    gone = [not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in ray_monitor]
    print(json.dumps({"token_left": os.path.exists(token), "monitor_gone": gone}))
""")


def test_local_ray_listens_on_loopback_only_and_refuses_callers_without_the_token(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    info, after = lines
    assert info["gcs"].startswith("127.0.0.1:")
    kinds = {name for _, name, _, _ in info["listeners"]}
    assert {"gcs_server", "raylet"} <= kinds, info["listeners"]
    # From the OS's socket table: nothing of this Ray accepts connections from another address.
    exposed = [entry for entry in info["listeners"] if entry[2] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], exposed
    assert info["token_mode"] == 0o600 and info["token"].startswith("/tmp/ray-")
    assert info["idle"] == [], f"no worker starts before something asks for one: {info['idle']}"
    assert "CONNECTED" not in info["intruder"]
    assert "authentication" in info["intruder"].lower() or "token" in info["intruder"].lower(), info["intruder"]
    assert not after["token_left"], "the run's temp dir (with its token) is removed after shutdown"
    # Every socket file and temp file of this Ray's processes lives in that dir, so none outlives it
    # (the dashboard's multiprocessing forkserver listens in a /tmp/pymp-* dir of its own); the
    # driver's temp dir stays the machine's.
    run_dir = os.path.dirname(info["token"])
    assert info["worker_tmp"] == run_dir and info["driver_tmp"] == tempfile.gettempdir() != run_dir
    assert any("/pymp-" in path for path in info["unix"]), info["unix"]
    assert [path for path in info["unix"] if not path.startswith(run_dir + "/")] == [], info["unix"]
    # The session kills the autoscaler monitor itself before ray.shutdown() (which waits a second for it):
    # what it finds is the monitor Ray's own node registered, and it is gone afterwards.
    assert len(info["ray_monitor"]) == 1 and info["found_monitor"] == info["ray_monitor"], info
    assert after["monitor_gone"] == [True]


def test_training_with_two_workers_listens_on_loopback_only(tmp_path):
    # Two ranks meet at torch's rendezvous store, which Ray's torch backend would bind to `::`.
    repo = make_repo(tmp_path / "repo", {**FAST, "ray": {"num_workers": 2, "cpus_per_worker": 1.0}})
    with training(repo) as stage:
        wait_for(lambda: any("epoch-0001" in p.read_text() for p in
                              (repo.path / "ray_results").glob("pretrain-*/checkpoint_manager_snapshot.json")),
                  600, "the first epoch's checkpoint")
        listeners = []
        for p in [psutil.Process(stage.pid), *_descendants(stage.pid)]:
            try:
                listeners += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        _, err = stage.communicate(timeout=600)
    assert stage.returncode == 0, err[-3000:]
    assert "rank 0/2" in err, err[-3000:]
    assert any(name.startswith("ray::RayTrainWo") for name, _, _ in listeners), listeners
    exposed = [entry for entry in listeners if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], exposed
    with open(repo.path / "artifacts/pretrain/history.csv") as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert len(history) == FAST["train"]["epochs"]
    # Each epoch's time split as P6 reads it: rank 0's validation lies inside its epoch (the
    # steps are the ranks' mean); the first epoch follows no checkpoint, the second the first's.
    for row in history:
        assert 0 < row["train_seconds"] and 0 < row["val_seconds"] < row["epoch_seconds"], row
        # The digits' 1,437 training images in whole global batches of 64: 22 steps, 1,408 images
        # over both ranks, at img_per_sec in the ranks' time (their mean, not their sum).
        assert row["img_per_sec"] * row["train_seconds"] == pytest.approx(22 * 64), row
    assert history[0]["checkpoint_seconds"] == 0.0 and history[1]["checkpoint_seconds"] > 0, history


TWIN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from pipeline.compute import cluster
    from pipeline.config import Config

    here, other = Path(sys.argv[1]), Path(sys.argv[2])
    with cluster.session(Config(), Path.cwd(), "twin", here / "ray.log"):
        import ray
        from ray.util.state import list_actors

        @ray.remote(num_cpus=0)
        class Marker:
            def ping(self):
                return 1

        @ray.remote(num_cpus=0)
        def find_markers():  # what Train V2's placement-group cleaner does from inside Ray
            from ray.dashboard.utils import get_address_for_submission_client
            return get_address_for_submission_client(None), len(list_actors(filters=[("class_name", "=", "Marker")]))

        marker = Marker.remote()
        ray.get(marker.ping.remote())
        (here / "up").touch()
        deadline = time.time() + 300
        while not (other / "up").exists() and time.time() < deadline:  # both Rays alive at once
            time.sleep(0.2)
        api, markers = ray.get(find_markers.remote())
        print(json.dumps({"api": api, "markers": markers}))
        (here / "done").touch()
        while not (other / "done").exists() and time.time() < deadline:
            time.sleep(0.2)
""")


def test_two_local_rays_on_one_machine_each_find_their_own_state_api(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", TWIN, str(x), str(y)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for x, y in ((a, b), (b, a))]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "multiple active Ray instances" not in err
    found = [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out, _ in outs]
    assert [f["markers"] for f in found] == [1, 1], found  # each sees its own actor, not the other's
    assert found[0]["api"] != found[1]["api"] and all(f["api"].startswith("http://127.0.0.1:") for f in found)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(p: psutil.Process) -> bool:
    try:  # a zombie has exited; only its parent's bookkeeping is left
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _all_gone(procs: list[psutil.Process], timeout: float = 30) -> list[str]:
    deadline = time.time() + timeout
    alive = procs
    while time.time() < deadline:
        alive = [p for p in procs if _alive(p)]
        if not alive:
            return []
        time.sleep(0.5)
    return [f"{p.pid} {p.name()}" for p in alive if _alive(p)]


def _trainer_started(proc) -> bool:
    """True once a Ray Train worker runs below `proc` (a Popen or a psutil.Process)."""
    assert _alive(psutil.Process(proc.pid)), "the stage ended early"
    return any(_cmdline(p).startswith("ray::RayTrainWorker") for p in _descendants(proc.pid))


def _cmdline(p: psutil.Process) -> str:
    """The command line, or "" for a process that ended since it was listed."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _start(repo, *cmd, env=None):
    return subprocess.Popen(list(cmd), cwd=repo.path, env=env or repo.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def training(repo):
    """`prepare`, then the pretrain stage in its own process group, yielded once its trainer runs."""
    repo.stage("prepare")
    stage = _start(repo, sys.executable, "-m", "stages.pretrain")
    try:
        wait_for(lambda: _trainer_started(stage), 300, "the trainer")
        yield stage
    finally:
        _kill_group(stage.pid)  # whatever a failed assertion left running


@pytest.fixture
def fast_repo(tmp_path):
    import copy

    return make_repo(tmp_path / "repo", copy.deepcopy(FAST))


def test_second_trainer_is_refused_and_sigterm_marks_runs_killed(fast_repo):
    repo = fast_repo
    with training(repo) as first:
        before = len(repo.runs())
        second = repo.stage_error("pretrain", f"pid {first.pid}")
        assert "is in use by" in second.stderr
        assert len(repo.runs()) == before, "the refused trainer opened no MLflow run"

        family = _descendants(first.pid)
        titles = {_cmdline(p).split(" ")[0] for p in family}
        # Ray's own fixed policy starts Ray Data's coordinator before any worker (`compute.scaling`).
        assert "ray::TrainController.run" in titles and "ray::_AutoscalingCoordinatorActor" not in titles, titles
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: pretrain: interrupted (SIGTERM); nothing was recorded as finished, and a rerun picks up "
        "from the last checkpoint"], err[-3000:]
    assert "Traceback" not in err
    assert _all_gone(family) == [], "the local Ray goes with the stage"
    stage_runs = repo.runs(f"tags.`{tracking.TAG_STAGE}` = 'pretrain'")
    assert [r.info.status for r in stage_runs] == ["KILLED"]
    parent = repo.mlflow_client().get_run(stage_runs[0].data.tags[tracking.TAG_PARENT])
    assert parent.info.status == "KILLED"
    assert not (repo.path / "artifacts/pretrain/manifest.json").exists()


def test_killing_dvc_takes_the_stage_and_its_ray_along(tmp_path):
    # Enough epochs that the kill lands mid-training on a fast machine too. What a rerun
    # does after a kill (resume in the same MLflow run) is the next test's.
    repo = make_repo(tmp_path / "repo", {**FAST, "train": {**FAST["train"], "epochs": 6}})
    # Without SHELL, DVC runs the stage through `/bin/sh -c`; dash keeps itself between `dvc`
    # and the stage (bash would exec), and that shell outlives a killed `dvc` (as on CI).
    dvc = _start(repo, "dvc", "repro", env={k: v for k, v in repo.env.items() if k != "SHELL"})
    try:
        wait_for(lambda: latest_checkpoint(repo.path / "ray_results") >= 1, 600, "the first epoch's checkpoint")
        stage = next(p for p in psutil.Process(dvc.pid).children() if "stages.pretrain" in _cmdline(p))
        family = [stage, *stage.children(recursive=True)]
        if os.path.realpath("/bin/sh").endswith("dash"):
            assert stage.name() in ("sh", "dash"), "the case this test is for: a shell between dvc and the stage"
        assert not (repo.path / "artifacts/pretrain/manifest.json").exists(), "killed while training"
        os.kill(dvc.pid, signal.SIGKILL)  # as the OOM killer or a closed terminal would
        dvc.wait(timeout=30)
        assert _all_gone(family, timeout=60) == [], "no orphaned trainer or Ray daemon"
    finally:
        _kill_group(dvc.pid)
    [killed] = repo.runs(f"tags.`{tracking.TAG_STAGE}` = 'pretrain'")
    assert killed.info.status == "KILLED"


def test_ctrl_c_stops_the_pipeline_and_marks_its_runs_killed(fast_repo):
    repo = fast_repo
    dvc = _start(repo, "dvc", "repro")
    try:
        stage = wait_for(lambda: next((p for p in psutil.Process(dvc.pid).children()
                                        if "stages.pretrain" in _cmdline(p)), None), 300, "pretrain")
        wait_for(lambda: _trainer_started(stage), 300, "the trainer")
        family = [stage, *stage.children(recursive=True)]
        os.killpg(dvc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = dvc.communicate(timeout=120)
    finally:
        _kill_group(dvc.pid)
    assert dvc.returncode != 0
    assert "error: pretrain: interrupted (SIGINT)" in out + err, (out + err)[-3000:]
    assert _all_gone(family) == []
    runs = {r.data.tags.get(tracking.TAG_STAGE): r.info.status for r in repo.runs()}
    assert runs == {"prepare": "FINISHED", "pretrain": "KILLED", None: "KILLED"}, runs


def test_sigkilled_stage_takes_its_ray_along_and_the_rerun_resumes_in_the_same_run(fast_repo):
    repo = fast_repo
    epochs = FAST["train"]["epochs"]
    with training(repo) as stage:
        wait_for(lambda: latest_checkpoint(repo.path / "ray_results") >= 1, 600, "the first epoch's checkpoint")
        family = _descendants(stage.pid)
        os.kill(stage.pid, signal.SIGKILL)  # no handler runs: nothing can mark its runs
        stage.wait(timeout=30)
        assert _all_gone(family, timeout=60) == [], "Ray's processes share the stage's fate"
    assert not (repo.path / "artifacts/pretrain/manifest.json").exists(), "killed while training"
    [orphan] = repo.runs(f"tags.`{tracking.TAG_STAGE}` = 'pretrain'")
    assert orphan.info.status == "RUNNING"

    # The next run closes what the dead process left open, resumes from the newest complete
    # checkpoint (Ray lists one only once it is written), and continues the same MLflow run.
    again = repo.stage("pretrain")
    resumed_at = re.search(r"starting at epoch (\d+) from ray checkpoint", again.stderr)
    assert resumed_at and 1 <= int(resumed_at[1]) < epochs, again.stderr[-3000:]
    resumed = repo.mlflow_client().get_run(orphan.info.run_id)
    assert "process was gone" in resumed.data.tags["iformer.closed_because"]
    assert resumed.info.status == "FINISHED" and resumed.data.tags[tracking.TAG_ATTEMPTS] == "2"
    assert [r.info.run_id for r in repo.runs(f"tags.`{tracking.TAG_STAGE}` = 'pretrain'")] == [orphan.info.run_id]
    old_parent = orphan.data.tags[tracking.TAG_PARENT]
    assert repo.mlflow_client().get_run(old_parent).info.status == "KILLED"
    assert resumed.data.tags["iformer.previous_parent_run_id"] == old_parent != resumed.data.tags[tracking.TAG_PARENT]
    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["epochs"] == epochs and manifest["mlflow_run_id"] == orphan.info.run_id
    assert (repo.path / "ray_results" / manifest["ray_run_name"]).is_dir(), "the Ray run it resumed"
    for key in ("train_loss", "val_top1", "lr"):  # the whole history, each epoch once
        steps = [m.step for m in repo.mlflow_client().get_metric_history(orphan.info.run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)


def test_a_dead_training_worker_ends_in_one_error_line(fast_repo):
    repo = fast_repo
    # Killed while it trains (after epoch 1's checkpoint, with epochs left). A worker that dies while
    # Ray is still starting the group is Ray's to start again (Train V2 retries a failed group start
    # without limit: FailureConfig.controller_failure_limit -1), and the run then trains to the end:
    # killed that early, this test once saw a clean finish.
    repo.set_params({"train": {"epochs": 6}})
    with training(repo) as stage:
        wait_for(lambda: latest_checkpoint(repo.path / "ray_results") >= 1, 600, "the first epoch's checkpoint")
        # The worker actor's own process: a process it starts (a forked helper) carries its title too,
        # and killing that one would leave training running.
        titled = [p for p in _descendants(stage.pid) if _cmdline(p).startswith("ray::RayTrainWorker")]
        worker = next(p for p in titled if p.ppid() not in {q.pid for q in titled})
        worker.kill()
        _, err = stage.communicate(timeout=300)
    assert stage.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert "error: ray: training worker" in errors[0] and "resume" in errors[0], errors
    assert f"pid {worker.pid}" in errors[0] or "rank 0" in errors[0], errors
    assert "ray.max_failures" in errors[0] and "ray.log" in errors[0]
    assert "Traceback" not in err and "\x1b[" not in err
    assert len(err.splitlines()) < 30, err


def test_a_lost_train_controller_ends_in_one_error_line(fast_repo):
    # As when Ray's memory monitor kills the run's controller actor on a machine out of memory.
    repo = fast_repo
    with training(repo) as stage:
        controller = next(p for p in _descendants(stage.pid) if _cmdline(p).startswith("ray::TrainController"))
        controller.kill()
        _, err = stage.communicate(timeout=300)
    assert stage.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: ray: the Ray Train run was lost: "), err[-3000:]
    assert "resume" in errors[0] and "ray.log" in errors[0]
    assert "Traceback" not in err
    assert [r.info.status for r in repo.runs(f"tags.`{tracking.TAG_STAGE}` = 'pretrain'")] == ["FAILED"]
