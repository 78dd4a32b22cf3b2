"""`python -m pipeline.stage_deps [--write]`: check (or rewrite) the dvc.yaml files' code deps and params.

What each stage depends on is read from its code by `pipeline.core.deps`; this
prints one line per difference from dvc.yaml and exits 1 when there is any.
"""
from __future__ import annotations

import argparse
import sys

from .core import deps, layout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.stage_deps", description=deps.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true",
                    help="rewrite the code deps and params of dvc.yaml and of each opt-in stage's dvc.yaml first")
    args = ap.parse_args(argv)
    root = layout.repo_root()
    if args.write:
        for path in deps.dvc_files(root):
            text = path.read_text()
            new = deps.rewrite(root, text)
            if new != text:
                path.write_text(new)
            name = path.relative_to(root)
            print(f"{name}: {'rewritten' if new != text else 'already as derived'}", file=sys.stderr)
    found = deps.problems(root)
    for line in found:
        print(line, file=sys.stderr)
    hint = "; `python -m pipeline.stage_deps --write` rewrites it" if found and not args.write else ""
    print(f"dvc.yaml: {len(found)} differences from what the stages import and read{hint}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
