"""`python -m pipeline.sweep [--params FILE]`."""
from __future__ import annotations

import sys

from ..stage import entry
from .search import STAGE, check, run


def main(argv: list[str] | None = None) -> int:
    return entry("python -m pipeline.sweep", STAGE, lambda cfg, root: run(cfg, root, check(cfg, root)), argv,
                 interrupted_hint="the sweep's parent run is marked KILLED")


if __name__ == "__main__":
    sys.exit(main())
