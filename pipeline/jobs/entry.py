"""The job's side of `pipeline.submit`: run the command, then upload its results to MLflow.

Run by Ray's job supervisor in the unpacked working dir on the cluster as
`python -m pipeline.jobs.entry -- CMD...`. `IFORMER_PIPELINE_RUN` (set by the
submitter to the job's submission id) makes every stage of the command join
one MLflow parent run; on success the results archive (`RESULTS`, a tar.gz of
`results_files`) is logged to that run, or to a run of its own tagged the same
way when every stage was cached. A stop signal is passed on to the command.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: The archive's path among the run's MLflow artifacts.
RESULTS = "workspace/results.tar.gz"
#: What comes back into the user's workspace (files larger than the limit stay in DVC's cache).
RESULT_DIRS = ("metrics", "plots", "artifacts")
RESULT_FILES = ("dvc.lock",)
MAX_FILE_MB = float(os.environ.get("IFORMER_RESULTS_MAX_FILE_MB", "50"))


def results_files(root: Path, max_mb: float = MAX_FILE_MB) -> list[Path]:
    files = [root / f for f in RESULT_FILES if (root / f).is_file()]
    for d in RESULT_DIRS:
        files += sorted(p for p in (root / d).rglob("*") if p.is_file() and p.stat().st_size <= max_mb * 2**20)
    return files


def job_run(client, experiment: str, key: str) -> str:
    """The MLflow run the results go to: the pipeline's parent run of this job, else a new one."""
    from .. import tracking

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_INVOCATION}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"job {key}", tags={tracking.TAG_KIND: "job", tracking.TAG_INVOCATION: key})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def upload_results(root: Path, key: str) -> int:
    from mlflow.tracking import MlflowClient

    from ..config import load_config
    from ..tracking import tracking_uri

    cfg = load_config(root / "params.yaml")
    client = MlflowClient(tracking_uri(cfg, root))
    files = results_files(root)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / Path(RESULTS).name
        with tarfile.open(archive, "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=str(f.relative_to(root)))
        client.log_artifact(job_run(client, cfg.mlflow.experiment, key), str(archive), str(Path(RESULTS).parent))
    return len(files)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m pipeline.jobs.entry -- CMD...", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv)

    def forward(signum, _frame):
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = child.wait()
    if status != 0:
        return status if status > 0 else 128 - status
    key = os.environ.get("IFORMER_PIPELINE_RUN", "")
    if key:
        n = upload_results(Path.cwd(), key)
        print(f"[submit] {n} result files uploaded to the job's MLflow run", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
