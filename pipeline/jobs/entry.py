"""The job's side of `pipeline.submit`: run the command, then hand its results back.

Run by Ray's job supervisor in the unpacked working dir on the cluster as
`python -m pipeline.jobs.entry [EXPERIMENT OPTIONS] -- CMD...`.
`IFORMER_PIPELINE_RUN` (set by the submitter to the job's submission id) makes
every stage of the command join one MLflow parent run. A stop signal is passed
on to the command.

- Plain (`-- dvc repro`): on success the results archive (`RESULTS`, a tar.gz of
  `results_files`) is logged to that run, or to a run of its own tagged the same
  way when every stage was cached.
- An experiment (`--experiment NAME --exp-ref REF --git-remote URL [--stash REV]
  [--dvc-remote R] -- dvc exp run -n NAME ...`, from `pipeline.jobs.batch`):
  the command runs in a private copy of the working dir (jobs of one upload
  share Ray's unpacked copy on a node), after the queued entry's stash is
  applied there as DVC's queue would; on success the experiment is `dvc exp
  push`ed to the git remote (its outputs to the DVC remote, or `--no-cache`),
  and the parent run is tagged with the experiment's name, ref and commit.
  The copy is removed however the job ends.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..core import console

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


def job_run(client, experiment: str, key: str, name: str = "") -> str:
    """The pipeline's MLflow parent run of this job, else a new (FINISHED) one tagged as its."""
    from ..tracking import runs

    exp_id = runs.experiment_id(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{runs.TAG_INVOCATION}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name or f"job {key}",
                            tags={runs.TAG_KIND: "job", runs.TAG_INVOCATION: key})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def upload_results(root: Path, key: str) -> int:
    from mlflow.tracking import MlflowClient

    from ..config import load_config
    from ..tracking.runs import tracking_uri

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


class Child:
    """The command as a child process; stop signals are passed on to it (or stop us between commands)."""

    proc: subprocess.Popen | None = None
    stopped = 0

    @classmethod
    def install(cls) -> None:
        def forward(signum, _frame):
            cls.stopped = signum
            if cls.proc is not None and cls.proc.poll() is None:
                cls.proc.send_signal(signum)
            else:
                raise KeyboardInterrupt

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)

    @classmethod
    def run(cls, argv: list[str], **kw) -> int:
        cls.proc = subprocess.Popen(argv, **kw)
        status = cls.proc.wait()
        cls.proc = None
        return status if status >= 0 else 128 - status


def say(message: str) -> None:
    """A `[submit]` line in the job's log (its stdout)."""
    console.say("submit", message, file=sys.stdout)


def private_copy(src: Path, name: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix=f"iformer-exp-{name}-"))
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    return dest


def apply_stash(root: Path, rev: str) -> None:
    """A queued entry's workspace on its baseline, as DVC's queue sets it up (HEAD reset, stash applied)."""
    for args in (["reset", "-q", "--hard"], ["clean", "-fdq"], ["stash", "apply", "-q", rev],
                 # DVC's packed `dvc exp run` arguments ride in the stash; ours come from the command line
                 ["rm", "-q", "--cached", "--ignore-unmatch", ".dvc/tmp/repro.dat"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True)


def tag_parent(root: Path, key: str, name: str, ref: str, rev: str) -> None:
    from mlflow.tracking import MlflowClient

    from ..config import load_config
    from ..tracking.runs import tracking_uri

    cfg = load_config(root / "params.yaml")
    client = MlflowClient(tracking_uri(cfg, root))
    run_id = job_run(client, cfg.mlflow.experiment, key, name)
    for tag, value in (("iformer.dvc_experiment", name), ("iformer.dvc_exp_ref", ref), ("iformer.dvc_exp_rev", rev)):
        client.set_tag(run_id, tag, value)


def run_experiment(args, command: list[str]) -> int:
    src = Path.cwd()
    root = private_copy(src, args.experiment)
    try:
        if args.stash:
            apply_stash(root, args.stash)
        env = dict(os.environ, IFORMER_ROOT=str(root))
        env.pop("DVC_ROOT", None)
        paths = env.get("PYTHONPATH", "").split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(str(root) if Path(p).resolve() == src.resolve() else p
                                            for p in paths if p)
        status = Child.run(command, cwd=root, env=env)
        if status or Child.stopped:
            return status or 128 + Child.stopped
        rev = subprocess.run(["git", "rev-parse", "--verify", args.exp_ref], cwd=root, capture_output=True,
                             text=True).stdout.strip()
        if not rev:
            print(f"error: {args.exp_ref}: the command made no experiment (is it `dvc exp run`?)", flush=True)
            return 1
        cache = ["-r", args.dvc_remote] if args.dvc_remote else ["--no-cache"]
        status = Child.run(["dvc", "exp", "push", *cache, args.git_remote, args.exp_ref], cwd=root, env=env)
        if status:
            print(f"error: dvc exp push {args.git_remote} {args.exp_ref} failed ({status})", flush=True)
            return status
        key = os.environ.get("IFORMER_PIPELINE_RUN", "")
        if key:
            tag_parent(root, key, args.experiment, args.exp_ref, rev)
        say(f"experiment {args.experiment} ({rev[:7]}) pushed to {args.git_remote}")
        return 0
    except KeyboardInterrupt:
        return 128 + (Child.stopped or signal.SIGINT)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else 0
    ap = argparse.ArgumentParser(prog="python -m pipeline.jobs.entry", usage="%(prog)s [options] -- CMD...")
    ap.add_argument("--experiment", default=None)
    ap.add_argument("--exp-ref", default=None)
    ap.add_argument("--git-remote", default=None)
    ap.add_argument("--stash", default=None)
    ap.add_argument("--dvc-remote", default=None)
    args = ap.parse_args(argv[:split])
    command = argv[split + 1:] if "--" in argv else argv
    if not command or (args.experiment and not (args.exp_ref and args.git_remote)):
        ap.print_usage(sys.stderr)
        return 2
    Child.install()
    if args.experiment:
        return run_experiment(args, command)
    try:
        status = Child.run(command)
        if status != 0 or Child.stopped:
            return status or 128 + Child.stopped
        key = os.environ.get("IFORMER_PIPELINE_RUN", "")
        if key:
            n = upload_results(Path.cwd(), key)
            say(f"{n} result files uploaded to the job's MLflow run")
        return 0
    except KeyboardInterrupt:
        return 128 + (Child.stopped or signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
