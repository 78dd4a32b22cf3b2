"""What every stage entry point shares: arguments, config, errors, tracking.

A stage is two functions from `pipeline/`: `check(cfg, root)` validates every
input it will read and returns them (no MLflow run, no Ray yet), and
`run(cfg, root, inputs, stage_run)` does the work inside the stage's MLflow child
run. A stage that resumes interrupted work (a Ray run's checkpoints) also
names, with `reopen(cfg, root, inputs)`, the MLflow run of the interrupted
attempt, which then continues instead of a new child run (`tracking.stage_run`).
Bad input becomes one `error: ...` line and exit status 2; a stage stopped by a
signal or by the death of its `dvc` (see `lifecycle`) ends its MLflow runs as
KILLED, says so in one line and exits 128 + the signal number.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from . import layout, lifecycle, tracking
from .config import Config, load_config
from .errors import PipelineError

Check = Callable[[Config, Path], Any]
Run = Callable[[Config, Path, Any, "tracking.StageRun"], None]
Reopen = Callable[[Config, Path, Any], "str | None"]


def main(stage: str, check: Check, run: Run, argv: list[str] | None = None, reopen: Reopen | None = None) -> int:
    def body(cfg: Config, root: Path) -> None:
        inputs = check(cfg, root)
        earlier = reopen(cfg, root, inputs) if reopen else None
        with tracking.stage_run(cfg, stage, root, reopen=earlier) as srun:
            run(cfg, root, inputs, srun)

    return entry(f"python -m stages.{stage}", stage, body, argv, interrupted_hint=(
        "nothing was recorded as finished, and a rerun picks up from the last checkpoint"))


def entry(prog: str, name: str, body: Callable[[Config, Path], None], argv: list[str] | None = None,
          interrupted_hint: str = "") -> int:
    """A pipeline command's start-up and exits around `body(cfg, root)`: stages and sweeps alike.

    `--params`, signal handling and the parent watchdog, the tracking
    environment, `[name]` log lines, the params file loaded (with the `dvc exp
    run` hint), the tracking server checked; then one `error:` line and exit 2
    for bad input, or exit 128 + n when interrupted.
    """
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml at the repo root)")
    args = ap.parse_args(argv)
    lifecycle.install()
    tracking.configure_environment()
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    root = layout.repo_root()
    try:
        cfg = _load(args.params or root / "params.yaml")
        tracking.check_reachable(tracking.tracking_uri(cfg, root))
        body(cfg, root)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or lifecycle.Interrupted for SIGTERM/SIGHUP/parent gone
        why, status = lifecycle.stop_reason()
        print(f"error: {name}: interrupted ({why})" + (f"; {interrupted_hint}" if interrupted_hint else ""),
              file=sys.stderr)
        return status
    return 0


def _load(path) -> Config:
    try:
        return load_config(path)
    except PipelineError as err:
        if tracking.dvc_experiment():
            # `dvc exp run -S` writes its values into the workspace's params
            # file before the stage runs, and leaves them there when it fails.
            raise PipelineError(f"{err} (`dvc exp run -S` left this value in {Path(path).name}; "
                                f"restore it with `git checkout -- {Path(path).name}`)") from None
        raise


def exit_with(stage: str, check: Check, run: Run, reopen: Reopen | None = None) -> None:
    sys.exit(main(stage, check, run, reopen=reopen))
