"""`python -m pipeline.submit --exp ... --queue`: DVC experiments as Ray jobs at once on the 2-node loopback cluster.

Each experiment trains one worker with half a CPU, so all three fit on the two
one-CPU nodes at the same time; they run `dvc exp run pretrain` (prepare and
one tiny epoch). The git remote is a bare repository in the test's temp dir
and the project's default DVC remote a directory beside it.
"""
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster_fixture import cluster_repo, ray_query, wait_for
from pipeline.tracking import runs as tracking

pytestmark = pytest.mark.slow

#: Every job the cluster's job server knows: submission id -> [status, start ms, end ms].
JOBS = """
from ray.job_submission import JobSubmissionClient
jobs = JobSubmissionClient('{url}').list_jobs()
print(json.dumps({{j.submission_id: [str(j.status.value), j.start_time, j.end_time] for j in jobs if j.submission_id}}))
"""


def experiments_repo(path, cluster):
    repo = cluster_repo(path / "repo", cluster, {"train": {"epochs": 1},
                                                 "ray": {"num_workers": 1, "cpus_per_worker": 0.5}})
    remote = path / "exps.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    repo.run("dvc", "remote", "add", "-d", "store", str(path / "dvc-store"))
    repo.git("commit", "-qam", "default DVC remote")
    repo.env["RAY_API_SERVER_ADDRESS"] = cluster.dashboard_url
    return repo, remote


def submit(repo, remote, *args, timeout=1200):
    out = repo.run(sys.executable, "-m", "pipeline.submit", "--git-remote", str(remote), *args, check=False,
                   timeout=timeout)
    print(out.stdout)  # shown when the test fails
    print(out.stderr, file=sys.stderr)
    return out


def jobs(cluster) -> dict:
    return ray_query(cluster, JOBS.format(url=cluster.dashboard_url))


def running(cluster, suffixes: tuple) -> list[str]:
    return [j for j, (status, *_) in jobs(cluster).items() if j.endswith(suffixes) and status == "RUNNING"]


def submitted(stderr: str) -> dict:
    """Experiment name -> job id, from the `[submit] NAME: job ID submitted: ...` lines."""
    return {line.split()[1].rstrip(":"): line.split()[3] for line in stderr.splitlines()
            if line.startswith("[submit] ") and " submitted: " in line}


def shown(repo) -> dict:
    """`dvc exp show --json`: the baseline's experiments, name -> (rev, metrics of metrics/pretrain.json)."""
    rows = json.loads(repo.run("dvc", "exp", "show", "--json").stdout)
    out = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                metrics = (rev["data"] or {}).get("metrics") or {}
                out[rev["name"]] = (rev["rev"], metrics.get("metrics/pretrain.json", {}).get("data"))
    return out


def test_three_experiments_run_at_once_and_come_back(tmp_path, cluster):
    repo, remote = experiments_repo(tmp_path, cluster)
    repo.run("dvc", "exp", "run", "--queue", "-n", "queued", "-S", "optim.base_lr=0.001")
    t0 = time.time()
    out = submit(repo, remote, "--exp", "lr-hi", "-S", "optim.base_lr=0.004",
                 "--exp", "wd", "-S", "optim.weight_decay=0.1", "-S", "train.seed=1", "--queue",
                 "--", "dvc", "exp", "run", "pretrain")
    elapsed = time.time() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"three experiments submitted and back in {elapsed:.0f} s")
    names = {"lr-hi", "wd", "queued"}

    ids = submitted(out.stderr)
    assert set(ids) == names, out.stderr[-3000:]
    assert "[lr-hi] " in out.stdout and "[queued] " in out.stdout, "each job's log, prefixed"
    assert "3 of 3 experiments back in dvc exp show" in out.stderr
    info = jobs(cluster)
    assert all(info[j][0] == "SUCCEEDED" for j in ids.values()), info
    starts, ends = [info[j][1] for j in ids.values()], [info[j][2] for j in ids.values()]
    assert max(starts) < min(ends), f"the three jobs overlapped in time: {info}"

    exps = shown(repo)
    assert names <= set(exps), exps
    for name in names:
        rev, metrics = exps[name]
        assert metrics and metrics["epochs"] == 1 and metrics["train_loss"] > 0, (name, metrics)
    assert len({exps[name][1]["train_loss"] for name in names}) == 3, "three different trainings"
    assert "queued" not in repo.run("dvc", "queue", "status").stdout, "the queued entry ran and left the queue"

    client = cluster.mlflow.client()
    exp_id = client.get_experiment_by_name(repo.params()["mlflow"]["experiment"]).experiment_id
    parents, trainings = {}, []
    for name in names:
        runs = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'pipeline' and "
                                            f"tags.`iformer.dvc_experiment` = '{name}'")
        assert len(runs) == 1, (name, runs)
        run = runs[0]
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert run.data.tags["iformer.dvc_exp_rev"] == exps[name][0], "the parent run names the experiment's commit"
        assert run.data.tags[tracking.TAG_INVOCATION] == ids[name], "one invocation per job"
        parents[name] = run.info.run_id
        child = client.search_runs([exp_id], f"tags.`{tracking.TAG_PARENT}` = '{run.info.run_id}' and "
                                             f"tags.`{tracking.TAG_STAGE}` = 'pretrain'")
        assert len(child) == 1 and child[0].info.status == "FINISHED"
        trainings.append((child[0].info.start_time, child[0].info.end_time))
    assert len(set(parents.values())) == 3
    spans = sorted(trainings)
    print("pretrain runs (s from the first start):",
          [(round((s - spans[0][0]) / 1000), round((e - spans[0][0]) / 1000)) for s, e in spans])
    assert max(s for s, _ in spans) < min(e for _, e in spans), "the three trainings overlapped"

    # Outputs came back through the DVC remote: the experiment's model, from its own MLflow run. (`exp apply`
    # also reports the stages this experiment never ran as missing, so its checkout is redone for two.)
    repo.run("dvc", "exp", "apply", "lr-hi", check=False)
    repo.run("dvc", "checkout", "prepare", "pretrain")
    manifest = json.loads((repo.path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["mlflow_parent_run_id"] == parents["lr-hi"]
    assert (repo.path / "artifacts/pretrain/model.pt").is_file()


def test_a_bad_experiment_stops_everything_before_submission(tmp_path, cluster):
    repo, remote = experiments_repo(tmp_path, cluster)
    before = jobs(cluster)
    out = submit(repo, remote, "--exp", "lr", "-S", "optim.base_lr=0.004", "--exp", "bad", "-S", "optim.bogus=1",
                 timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--exp 2 (bad)" in errors[0] and "optim.bogus" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert jobs(cluster) == before, "nothing was submitted"
    assert subprocess.run(["git", "ls-remote", str(remote)], capture_output=True, text=True).stdout == ""


def test_ctrl_c_stops_every_experiment(tmp_path, cluster):
    repo, remote = experiments_repo(tmp_path, cluster)
    repo.set_params({"train": {"epochs": 30}})
    repo.git("commit", "-qam", "long runs")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.submit", "--git-remote", str(remote),
                             "--exp", "stop-a", "-S", "optim.base_lr=0.004",
                             "--exp", "stop-b", "-S", "optim.base_lr=0.001",
                             "--", "dvc", "exp", "run", "pretrain"],
                            cwd=repo.path, env=repo.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(running(cluster, ("-stop-a", "-stop-b"))) == 2, 300, "both jobs running")
        time.sleep(5)  # into `dvc exp run`
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    ids = submitted(err)
    assert set(ids) == {"stop-a", "stop-b"}
    info = jobs(cluster)
    assert [info[j][0] for j in ids.values()] == ["STOPPED", "STOPPED"], info
    assert not {"stop-a", "stop-b"} & set(shown(repo)), "nothing came back"
    left = [p for name in ids for p in Path(tempfile.gettempdir()).glob(f"iformer-exp-{name}-*")]
    assert not left, "each job removed its private copy of the workspace"
    assert subprocess.run(["git", "ls-remote", str(remote)], capture_output=True, text=True).stdout == ""


def test_without_a_dvc_remote_an_experiment_comes_back_without_outputs(tmp_path, cluster):
    repo, remote = experiments_repo(tmp_path, cluster)
    out = submit(repo, remote, "--no-cache", "--exp", "img64", "-S", "data.image_size=64",
                 "--", "dvc", "exp", "run", "prepare")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "without outputs" in out.stderr
    refs = dict(line.split() for line in repo.git("for-each-ref", "--format=%(refname:lstrip=-1) %(objectname)",
                                                  "refs/exps").stdout.splitlines())
    assert shown(repo)["img64"][0] == refs["img64"]
    assert "image_size: 64" in repo.git("show", f"{refs['img64']}:dvc.lock").stdout, "its own dvc.lock came back"
    assert not (tmp_path / "dvc-store").exists(), "nothing went to the DVC remote"
    assert not list((repo.path / ".dvc" / "cache").rglob("*.dir")), "no outputs came into the local cache"
    client = cluster.mlflow.client()
    exp_id = client.get_experiment_by_name(repo.params()["mlflow"]["experiment"]).experiment_id
    runs = client.search_runs([exp_id], "tags.`iformer.dvc_experiment` = 'img64' and tags.`iformer.kind` = 'pipeline'")
    assert [r.data.tags["iformer.dvc_exp_rev"] for r in runs] == [refs["img64"]]
