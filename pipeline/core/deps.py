"""What each DVC stage depends on, read from its code: `dvc.yaml`'s code deps and params.

Code: `python -m stages.NAME` runs the project modules that `stages/NAME.py`
imports, transitively: every `import` statement (inside functions too),
absolute and relative, `from pkg import name` where `name` is a submodule, and
the packages above each module (their `__init__` runs first). Modules in
`PLUMBING` are not followed, nor what they import: they decide how a stage
runs, is logged or fails, not what it writes. A package `__init__.py` holding
only a docstring, imports and `__all__` is followed but not listed; a package
directory whose every module the stage runs is listed as the directory.

Params: the params.yaml keys read as `cfg.<section>.<key>...` in those modules
(a chain that stops at a section, `ecfg = cfg.export`, reads all of it), less
`PLUMBING_PARAMS`, listed as the fewest keys that cover them (a section when
every key of it is read). A `Config` property (`cfg.lr`) reads what its body
reads, and makes the file defining `Config` code the stage depends on. Methods
(`cfg.to_dict()`, sent to Ray workers) read nothing: the workers' reads are scanned.

`problems` says how dvc.yaml differs (`python -m pipeline.stage_deps` prints
it); `rewrite` writes each stage's code deps and params in place, keeping its
other deps (artifacts, weights), outs and the file's comments. `imports` is the
import follower the architecture test shares.
"""
from __future__ import annotations

import ast
import functools
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import layout


#: Modules (a package: all of it) that shape no stage output, with why.
PLUMBING = {
    "pipeline.stage": "the entry point: arguments, config loading, exit codes around check/run",
    "pipeline.config": "validates params.yaml; the values it checks are tracked as params",
    "pipeline.errors": "the exception a rejected input becomes",
    "pipeline.core.console": "what reaches the terminal, and which log file library chatter goes to",
    "pipeline.core.environment": "the tools' telemetry and log levels",
    "pipeline.core.lifecycle": "signals, the parent watchdog and locks: when a stage stops, not what it computes",
    "pipeline.core.layout": "where outputs live; dvc.yaml names the same paths itself",
    "pipeline.tracking.runs": "MLflow runs, tags and headline metrics",
    "pipeline.tracking.metrics": "metrics logged to the MLflow run",
    "pipeline.tracking.invocation": "which dvc process runs the stage (the MLflow run's identity)",
    "pipeline.tracking.store": "the MLflow store's artifact paths after the repo moves",
    "pipeline.tracking.registry": "MLflow Model Registry versions and their tags",
    "pipeline.compute.rendezvous": "the interface torch's rendezvous store listens on",
    "pipeline.compute.renice": "the CPU priority of the local Ray's daemons",
    "pipeline.compute.scaling": "which actors Ray Train starts on a private Ray, not what the workers compute",
}
#: params.yaml keys that shape no stage output, with why.
PLUMBING_PARAMS = {
    "mlflow": "where runs are recorded, and whether the model is also logged there",
    "ray.address": "which Ray cluster runs the work",
    "ray.connect_timeout_s": "how long to wait for that cluster to answer",
    "ray.storage_path": "where Ray keeps resume checkpoints and logs",
    "ray.local_num_cpus": "how many CPUs the private local Ray offers (scheduling, not results)",
    "ray.local_daemon_niceness": "the CPU priority of the local Ray's daemons",
    "ray.poll_interval_s": "how soon Ray Train notices a worker's progress (timing, not results)",
    "ray.max_failures": "how often Ray restarts failed workers from their last checkpoint",
    "ray.prune_checkpoints": "whether resume checkpoints are kept after success",
    "train.checkpoints_to_keep": "how many resume checkpoints Ray keeps",
    "train.log_every_batches": "how often training prints a progress line",
}

#: Stages that pick their params section at run time (`getattr(cfg, task)`): the section they read.
#: The dense modules serve both tasks; a stage reads its own task's section, never the other's.
TASK_SECTIONS = {"finetune_coco": "detection", "finetune_ade20k": "segmentation"}

CONFIG_NAME = "cfg"  # the name every module gives the Config
DYNAMIC = ("*",)  # a section chosen at run time


@dataclass
class StageDeps:
    code: list[str]  # paths, the entry module first
    params: list[str]  # dotted params.yaml keys, in params.yaml's order
    why: dict[str, str] = field(default_factory=dict)  # code path -> why the stage runs it
    reader: dict[tuple, str] = field(default_factory=dict)  # params leaf -> the first module reading it
    unresolved: list[str] = field(default_factory=list)  # run-time sections with no TASK_SECTIONS entry


def cached(fn):
    """`fn(path, ...)`, computed once per version (modification time) of the file."""
    memo = functools.lru_cache(maxsize=None)(lambda path, mtime_ns, *args: fn(path, *args))
    return functools.wraps(fn)(lambda path, *args: memo(path, path.stat().st_mtime_ns, *args))


@cached
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


# -- code -----------------------------------------------------------------------------------------
def module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)


def plumbing(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PLUMBING)


@cached
def imports(path: Path, root: Path, name: str) -> frozenset[str]:
    """The project modules module `name` (at `path`) imports anywhere, the packages above them included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.update([base, *(f"{base}.{a.name}" for a in node.names)])
    prefixes = {".".join(d.split(".")[:i]) for d in found for i in range(1, d.count(".") + 2)}
    return frozenset(m for m in prefixes if m != name and module_file(root, m))


def closure(root: Path, entry: str) -> dict[str, str | None]:
    """Every module `entry` runs, outside `PLUMBING`, mapped to the first module seen importing it."""
    seen: dict[str, str | None] = {entry: None}
    todo = [entry]
    while todo:
        name = todo.pop(0)
        for dep in sorted(imports(module_file(root, name), root, name)):
            if dep not in seen and not plumbing(dep):
                seen[dep] = name
                todo.append(dep)
    return seen


def trivial_init(path: Path) -> bool:
    """A package `__init__` that only documents and re-exports: nothing in it shapes an output."""
    def inert(s: ast.stmt) -> bool:
        if isinstance(s, ast.Assign):
            return [ast.unparse(t) for t in s.targets] == ["__all__"]
        docstring = isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
        return docstring or isinstance(s, (ast.Import, ast.ImportFrom))

    return path.name == "__init__.py" and all(inert(s) for s in parsed(path).body)


def code_paths(root: Path, files: list[Path]) -> list[str]:
    """`files` as dvc.yaml deps (whole package directories where all of one runs), the first file first."""
    ran = set(files)
    dirs = {f.parent for f in files if f.name == "__init__.py"}
    whole = {d for d in dirs if all(f in ran for f in d.rglob("*.py") if "__pycache__" not in f.parts)}
    whole = {d for d in whole if not any(p in whole for p in d.parents)}
    listed = []
    for f in files:
        d = next((d for d in whole if f.is_relative_to(d)), None)
        entry = rel(root, d) if d else (None if trivial_init(f) else rel(root, f))
        if entry and entry not in listed:
            listed.append(entry)
    return listed[:1] + sorted(listed[1:])


# -- params ---------------------------------------------------------------------------------------
def chains(tree: ast.AST, name: str):
    """(attribute names, line) of each outermost `name.a.b...` chain; `getattr(name, x)` with x not a
    string literal starts with `DYNAMIC`."""
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if id(node) in inner or not isinstance(node, (ast.Attribute, ast.Call)):
            continue
        attrs, base = [], node
        while isinstance(base, ast.Attribute):
            attrs.insert(0, base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id == name and attrs:
            yield tuple(attrs), node.lineno
        elif (isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "getattr"
              and len(base.args) >= 2 and isinstance(base.args[0], ast.Name) and base.args[0].id == name):
            key = base.args[1]
            first = (key.value,) if isinstance(key, ast.Constant) and isinstance(key.value, str) else DYNAMIC
            yield first + tuple(attrs), node.lineno


@cached
def config_chains(path: Path) -> list:
    return list(chains(parsed(path), CONFIG_NAME))


def key_of(tree: dict, attrs) -> tuple:
    """The longest prefix of `attrs` (a dotted string or names) that is a params.yaml key; () if none."""
    node, key = tree, ()
    for a in attrs.split(".") if isinstance(attrs, str) else attrs:
        if not (isinstance(node, dict) and a in node):
            break
        key, node = key + (a,), node[a]
    return key


def leaves(tree: dict, key: tuple) -> list[tuple]:
    node = tree
    for k in key:
        node = node[k]
    return [leaf for k in node for leaf in leaves(tree, key + (k,))] if isinstance(node, dict) and node else [key]


def cover(tree: dict, wanted: set[tuple]) -> list[str]:
    """The fewest dotted keys whose leaves are exactly `wanted` (a whole section where it can)."""
    def walk(node, key):
        if key and all(leaf in wanted for leaf in leaves(tree, key)):
            return [".".join(key)]
        return [d for k, v in node.items() for d in walk(v, key + (k,))] if isinstance(node, dict) else []

    return walk(tree, ())


def config_properties(root: Path, tree: dict) -> tuple[Path | None, dict[str, list[tuple]]]:
    """The file defining `Config`, and the params keys each of its properties reads through `self`."""
    for package in (p for p in sorted(root.iterdir()) if (p / "__init__.py").is_file()):
        for path in sorted(package.rglob("*.py")):
            for cls in ast.walk(parsed(path)):
                if isinstance(cls, ast.ClassDef) and cls.name == "Config":
                    props = [f for f in cls.body if isinstance(f, ast.FunctionDef)
                             and any(isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list)]
                    return path, {f.name: [k for c, _ in chains(f, "self") if (k := key_of(tree, c))] for f in props}
    return None, {}


def params_read(root: Path, stage: str, files: list[Path], tree: dict, config, deps: StageDeps) -> list[Path]:
    """Fill in `deps.params`; returns [the file defining `Config`] when the stage reads one of its properties."""
    config_file, properties = config
    own = TASK_SECTIONS.get(stage)
    dropped = {leaf for p in [*PLUMBING_PARAMS, *(set(TASK_SECTIONS.values()) - {own} if own else ())]
               if (key := key_of(tree, p)) == tuple(p.split(".")) for leaf in leaves(tree, key)}
    wanted: dict[tuple, str] = {}
    used: list[Path] = []
    for path in files:
        for chain, line in config_chains(path):
            if chain[0] in properties and chain[0] not in tree:
                keys = properties[chain[0]]
                if not used:
                    used.append(config_file)
                    deps.why[rel(root, config_file)] = f"defines cfg.{chain[0]}, read in {rel(root, path)}"
            elif chain[:1] == DYNAMIC and own is None:
                keys = []
                deps.unresolved.append(f"{rel(root, path)}:{line}")
            else:
                keys = [(own,) if chain[:1] == DYNAMIC else key_of(tree, chain)]
            for leaf in (leaf for key in keys if key for leaf in leaves(tree, key)):
                if leaf not in dropped:
                    wanted.setdefault(leaf, rel(root, path))
    deps.params, deps.reader = cover(tree, set(wanted)), wanted
    return used


def derive(root: Path, stages: dict) -> dict[str, StageDeps]:
    """Each stage whose command runs a project module (`python -m NAME`): what it runs and reads."""
    tree = yaml.safe_load((root / "params.yaml").read_text()) or {}
    config = config_properties(root, tree)
    out = {}
    for stage, spec in stages.items():
        entry = re.search(r"python\S*\s+-m\s+([\w.]+)", spec.get("cmd", ""))
        if not (entry and module_file(root, entry.group(1))):
            continue
        seen = closure(root, entry.group(1))
        files = [module_file(root, m) for m in seen]
        deps = StageDeps([], [])
        deps.why = {rel(root, f): f"imported by {rel(root, module_file(root, by))}" if by else f"`{spec['cmd']}`"
                    for f, by in zip(files, seen.values())}
        extra = params_read(root, stage, files, tree, config, deps)
        deps.code = code_paths(root, files + extra)
        out[stage] = deps
    return out


# -- dvc.yaml -------------------------------------------------------------------------------------
def is_code(root: Path, dep: str) -> bool:
    """A dvc.yaml dep that is project code (it may no longer exist: a module moved)."""
    return dep.endswith(".py") or (root / dep.split("/")[0] / "__init__.py").is_file()


def dvc_files(root: Path) -> list[Path]:
    """dvc.yaml, then each opt-in stage's own (`field/dvc.yaml`: paths relative to the root, `wdir: ..`)."""
    return [root / "dvc.yaml"] + [p for p in (root / extra / "dvc.yaml" for extra in layout.OPTIONAL_STAGES)
                                  if p.is_file()]


def problems(root: Path, text: str | None = None) -> list[str]:
    """How the dvc.yaml files (or `text`, one dvc.yaml) differ from what each stage imports and reads; [] when
    they agree."""
    files = [text] if text is not None else [path.read_text() for path in dvc_files(root)]
    stages = {name: spec for doc in files for name, spec in yaml.safe_load(doc)["stages"].items()}
    tree = yaml.safe_load((root / "params.yaml").read_text()) or {}
    dotted = lambda key: tuple(key.split("."))  # noqa: E731
    out = [f"core.deps.PLUMBING names {m}, which is no module here" for m in PLUMBING if not module_file(root, m)]
    out += [f"core.deps.PLUMBING_PARAMS names {p}, which params.yaml lacks" for p in PLUMBING_PARAMS
            if key_of(tree, p) != dotted(p)]
    out += [f"core.deps.TASK_SECTIONS names stage {s}, which dvc.yaml lacks" for s in TASK_SECTIONS if s not in stages]
    for stage, deps in derive(root, stages).items():
        spec = stages[stage]
        listed = [d for d in spec.get("deps", []) if is_code(root, d)]
        out += [f"{stage}: deps miss {p} ({deps.why.get(p, 'every module in it runs')})"
                for p in deps.code if p not in listed]
        out += [f"{stage}: deps list {p}, which `{spec['cmd']}` does not run (or not all of it)"
                for p in listed if p not in deps.code]
        out += [f"{stage}: {where} reads getattr(cfg, ...), a section chosen at run time; name it in "
                "core.deps.TASK_SECTIONS" for where in deps.unresolved]
        named = [p for p in spec.get("params", []) if isinstance(p, str)]
        out += [f"{stage}: params list {p}, which params.yaml lacks" for p in named if key_of(tree, p) != dotted(p)]
        have = {leaf for p in named if key_of(tree, p) == dotted(p) for leaf in leaves(tree, dotted(p))}
        need = {leaf for p in deps.params for leaf in leaves(tree, dotted(p))}
        out += [f"{stage}: params miss {p} (read in {deps.reader[leaves(tree, dotted(p))[0]]})"
                for p in cover(tree, need - have)]
        out += [f"{stage}: params list {p}, which the stage does not read" for p in cover(tree, have - need)]
    return out


def rewrite(root: Path, text: str) -> str:
    """`text` (a dvc.yaml) with every stage's code deps and params derived, the rest kept as written."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    rt = YAML()
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(text)
    for stage, deps in derive(root, yaml.safe_load(text)["stages"]).items():
        spec = doc["stages"][stage]
        for key, new in (("deps", deps.code + [d for d in spec.get("deps", []) if not is_code(root, d)]),
                         ("params", deps.params + [p for p in spec.get("params", []) if not isinstance(p, str)])):
            if key not in spec:
                spec.insert(list(spec).index("deps") + 1 if key == "params" else 1, key, CommentedSeq())
            if list(spec[key]) != new:
                del spec[key][:]
                spec[key].extend(new)
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()
