"""What every stage entry point shares: arguments, config, errors, tracking.

A stage is two functions from `pipeline/` (its `Work`, which `stages/NAME.py`
imports once the params have loaded): `check(cfg, root)` validates every
input it will read and returns them (no MLflow run, no Ray yet), and
`run(cfg, root, inputs, stage_run)` does the work inside the stage's MLflow child
run. A stage that resumes interrupted work (a Ray run's checkpoints) also
names, with `reopen(cfg, root, inputs)`, the MLflow run of the interrupted
attempt, which then continues instead of a new child run (`tracking.runs.stage_run`).
Bad input becomes one `error: ...` line and exit status 2; a stage stopped by a
signal or by the death of its `dvc` (see `lifecycle`) ends its MLflow runs as
KILLED, says so in one line and exits 128 + the signal number. A stage's
outputs change only when it succeeds (`outputs`): the error line ends by saying
they are kept, or which are missing and how to restore them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import Config, load_config
from .core import environment, layout, lifecycle, outputs
from .errors import PipelineError, report
from .tracking import invocation, runs, store

Check = Callable[[Config, Path], Any]
Run = Callable[[Config, Path, Any, "runs.StageRun"], None]
Reopen = Callable[[Config, Path, Any], "str | None"]


@dataclass(frozen=True)
class Work:
    """A stage's `check` and `run`, and `reopen` for one that resumes interrupted work."""
    check: Check
    run: Run
    reopen: Reopen | None = None


def main(stage: str, load: Callable[[], Work], argv: list[str] | None = None) -> int:
    """Run `stage`; `load` imports its modules and returns its `Work`. It is called once the params
    and the tracking store are known good, so a bad value is refused before torch, timm or mmdet
    are imported (0.3 s rather than 2-4 s)."""
    work: Work | None = None

    def body(cfg: Config, root: Path) -> None:
        nonlocal work
        work = load()
        inputs = work.check(cfg, root)
        earlier = work.reopen(cfg, root, inputs) if work.reopen else None
        try:
            with runs.stage_run(cfg, stage, root, reopen=earlier) as srun:
                work.run(cfg, root, inputs, srun)
        finally:
            outputs.discard_uncommitted()

    def hint() -> str:
        if work is None:  # stopped before the stage's own code started
            return "nothing was recorded as finished"
        # Only a stage that names its interrupted run (`reopen`) has checkpoints to resume from.
        return "nothing was recorded as finished, and a rerun " + (
            "picks up from the last checkpoint" if work.reopen else f"does {stage} again from the start")

    return entry(f"python -m stages.{stage}", stage, body, argv, interrupted_hint=hint,
                 after_failure=lambda root: outputs.after_failure(stage, root),
                 description=_main_doc(f"stages.{stage}"))


def entry(prog: str, name: str, body: Callable[[Config, Path], None], argv: list[str] | None = None,
          interrupted_hint: Callable[[], str] = lambda: "", after_failure: Callable[[Path], str] = lambda root: "",
          description: str | None = None) -> int:
    """A pipeline command's start-up and exits around `body(cfg, root)`: stages and sweeps alike.

    `--params`, signal handling and the parent watchdog, the tracking
    environment, `[name]` log lines, the params file loaded (with the `dvc exp
    run` hint), the tracking server checked; then one `error:` line (ending
    with `after_failure(root)`) and exit 2 for bad input, or exit 128 + n when
    interrupted. The repo root is found from any folder inside it (`layout.repo_root`).
    """
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml at the repo root)")
    args = ap.parse_args(argv)
    lifecycle.install()
    environment.configure_environment()
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    try:
        root = layout.repo_root()
    except PipelineError as err:
        return report(err)
    try:
        cfg = _load(args.params or root / "params.yaml")
        uri = runs.tracking_uri(cfg, root)
        store.check_reachable(uri)
        lost = store.lost_store(root, uri)
        if lost:
            logging.getLogger(__name__).warning(lost)
        store.wait_writable(uri, cfg.mlflow.lock_wait_s)
        body(cfg, root)
    except PipelineError as err:
        return report(err, _then(after_failure, root))
    except Exception as err:
        if not store.locked(err):
            raise
        return report(PipelineError(f"mlflow: the tracking store was locked by another process while {name} ran, "
                                    "longer than sqlite waits; it stopped (a run it could not close, the next "
                                    "stage closes)"), _then(after_failure, root))
    except KeyboardInterrupt:  # Ctrl-C, or lifecycle.Interrupted for SIGTERM/SIGHUP/parent gone
        why, status = lifecycle.stop_reason()
        said = interrupted_hint()
        print(f"error: {name}: interrupted ({why})" + (f"; {said}" if said else "")
              + _then(after_failure, root), file=sys.stderr)
        return status
    return 0


def _main_doc(module: str) -> str | None:
    """The docstring of the script running as `python -m <module>` (a stage's one line), else None."""
    main_mod = sys.modules.get("__main__")
    spec = getattr(main_mod, "__spec__", None)
    return main_mod.__doc__ if spec is not None and spec.name == module else None


def _then(after_failure: Callable[[Path], str], root: Path) -> str:
    """`; <what happened to the outputs>` for an error line (empty when there is nothing to say)."""
    try:
        said = after_failure(root)
    except Exception:  # an error line must come out whatever state the repo is in
        said = ""
    return f"; {said}" if said else ""


def _load(path) -> Config:
    try:
        return load_config(path)
    except PipelineError as err:
        if invocation.dvc_experiment():
            # `dvc exp run -S` writes its values into the workspace's params
            # file before the stage runs, and leaves them there when it fails.
            raise PipelineError(f"{err} (`dvc exp run -S` left this value in {Path(path).name}; "
                                f"restore it with `git checkout -- {Path(path).name}`)") from None
        raise


def exit_with(stage: str, load: Callable[[], Work]) -> None:
    code = main(stage, load)  # an unforeseen exception still ends with its traceback
    if _started_as(f"stages.{stage}"):  # the process is this stage's: it may skip Python's teardown
        lifecycle.exit_now(code)
    sys.exit(code)


def _started_as(module: str) -> bool:
    """This process was started as `python [options] -m module` (not a module run inside another program)."""
    argv = getattr(sys, "orig_argv", [])
    return any(arg == "-m" and argv[i + 1:i + 2] == [module] for i, arg in enumerate(argv))
