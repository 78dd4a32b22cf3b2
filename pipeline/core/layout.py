"""Where each stage keeps its outputs, relative to the repository root.

`dvc.yaml` names the same paths (a test keeps the two in step). Every stage owns
`artifacts/<stage>/` and writes `artifacts/<stage>/manifest.json` last, so a
manifest on disk means the stage finished; it carries the MLflow run id that
produced the outputs, which is how a stage DVC restores from cache is linked
into a later pipeline run. A file a param names must lie in a folder DVC tracks
(`check_inside`; released weights: `weights_path`), so that DVC sees it change.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PipelineError

#: All stages in pipeline order. Later issues insert theirs before "report".
STAGES: tuple[str, ...] = ("prepare", "pretrain", "evaluate", "export", "latency", "prepare_dense",
                           "finetune_coco", "finetune_ade20k", "report")
#: Stages off the default `dvc repro` (their own dvc.yaml in a folder of that name), with no upstream stage.
OPTIONAL_STAGES: tuple[str, ...] = ("field",)


def repo_root() -> Path:
    """The repository root: $IFORMER_ROOT, else the nearest folder holding dvc.yaml, from here up.

    As `git` and `dvc` find theirs, so a command started in a sub-folder works
    on the same repo, params and MLflow store as one started at the root.
    Outside any repo it refuses (a `PipelineError`), rather than starting a
    new store and parent run in whatever folder this is.
    """
    env = os.environ.get("IFORMER_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for cand in (here, *here.parents):
        if (cand / "dvc.yaml").is_file():
            return cand
    raise PipelineError(f"{here}: no dvc.yaml here or in any folder above; run this inside the project "
                        "(any folder of it), or set IFORMER_ROOT to its root")


def state_root(root: Path | None = None) -> Path:
    """Where long-lived tool state lives (MLflow store, Ray checkpoints).

    `dvc exp run --temp` and queued experiments run in a temp copy of the repo;
    DVC then points DVC_ROOT at the real repo, so every experiment lands in the
    same MLflow store and Ray storage.
    """
    env = os.environ.get("DVC_ROOT")
    return Path(env).resolve() if env else (root or repo_root())


def stage_dir(stage: str, root: Path | None = None) -> Path:
    return (root or repo_root()) / "artifacts" / stage


def manifest_path(stage: str, root: Path | None = None) -> Path:
    return stage_dir(stage, root) / "manifest.json"


def metrics_path(stage: str, root: Path | None = None) -> Path:
    return (root or repo_root()) / "metrics" / f"{stage}.json"


def plots_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "plots"


def inside(path: Path, folder: Path) -> bool:
    """`path` names something in `folder` once `..` is resolved.

    A link placed in the folder may point anywhere (linking large files in is how weights/,
    teachers/ and data folders are meant to be filled), but `..` cannot climb out of it,
    through a link or not: a path with `..` must also lie inside once every link is resolved.
    """
    path = Path(path).absolute()
    if not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(Path(folder).absolute())):
        return False
    return ".." not in path.parts or path.resolve().is_relative_to(Path(folder).resolve())


#: Where the official releases are published (the pipeline never downloads weights).
RELEASES_URL = "https://github.com/ChuanyangZheng/iFormer/releases/tag/v0.9"


def weights_path(value, root: Path, what: str = "model.weights") -> Path:
    """`model.weights` as a file, which must lie under `weights/` (a DVC dependency of pretrain)."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    check_inside(path, (root / "weights",), what, "copy or link it into weights/")
    if path.is_dir():
        raise PipelineError(f"{what}: {path} is a directory; name the weights file in it")
    if not path.is_file():
        raise PipelineError(f"{what}: {path} does not exist; put the file (or a link to it) in weights/ "
                            f"(official releases: {RELEASES_URL})")
    return path


def check_inside(path: Path, folders, what: str, hint: str) -> None:
    """`path` must lie in one of `folders` (the DVC dependencies that see it change), `..` resolved
    (`inside`: a link placed in the folder may point anywhere)."""
    if not any(inside(path, d) for d in folders):
        shown = " and ".join(str(d) for d in folders)
        raise PipelineError(f"{what}: {path} is outside {shown}, so DVC would not see it change; {hint}")
