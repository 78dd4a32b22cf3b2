"""Which stages' outputs belong to the current params and code: DVC's record, read in-process.

A figure (a metric, a curve, a report table, a headline on the MLflow parent
run) belongs to a run only if the stage that produced it, and every stage
upstream of it, is up to date with that run's params and code. `dvc exp run
pretrain` or `dvc repro -s report` leave the later stages as they were, and
their files then hold the previous model's figures.

A stage is *stale* when DVC's record contradicts it: `dvc.lock` has an entry
for the stage and its params, code, command, upstream outputs or own outputs
no longer match it, or a stage upstream of it is stale. A stage that ran in
this pipeline invocation (`ran_here`) is current whatever `dvc.lock` says
(stages run by hand update no lock), but still stale when one upstream of it
is. A stage `dvc.lock` has no entry for was never run through DVC: nothing
contradicts it, and nothing vouches for it either.

- `workspace(root, stages)`: the working tree, from `dvc status` (DVC's Python
  API in-process, no subprocess);
- `at_revision(root, rev)`: a commit or experiment, from what DVC recorded there:
  each stage's `dvc.lock` entry against that revision's params and code and the
  outputs its upstream stages' entries record.
Both return a `Freshness`, or None when `root` is no DVC project.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass
class Freshness:
    stale: dict[str, str]  # stage -> why: the root causes, e.g. "pretrain: params train.epochs changed"
    recorded: set[str]  # stages dvc.lock has an entry for
    parents: dict[str, list[str]]  # stage -> the stages whose outputs it reads
    owners: dict[str, str] = field(default_factory=dict)  # output path (outs, metrics, plots) -> its stage

    def vouched(self, stage: str) -> bool:
        """DVC records `stage` as up to date, and everything upstream of it too."""
        return stage in self.recorded and stage not in self.stale

    def upstream_stale(self, stage: str) -> str | None:
        """Why a stage upstream of `stage` is stale (None when none is)."""
        why = [self.stale[p] for p in self.parents.get(stage, []) if p in self.stale]
        return "; ".join(dict.fromkeys(why)) or None


def describe(stale: dict[str, str]) -> str:
    """`evaluate, latency (artifacts/pretrain modified)`: stale stages grouped by cause.

    A cause is named without the stage it is found at (`evaluate: artifacts/pretrain
    modified`, `latency: artifacts/pretrain modified` are one cause).
    """
    by_cause: dict[str, list[str]] = {}
    for stage, why in stale.items():
        cause = "; ".join(dict.fromkeys(part.partition(": ")[2] or part for part in why.split("; ")))
        by_cause.setdefault(cause, []).append(stage)
    return "; ".join(f"{', '.join(stages)} ({cause})" for cause, stages in by_cause.items())


@contextmanager
def _quiet():
    """DVC's INFO lines are not ours to show (a stage's log has `[stage]` lines only)."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_project(root: Path) -> bool:
    return (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _same(a, b) -> bool:
    """Equal values; a number and a string of it too (YAML 1.1 reads dvc.lock's `1e-08` as a string)."""
    if a == b or (isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))):
        return True
    try:
        return isinstance(a, (str, int, float)) and isinstance(b, (str, int, float)) and float(a) == float(b)
    except ValueError:
        return False


def _params_changed(recorded: dict, actual: dict) -> list[str]:
    """Dotted names of the params whose values differ (DVC names only the section it tracks)."""
    old, new = _flat(recorded), _flat(actual)
    return sorted(k for k in set(old) | set(new) if not _same(old.get(k), new.get(k)))


def _cause(entries: list, lock: dict, params: dict, root: Path | None = None) -> str | None:
    """A short phrase for one stage's `dvc status` entries; None when only 'not in cache' outputs remain.

    DVC names paths from the current directory; they are named from `root` here.
    """
    parts = []
    for entry in entries:
        if isinstance(entry, str):  # "changed command", "always changed"
            parts.append(entry.removeprefix("changed ") + " changed" if entry.startswith("changed") else entry)
            continue
        for kind, changes in entry.items():
            for path, state in changes.items():
                path = _from_root(path, root) if root else path
                if isinstance(state, dict):  # a params file: {section or key: modified/new/deleted}
                    recorded = ((lock.get("params") or {}).get(path) or {})
                    names = _params_changed({k: recorded.get(k) for k in state},
                                            {k: _lookup(params, k) for k in state}) or list(state)
                    parts.append(f"params {', '.join(names)} changed")
                elif kind == "changed outs" and state == "not in cache":
                    continue  # equal to dvc.lock, only not in this clone's cache (e.g. unpacked by pipeline.submit)
                else:
                    parts.append(f"{'output ' if kind == 'changed outs' else ''}{path} {state}")
    return ", ".join(parts) or None


def _from_root(path: str, root: Path) -> str:
    """A path DVC named, from `root`: DVC names them from the current directory when it is inside the repo."""
    cwd = Path.cwd().resolve()
    base = cwd if cwd == root or root in cwd.parents else root
    return os.path.relpath(base / path, root)


def _lookup(params: dict, dotted: str):
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _with_upstream(names: Iterable[str], parents: dict[str, list[str]]) -> list[str]:
    """`names` and every stage they read from, directly or not."""
    seen: dict[str, None] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen[name] = None
            todo.extend(parents.get(name, []))
    return list(seen)


def _judge(names: Iterable[str], parents: dict[str, list[str]], own: dict[str, str]) -> dict[str, str]:
    """Stale stages among `names` and upstream: their own cause, else their upstream's causes."""
    memo: dict[str, str | None] = {}

    def stale(name: str, seen: frozenset = frozenset()) -> str | None:
        if name not in memo:
            if name in seen:  # DVC refuses cycles; be safe anyway
                return None
            ups = [why for p in parents.get(name, []) if (why := stale(p, seen | {name}))]
            memo[name] = f"{name}: {own[name]}" if name in own else ("; ".join(dict.fromkeys(ups)) or None)
        return memo[name]

    for name in names:
        stale(name)
    return {k: v for k, v in memo.items() if v}


def _graph(repo) -> tuple[dict[str, object], dict[str, list[str]], dict[str, str]]:
    """(stage name -> DVC stage, stage -> the stages it reads from, output path -> its stage)."""
    graph = repo.index.graph
    nodes = {s.name: s for s in graph.nodes if getattr(s, "name", None)}  # dvc.yaml's stages, by name
    # DVC's edges point from a stage to the stages whose outputs it depends on.
    parents = {n: [p.name for p in graph.successors(s) if getattr(p, "name", None) in nodes] for n, s in nodes.items()}
    owners = {str(o.def_path): n for n, s in nodes.items() for o in s.outs}
    return nodes, parents, owners


def workspace(root: Path, stages: Iterable[str] | None = None, ran_here: Iterable[str] = ()) -> Freshness | None:
    """`stages` (default: all) and what they read from, judged against the working tree by `dvc status`.

    `ran_here`: stages that ran in this pipeline invocation, with its params
    (their own outputs are current; their upstream is judged as usual).
    """
    root = Path(root).resolve()
    if not _is_project(root):
        return None
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    ran_here = set(ran_here)
    try:
        with _quiet(), Repo(str(root)) as repo:
            nodes, parents, owners = _graph(repo)
            targets = list(nodes) if stages is None else [s for s in stages if s in nodes]
            # Stage by stage, `targets` and what they read from only: `dvc repro` write-locks the
            # running stage's outputs, and a status of it or of a stage after it fails ("is busy").
            status = {}
            with repo.lock:
                for name in _with_upstream(targets, parents):
                    status.update({name: entries for entries in nodes[name].status().values()})
    except DvcException:  # a broken dvc.yaml / dvc.lock, or the repo lock held by another command
        return None
    lock = _read_yaml(root / "dvc.lock").get("stages") or {}
    params = _read_yaml(root / "params.yaml") if status else {}
    own = {}
    for name, entries in status.items():
        if name in lock and name not in ran_here and (why := _cause(entries, lock[name], params, root)):
            own[name] = why
    return Freshness(_judge(targets, parents, own), set(lock) & set(nodes), parents, owners)


def before(root: Path, stage: str, earlier: list[str], ran_here: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """For `stage`, about to run: the stale `earlier` stages, and `stage` itself when what it reads is
    stale (stage -> why); and the `earlier` stages DVC vouches for. Outside a DVC project: neither.

    `earlier` comes before `stage` in an order DVC could run them in, so none of them reads
    `stage`'s outputs (which `dvc repro` holds locked while `stage` runs).
    """
    verdict = workspace(root, earlier, ran_here)
    if verdict is None:
        return {}, set()
    stale = {s: why for s, why in verdict.stale.items() if s in earlier}
    if verdict.upstream_stale(stage):
        stale[stage] = verdict.upstream_stale(stage)
    return stale, {s for s in earlier if verdict.vouched(s)}


def _read_yaml(path: Path) -> dict:
    """A YAML file with PyYAML's C loader (DVC's pure-Python one takes 40x longer), {} if unreadable."""
    import yaml

    try:
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _parse(text: str) -> dict:
    """YAML as DVC reads it (1.2: `1e-08` is a number, as DVC wrote it into dvc.lock)."""
    from dvc.utils.serialize import loads_yaml

    try:
        return loads_yaml(text) or {}
    except Exception:  # not YAML: as good as absent
        return {}


def _revision_cause(repo, stage, producers: dict, lock: dict, params: dict) -> str | None:
    """Why `stage`'s dvc.lock entry at this revision does not match the revision (None: it does)."""
    from dvc.dependency.param import ParamsDependency

    parts = []
    if stage.cmd_changed:
        parts.append("command changed")
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):  # compared here: DVC would parse the params file once per stage
            recorded = (lock.get("params") or {}).get(str(dep.def_path)) or {}
            keys = list(dep.params) or list(params)
            names = _params_changed({k: recorded.get(k) for k in keys}, {k: _lookup(params, k) for k in keys})
            if names:
                parts.append(f"params {', '.join(names)} changed")
            continue
        path = str(dep.def_path)
        producer = producers.get(path) or next((o for p, o in producers.items() if path.startswith(p + "/")), None)
        if producer is None:  # code or data in git at this revision
            if dep.status():
                parts.append(f"{path} modified")
        elif _output_hash(repo, producer, path) not in (None, dep.hash_info.value):
            parts.append(f"{path} modified")
    for out in stage.outs:
        if not out.use_cache and out.status():  # metrics and plots files live in git
            parts.append(f"output {out.def_path} modified")
    return ", ".join(parts) or None


def _output_hash(repo, out, path: str):
    """The md5 the producing stage's dvc.lock entry records for `path` (its output, or a file inside it)."""
    if str(out.def_path) == path:
        return out.hash_info.value
    from dvc_data.hashfile.tree import Tree

    try:  # a file inside a directory output: its entry in the directory's listing, if this cache has it
        tree = Tree.load(repo.cache.local, out.hash_info)
        _, info = tree.get(tuple(Path(path).relative_to(out.def_path).parts))
        return info.value if info else None
    except Exception:  # listing not in this clone's cache: nothing to compare with
        return None


def _read_at(repo, name: str) -> dict:
    path = repo.fs.join(repo.root_dir, name)
    return _parse(repo.fs.read_text(path)) if repo.fs.exists(path) else {}


def at_revision(root: Path, rev: str) -> Freshness | None:
    """Every stage of the commit or experiment `rev` judged by what DVC recorded there."""
    root = Path(root)
    if not _is_project(root):
        return None
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with _quiet(), Repo(str(root), rev=rev) as repo:
            nodes, parents, owners = _graph(repo)
            lock = (_read_at(repo, "dvc.lock").get("stages") or {})
            params = _read_at(repo, "params.yaml")  # the one params file dvc.yaml names
            producers = {str(o.def_path): o for s in nodes.values() for o in s.outs}
            own = {}
            for name, stage in nodes.items():
                if name in lock and (why := _revision_cause(repo, stage, producers, lock[name], params or {})):
                    own[name] = why
    except DvcException:
        return None
    return Freshness(_judge(nodes, parents, own), set(lock) & set(nodes), parents, owners)
