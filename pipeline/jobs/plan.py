"""Which experiments `pipeline.submit --exp/--queue` runs, checked before any is submitted.

An `Experiment` is a DVC experiment name plus either `-S` overrides (from
`--exp [NAME] -S K=V [-S K=V ...]`) or a queued entry's stash commit (`--queue`).
`plan` reads them, names the unnamed ones with DVC's generator, and checks
everything it can here: the overrides applied to params.yaml the way DVC
applies them (Hydra) and validated against the schema, names unique and
unused on this commit here and on the git remote, queued entries on HEAD.
Every problem is one `PipelineError` naming the experiment.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import TRAINING_SECTIONS, Config, parse_config
from ..errors import PipelineError

#: Names we give experiments become git ref components.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: `dvc exp run` options this command sets itself, or that would run elsewhere.
OWN_FLAGS = ("-n", "--name", "-S", "--set-param", "--queue", "--run-all", "--temp", "-j", "--jobs")


@dataclass
class Experiment:
    name: str
    overrides: list[str]
    stash_rev: str | None = None  # a queued entry's stash commit
    index: int = 0  # its place among the --exp options
    key: str = ""  # the job's submission id
    status: str = "NOT SUBMITTED"
    error: str = ""  # the last `error:` line of its job's log, or why it did not come back
    rev: str = ""
    out: object = None  # its log stream's line splitter, and the thread following the stream
    logs: object = None

    @property
    def label(self) -> str:
        if self.stash_rev:
            return f"queued {self.name}"
        return f"--exp {self.index}" + (f" ({self.name})" if self.name else "")


def git(root: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        first = (out.stderr.strip().splitlines() or ["failed"])[0]
        raise PipelineError(f"git {' '.join(args[:2])}: {first}")
    return out


def dvc(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout)


def parse_exp(name: str | None, overrides: list[str], index: int) -> Experiment:
    """One `--exp [NAME] -S K=V [-S K=V ...]` group, checked: a usable name, overrides DVC's `-S` takes."""
    name = (name or "").strip()
    where = f"--exp {index}" + (f" ({name})" if name else "")
    if name and not NAME.fullmatch(name):
        hint = "; overrides go in -S K=V after it" if "=" in name else ""
        raise PipelineError(f"{where}: {name!r} is not an experiment name (letters, digits, - and _){hint}")
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if not overrides or bad:
        raise PipelineError(f"{where}: {bad[0]!r} is not KEY=VALUE" if bad else
                            f"{where}: no -S KEY=VALUE after it (`--exp NAME -S K=V -S K=V` per experiment)")
    return Experiment(name, list(overrides), index=index)


def params_of(root: Path, exp: Experiment) -> Config:
    """The experiment's params.yaml, validated: DVC's own `-S` (Hydra) applied to the workspace's."""
    if exp.stash_rev:
        text = git(root, "show", f"{exp.stash_rev}:params.yaml").stdout
    else:
        from dvc.exceptions import InvalidArgumentError
        from dvc.utils.hydra import apply_overrides

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "params.yaml"
            shutil.copyfile(root / "params.yaml", path)
            try:
                apply_overrides(path, exp.overrides)
            except InvalidArgumentError as err:
                causes, cause = [], err.__cause__ or err
                while cause is not None and len(causes) < 2:  # Hydra's message, then OmegaConf's
                    causes.append((str(cause).strip().splitlines() or [type(cause).__name__])[0])
                    cause = cause.__cause__
                raise PipelineError(f"{exp.label}: {causes[0]}" + (f" ({causes[1]})" if causes[1:] else "")) from None
            text = path.read_text()
    try:
        return parse_config(yaml.safe_load(text), exp.label)
    except PipelineError as err:
        raise PipelineError("; ".join(str(err).splitlines())) from None


def credential_in(url: str) -> str | None:
    """What credential a remote URL carries (None: none): a password, a token as user name, or one in the query.

    Only an SSH URL may name a user (`ssh://git@host/x.git`): its key lives on the node, not in the URL.
    """
    from urllib.parse import parse_qsl, urlsplit

    if "://" not in url:
        return None  # a path or scp-like user@host:path (SSH)
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password is not None or ":" in parts.netloc.rpartition("@")[0]:
        return "a password"
    if "@" in parts.netloc and not parts.scheme.lower().endswith("ssh"):
        return "a user name or token"
    if any(re.search(r"token|key|pass|secret|auth|sig", k, re.I) for k, _ in parse_qsl(parts.query)):
        return "a token in its query"
    return None


def remote_url(root: Path, arg: str | None) -> str:
    value = arg or os.environ.get("IFORMER_GIT_REMOTE", "")
    field = "--git-remote / IFORMER_GIT_REMOTE"
    if not value:
        raise PipelineError(f"{field}: not set; name a git remote this machine and the cluster both reach "
                            "(e.g. a bare repository: git init --bare /shared/exps.git)")
    named = git(root, "remote", "get-url", value, check=False)
    url = named.stdout.strip() if named.returncode == 0 else value
    credential = credential_in(url)
    if credential:  # the URL goes into the jobs' command lines and our output: never echoed
        raise PipelineError(f"{field}: has {credential} in it; give the nodes SSH keys or a git credential "
                            "helper (the URL is not shown)")
    if "://" not in url and not re.match(r"[\w.-]+@[\w.-]+:", url):  # a path, not a URL or user@host:path
        url = str((root / url).resolve())
    probe = git(root, "ls-remote", url, "refs/exps/*", check=False, timeout=60)
    if probe.returncode:
        raise PipelineError(f"{field}: {url} cannot be read ({(probe.stderr.strip().splitlines() or ['?'])[0]})")
    return url


def identity(root: Path) -> dict:
    """Who the jobs commit experiments as: whoever commits here."""
    env = {}
    for who in ("AUTHOR", "COMMITTER"):
        ident = git(root, "var", f"GIT_{who}_IDENT", check=False)
        m = re.match(r"(.*) <(.*)> \d+ [+-]\d{4}$", ident.stdout.strip())
        if not m:
            raise PipelineError("git user.name / user.email: not set here; the jobs commit experiments as you")
        env[f"GIT_{who}_NAME"], env[f"GIT_{who}_EMAIL"] = m.groups()
    return env


def plan(root: Path, specs: list[tuple[str | None, list[str]]], queue: bool,
         remote: str) -> tuple[str, list[Experiment]]:
    """The experiments to submit on HEAD (the baseline), checked; names given where missing.

    `specs`: one (NAME or None, its `-S` overrides) per `--exp`."""
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import get_random_exp_name

    if not (root / ".git").is_dir():
        raise PipelineError(f"{root}: not the main checkout of a git repository (the jobs need its .git)")
    baseline = git(root, "rev-parse", "HEAD").stdout.strip()
    exps = [parse_exp(name, sets, i) for i, (name, sets) in enumerate(specs, 1)]
    with Repo(str(root)) as repo:
        if queue:
            for entry in repo.experiments.celery_queue.iter_queued():
                if entry.baseline_rev != baseline:
                    raise PipelineError(f"queued {entry.name}: queued on {entry.baseline_rev[:7]}, not on HEAD "
                                        f"({baseline[:7]}); check that commit out, or `dvc queue remove {entry.name}`")
                exps.append(Experiment(entry.name, [], stash_rev=entry.stash_rev))
            if len(exps) == len(specs):
                raise PipelineError("--queue: the DVC queue is empty (`dvc exp run --queue -S ...` adds to it)")
        trainings: dict[str, Experiment] = {}
        for exp in exps:
            params = params_of(root, exp).to_dict()
            key = json.dumps({k: params[k] for k in TRAINING_SECTIONS}, sort_keys=True)
            if key in trainings:  # pretrain's Ray run is named by these: the second trainer would be refused
                raise PipelineError(f"{exp.label}: trains exactly as {trainings[key].label} (same "
                                    f"{'/'.join(TRAINING_SECTIONS)} params); make them differ there, or run one "
                                    "after the other")
            trainings[key] = exp
        taken = {e.name for e in exps if e.name}
        for exp in exps:
            while not exp.name:
                exp.name = get_random_exp_name(repo.scm, baseline)
                exp.name = "" if exp.name in taken else exp.name
            taken.add(exp.name)
    prefix = exp_ref(baseline, "")
    here = set(git(root, "for-each-ref", "--format=%(refname)", prefix.rstrip("/")).stdout.split())
    there = {line.split()[-1] for line in git(root, "ls-remote", remote, prefix + "*").stdout.splitlines()}
    seen: set[str] = set()
    for exp in exps:
        ref = exp_ref(baseline, exp.name)
        if exp.name in seen:
            raise PipelineError(f"{exp.label}: the name is given twice")
        seen.add(exp.name)
        if ref in here or ref in there:
            raise PipelineError(f"{exp.label}: an experiment of this name already exists on this commit "
                                f"{'here' if ref in here else 'on ' + remote}; pick another name")
    return baseline, exps


def exp_ref(baseline: str, name: str) -> str:
    """Where DVC keeps an experiment: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>."""
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def run_args(command: list[str]) -> list[str]:
    """What follows `dvc exp run` in the command after `--`."""
    if not command:
        return []
    if command[:3] != ["dvc", "exp", "run"]:
        raise PipelineError(f"after `--`: {shlex.join(command)}: with --exp / --queue, the command is "
                            "`dvc exp run [TARGETS...]` (each experiment adds -n NAME -S ...)")
    own = [a for a in command[3:] if a.split("=", 1)[0] in OWN_FLAGS]
    if own:
        raise PipelineError(f"after `--`: {own[0]}: set per experiment by this command; not allowed here")
    return command[3:]
