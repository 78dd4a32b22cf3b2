"""A stage's outputs: replaced all at once when it succeeds, untouched when it fails.

`dvc.yaml` marks every output `persist: true`, so DVC no longer deletes a
stage's outputs before running it (a param the stage refuses, or a Ctrl-C, used
to leave none, and the metrics files, `cache: false`, could not be checked out again).
In exchange each stage replaces its own: it writes into `artifacts/<stage>.tmp/`
(its manifest last) and `<file>.tmp` for each metrics or plots file, and
`commit()`, its last step, moves them in place with stop signals held (a
Ctrl-C lands before or after, never half-way), dropping whatever the previous
run left that this one did not write. Until then `dvc status` lists the stage
as changed and `dvc.lock` keeps the previous run's record.

`after_failure(stage, root)` is the phrase a failed stage's `error:` line
ends with: that the outputs `dvc.lock` records are all there, or which are
missing and the command that brings them back.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import yaml

from ..errors import PipelineError
from . import integrity, layout, lifecycle


class Outputs:
    """Where a running stage writes; nothing it writes is visible before `commit()`."""

    def __init__(self, stage: str, root: Path):
        self.stage, self.root = stage, root
        self.final = layout.stage_dir(stage, root)
        self.dir = self.final.with_name(self.final.name + ".tmp")
        self._files: dict[Path, Path] = {}  # final path -> where it is written until commit

    @classmethod
    def begin(cls, stage: str, root: Path) -> "Outputs":
        """An empty `artifacts/<stage>.tmp/` (a killed run's leftovers removed)."""
        out = cls(stage, root)
        out.discard()
        out.dir.mkdir(parents=True)
        _begun.append(out)
        return out

    def file(self, final: Path) -> Path:
        """Where to write the metrics or plots file `final` until `commit()`."""
        final.parent.mkdir(parents=True, exist_ok=True)
        self._files[final] = final.with_name(final.name + ".tmp")
        return self._files[final]

    def metrics(self, values: dict) -> Path:
        """Write the stage's DVC metrics file (`metrics/<stage>.json`), swapped in by `commit()`; returns where.

        A NaN or infinite value in it is a `PipelineError` (the stage fails, nothing is recorded as finished).
        """
        integrity.finite(values, self.stage)  # a NaN is an error, never a result
        path = self.file(layout.metrics_path(self.stage, self.root))
        path.write_text(json.dumps(values, indent=2) + "\n")
        return path

    def manifest(self, srun, **fields) -> Path:
        """The stage's manifest (`srun`: its `tracking.runs.StageRun`), last of its files (it says the stage finished)."""
        return write_manifest(self.stage, self.root, srun, directory=self.dir, **fields)

    def commit(self) -> None:
        """Move every output in place; the previous ones (and files this run did not write) go.

        Not after a stop signal, even one a library swallowed (coremltools' bare `except:`).
        """
        lifecycle.raise_if_stopping()
        old = self.final.with_name(self.final.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        with lifecycle.held():
            for final, tmp in self._files.items():
                tmp.replace(final)
            if self.final.exists():
                self.final.rename(old)
            self.dir.rename(self.final)
            _committed.add(self.stage)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for tmp in self._files.values():
            tmp.unlink(missing_ok=True)


_begun: list[Outputs] = []
_committed: set[str] = set()  # stages whose outputs this process replaced


def discard_uncommitted() -> None:
    """Remove what this process's stage wrote aside and did not commit (it failed or was stopped)."""
    while _begun:
        _begun.pop().discard()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def after_failure(stage: str, root: Path) -> str:
    """`<stage>'s previous outputs are kept`, or which recorded outputs are missing and how to restore them."""
    if stage in _committed:  # it failed after replacing them: they are this run's, dvc.lock does not say so
        return ""
    try:
        entry = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {}).get(stage)
        declared = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}).get(stage) or {}
    except (OSError, yaml.YAMLError):
        return ""
    if not entry:  # never run through DVC: nothing recorded to keep
        return ""
    uncached = {path for kind in ("outs", "metrics", "plots") for item in declared.get(kind) or []
                if isinstance(item, dict) for path, flags in item.items() if (flags or {}).get("cache") is False}
    missing = [o for o in entry.get("outs") or [] if not (root / o["path"]).exists()]
    if not missing:
        return f"{stage}'s previous outputs are kept"
    cached = [o["path"] for o in missing if o["path"] not in uncached]
    steps = [f"dvc checkout {stage}"] if cached else []
    from_git = [o["path"] for o in missing if o["path"] in uncached and _in_head(root, o["path"]) == o.get("md5")]
    steps += [f"git checkout -- {' '.join(from_git)}"] if from_git else []
    lost = [o["path"] for o in missing if o["path"] in uncached and o["path"] not in from_git]
    how = ([f"restore with `{' && '.join(steps)}`"] if steps else []) + (
        [f"`dvc repro {stage}` writes {', '.join(lost)} again"] if lost else [])
    return f"missing since its last recorded run: {', '.join(o['path'] for o in missing)}; {'; '.join(how)}"


def _in_head(root: Path, path: str) -> str | None:
    """md5 of `path` as committed at HEAD (None when git has none)."""
    try:
        out = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return _md5(out.stdout) if out.returncode == 0 else None


def read_stage_manifest(stage: str, root: Path, path: Path | None = None) -> dict | None:
    """`stage`'s manifest (at `path`, default its place under `root`); None when there is none."""
    path = path or layout.manifest_path(stage, root)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path}: unreadable ({type(err).__name__}: {err}); rerun `dvc repro --force {stage}`") \
            from None
    if not isinstance(body, dict):
        raise PipelineError(f"{path}: not a stage manifest (a JSON object); rerun `dvc repro --force {stage}`")
    return body


def write_manifest(stage: str, root: Path, run, /, directory: Path | None = None, **fields) -> Path:
    """Write `artifacts/<stage>/manifest.json` (or into `directory`) last, atomically: it marks the stage done."""
    path = directory / "manifest.json" if directory else layout.manifest_path(stage, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"stage": stage, "mlflow_run_id": run.run_id, "mlflow_parent_run_id": run.parent_run_id,
            "mlflow_tracking_uri": run.tracking_uri, **fields}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path
