"""`python -m pipeline`: the commands this project adds, one line each.

Each line is the first line of the command module's own docstring (read, not
imported, so the list comes up at once); `python -m pipeline.NAME --help` says more.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

#: The command modules, in the order a user meets them; `pipeline/sweep` runs as its `__main__`.
COMMANDS = ("recipes", "exps", "store", "submit", "sweep", "stage_deps", "deploy.bench")
HERE = Path(__file__).parent


def summary(command: str) -> str:
    """What `python -m pipeline.<command>` does: its docstring's first line, after the usage in backticks."""
    here = HERE.joinpath(*command.split("."))
    path = here / "__main__.py" if here.is_dir() else here.with_suffix(".py")
    first = (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()[0]
    return first.split("`: ", 1)[-1]


def listing() -> str:
    width = max(len(f"python -m pipeline.{c}") for c in COMMANDS)
    lines = ["iformer-pipeline commands (`python -m pipeline.NAME --help` for each):"]
    lines += [f"  {'python -m pipeline.' + c:<{width}}  {summary(c)}" for c in COMMANDS]
    lines += ["Stages: `dvc repro` runs them all; `python -m stages.NAME` runs one by hand (see dvc.yaml).",
              "The measured field (opt-in): `make field` = `dvc repro field/dvc.yaml`.",
              "make targets: pipeline, test, test-fast, exps, report, field, mlflow-ui, bench (see the Makefile)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("-h", "--help"):
        print(f"error: {argv[0]}: not an option of `python -m pipeline`; run a command as "
              "`python -m pipeline.NAME` (listed by `python -m pipeline`)", file=sys.stderr)
        return 2
    sys.stdout.write(listing())
    return 0


if __name__ == "__main__":
    sys.exit(main())
