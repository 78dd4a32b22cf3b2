"""Many DVC experiments at once, each its own Ray job, each brought back into `dvc exp show`.

    python -m pipeline.submit --git-remote URL \\
        --exp small -S model.variant=iformer_s \\
        --exp -S optim.base_lr=0.004 -S train.epochs=3 \\
        --queue \\
        -- dvc exp run pretrain

DVC's own queue runs experiments one after another on this machine; here every
experiment is a Ray job (Job SDK), all submitted together, so they run side by
side on the cluster.

- `--exp [NAME] -S K=V [-S K=V ...]` is one experiment: each `-S` one
  `dvc exp run -S` override (Hydra syntax, as DVC reads it; a list
  `aug.scale=[0.5,1.0]` is one value). NAME is its DVC experiment name; without
  one DVC's name generator picks one.
- `--queue` adds every queued entry of the local DVC queue (`dvc exp run
  --queue ...`, `dvc queue status`), under its name, with the workspace it
  captured (params and code). It must have been queued on the commit checked
  out now. Once its experiment is back, the entry leaves the queue.
- After `--`: the `dvc exp run` every job runs, with targets and flags
  (e.g. `dvc exp run pretrain` stops after pretraining); `-n NAME -S ...` are
  added per experiment. Default: `dvc exp run` (the whole pipeline).
- `--git-remote` (or `$IFORMER_GIT_REMOTE`): a git remote name or URL that
  this machine and every node reach (a bare repository). A job runs its
  experiment in a private copy of the uploaded workspace (Ray unpacks one
  working_dir per upload and node, which concurrent jobs would share), then
  `dvc exp push`es it there; this side `dvc exp pull`s it as soon as its job
  SUCCEEDED.
- Outputs: with a default DVC remote in the project's `.dvc/config` (which the
  nodes must reach too), the jobs push each experiment's cached outputs there
  and the pull brings them (`dvc exp apply NAME` restores the model). Without
  one, or with `--no-cache`, an experiment comes back with what git holds
  (params, metrics, plots, dvc.lock): the job's DVC cache goes with the job.
- MLflow: each job is its own invocation (`IFORMER_PIPELINE_RUN` = its
  submission id), so each experiment has its own parent run on the tracking
  server, named and tagged (`iformer.dvc_experiment`) with the experiment's name
  and tagged with its git ref and commit (`iformer.dvc_exp_ref`, `..._rev`).

Everything is checked before anything is submitted: each experiment's params
against the schema, names unique and unused here and on the remote, the remote
reachable, a git identity to commit with (bad input: one `error:` line, exit 2).
The jobs' log lines are shown as `[NAME] ...`. Exit status: 0 when every job
SUCCEEDED and its experiment is back; 1 otherwise, after one line per
experiment that is not; 128 + n when Ctrl-C / SIGTERM stopped them here (every
running job is stopped first).
"""
from __future__ import annotations

import shlex
import sys
import threading
import time
from pathlib import Path

from ..compute import cluster
from ..config import load_config
from ..core import lifecycle
from ..errors import PipelineError
from ..tracking import runs, store
from . import job
from .plan import Experiment, dvc, exp_ref, git, identity, params_of, plan, remote_url, run_args


#: How long a job may take to start before the next one is submitted anyway.
STARTUP_S = 300.0


class Prefixed:
    """A job's log stream, cut into lines shown as `[NAME] line`; remembers the last `error:` line."""

    lock = threading.Lock()

    def __init__(self, exp: Experiment):
        self.exp, self.rest = exp, ""

    def __call__(self, chunk: str) -> None:
        *lines, self.rest = (self.rest + chunk).split("\n")
        self.emit(lines)

    def emit(self, lines: list[str]) -> None:
        with self.lock:
            for line in lines:
                if line.startswith(("error:", "ERROR:")):  # ours, DVC's
                    self.exp.error = line
                sys.stdout.write(f"[{self.exp.name}] {line}\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.rest:
            self.emit([self.rest])
            self.rest = ""


def entrypoint(exp: Experiment, baseline: str, remote: str, dvc_remote: str | None, args: list[str]) -> str:
    sets = [x for o in exp.overrides for x in ("-S", o)]
    side = ["--experiment", exp.name, "--exp-ref", exp_ref(baseline, exp.name), "--git-remote", remote]
    side += ["--stash", exp.stash_rev] if exp.stash_rev else []
    side += ["--dvc-remote", dvc_remote] if dvc_remote else []
    return shlex.join(["python", "-m", "pipeline.jobs.entry", *side, "--", "dvc", "exp", "run", "-n", exp.name,
                       *sets, *args])


def bring_back(root: Path, exp: Experiment, baseline: str, remote: str, dvc_remote: str | None) -> None:
    """`dvc exp pull` the experiment its job pushed; a queued entry it ran leaves the queue."""
    ref = exp_ref(baseline, exp.name)
    cache = ["-r", dvc_remote] if dvc_remote else ["--no-cache"]
    out = dvc(root, "exp", "pull", *cache, remote, ref)
    rev = git(root, "rev-parse", "--verify", "--quiet", ref, check=False).stdout.strip()
    if out.returncode or not rev:
        exp.status = "NOT BACK"
        exp.error = (out.stderr.strip().splitlines() or [f"{ref} is not on {remote}"])[-1]
        return
    exp.status, exp.rev = "BACK", rev
    if exp.stash_rev:
        dvc(root, "queue", "remove", exp.name)
    job.say(f"{exp.name}: SUCCEEDED; experiment {rev[:7]} is in dvc exp show")


def wait_all(client, exps: list[Experiment], land) -> None:
    """Poll the jobs; each one that SUCCEEDED is brought back (`land`) at once."""
    running = list(exps)
    while running:
        for exp in list(running):
            status = str(client.get_job_status(exp.key).value)
            if status in job.TERMINAL:
                running.remove(exp)
                exp.status = status
                exp.logs.join(timeout=10)
                exp.out.close()
                if status == "SUCCEEDED":
                    land(exp)
        if running:
            time.sleep(1.0)


def stop_all(client, exps: list[Experiment]) -> None:
    live = [e for e in exps if e.key and e.status not in (*job.TERMINAL, "BACK", "NOT BACK")]
    for exp in live:
        client.stop_job(exp.key)
    for exp in live:
        exp.status = job.wait(client, exp.key, timeout=120)
        job.say(f"{exp.name}: job {exp.key} {exp.status}")


def report(client, exps: list[Experiment]) -> int:
    back = [e for e in exps if e.status == "BACK"]
    for exp in exps:
        if exp.status == "BACK":
            continue
        why = exp.error
        if not why and exp.status == "FAILED":
            why = (client.get_job_info(exp.key).message or "").strip().split("\n")[0]
        job.say(f"{exp.name}: {exp.status} (job {exp.key})" + (f": {why[:300]}" if why else ""))
    job.say(f"{len(back)} of {len(exps)} experiments back in dvc exp show")
    return 0 if len(back) == len(exps) else 1


def launch(client, exp: Experiment, entry: str, env: dict, addr: str, exps: list[Experiment]) -> None:
    """Submit one experiment's job, follow its log, and return once it has started."""
    key = env["env_vars"]["IFORMER_PIPELINE_RUN"]
    try:
        client.submit_job(entrypoint=entry, submission_id=key, runtime_env=env, metadata={"dvc_experiment": exp.name})
    except Exception as err:  # refused by the job server: stop the ones before it, so it is all or none
        stop_all(client, exps)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"{addr}: submitting {exp.name} failed ({first[:300]}); "
                            "the jobs submitted before it were stopped") from None
    exp.key, exp.status = key, "SUBMITTED"
    what = " ".join(f"-S {o}" for o in exp.overrides) or f"(queued {exp.stash_rev[:7]})"
    job.say(f"{exp.name}: job {key} submitted: dvc exp run -n {exp.name} {what}")
    exp.out = Prefixed(exp)
    exp.logs = job.follow_logs(client, key, exp.out)
    # The jobs share one upload, which Ray unpacks once per node; a job setting
    # up while another starts would unpack it again over the files the other
    # is reading. Started one by one, the later jobs reuse the unpacked copy.
    deadline = time.monotonic() + STARTUP_S
    while str(client.get_job_status(key).value) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)


def submit_all(root: Path, args, command: list[str]) -> int:
    if args.params is not None:
        raise PipelineError("--params: not with --exp / --queue (experiments change the workspace's params.yaml)")
    extra = run_args(command)
    remote = remote_url(root, args.git_remote)
    env_identity = identity(root)
    baseline, exps = plan(root, args.exp or [], args.queue, remote)
    addr = job.dashboard_address(args.address)
    for exp in exps:
        cluster.check_tracking(params_of(root, exp), addr)
    uri = runs.tracking_uri(load_config(root / "params.yaml"), root)
    store.check_reachable(uri)
    dvc_remote = None if args.no_cache else (dvc(root, "config", "--project", "core.remote").stdout.strip() or None)
    client = job.connect(addr)
    job.say(f"{len(exps)} experiments on {baseline[:7]}, each a job on {addr}; they come back through {remote}"
               + (f" (outputs through DVC remote {dvc_remote})" if dvc_remote else " (without outputs: no DVC remote)"))
    try:
        lifecycle.handle_signals()
        for exp in exps:
            env = job.runtime_env(root, uri, job.job_key(exp.name))
            env["env_vars"].update(env_identity)
            launch(client, exp, entrypoint(exp, baseline, remote, dvc_remote, extra), env, addr, exps)
        wait_all(client, exps, lambda exp: bring_back(root, exp, baseline, remote, dvc_remote))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP via lifecycle
        why, code = lifecycle.stop_reason()
        job.say(f"{why}: stopping every job still running")
        stop_all(client, exps)
        return code
    return report(client, exps)
