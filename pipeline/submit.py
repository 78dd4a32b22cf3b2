"""`python -m pipeline.submit`: run a command, or many DVC experiments, on a Ray cluster as jobs.

`python -m pipeline.submit [--address URL] -- CMD...` runs CMD (e.g. `dvc repro`)
as one job (`pipeline.jobs.job`). `python -m pipeline.submit --git-remote URL
--exp [NAME] -S K=V [-S K=V ...] [--exp ...] [--queue] [-- dvc exp run TARGETS]`
runs many experiments at once, one job each (`pipeline.jobs.batch`): each
`--exp` starts one, and the `-S` after it are its `dvc exp run -S` overrides.

Exit status: 0 when the job SUCCEEDED (after its results are unpacked into the
workspace), 1 when it FAILED or was STOPPED by someone else, 2 for bad input
(one `error:` line), 128 + the signal number when Ctrl-C or SIGTERM stopped it
here (the job is stopped first).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core import environment, layout
from .errors import PipelineError, report
from .jobs import batch, job


class _StartExp(argparse.Action):
    """`--exp [NAME]`: a new experiment; the `-S` after it are its overrides."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.exp = [*(namespace.exp or []), (value, [])]


class _AddSet(argparse.Action):
    """`-S K=V`: one override of the latest `--exp` (before any `--exp`: of an unnamed first one)."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.exp = namespace.exp or [(None, [])]
        namespace.exp[-1][1].append(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(prog="python -m pipeline.submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s [--address URL] [--params FILE] -- CMD...\n"
                                       "       %(prog)s [--address URL] (--exp [NAME] -S K=V [-S K=V ...] ... "
                                       "| --queue) --git-remote URL [--no-cache] [-- dvc exp run [TARGETS...]]")
    ap.add_argument("--address", default=None, help="the job server (dashboard) URL; default $RAY_API_SERVER_ADDRESS")
    ap.add_argument("--params", type=Path, default=None,
                    help="params file the single job's CMD reads (default: params.yaml at the repo root); "
                         "not with --exp / --queue")
    ap.add_argument("--exp", action=_StartExp, nargs="?", default=None, metavar="NAME",
                    help="start one experiment, named NAME (default: DVC's name generator picks one)")
    ap.add_argument("-S", "--set-param", action=_AddSet, metavar="KEY=VALUE", dest="exp", default=None,
                    help="an override of the experiment started by the last --exp, as `dvc exp run -S` "
                         "takes it (Hydra syntax; repeatable)")
    ap.add_argument("--queue", action="store_true", help="also every entry of the local DVC queue")
    ap.add_argument("--git-remote", default=None,
                    help="git remote (name or URL) the jobs push experiments to; default $IFORMER_GIT_REMOTE")
    ap.add_argument("--no-cache", action="store_true",
                    help="bring experiments back without their cached outputs, even with a default DVC remote")
    args = ap.parse_args(argv[:split])
    command = argv[split + 1:]
    environment.configure_environment()
    try:
        if args.exp or args.queue:
            return batch.submit_all(layout.repo_root(), args, command)
        if args.git_remote or args.no_cache:
            raise PipelineError("--git-remote / --no-cache: only for experiments (--exp, --queue)")
        if not command:
            raise PipelineError("nothing to run after `--` (for example `-- dvc repro`), and no --exp / --queue")
        return job.submit(layout.repo_root(), command, args.address, args.params)
    except PipelineError as err:
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
