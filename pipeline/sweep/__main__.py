"""`python -m pipeline.sweep [--params FILE]`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .. import layout, lifecycle, tracking
from ..config import load_config
from ..errors import PipelineError
from .search import STAGE, check, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.sweep")
    ap.add_argument("--params", type=Path, default=None, help="params file (default: params.yaml at the repo root)")
    args = ap.parse_args(argv)
    lifecycle.install()
    tracking.configure_environment()
    logging.basicConfig(level=logging.INFO, format=f"[{STAGE}] %(message)s", stream=sys.stderr)
    root = layout.repo_root()
    try:
        cfg = load_config(args.params or root / "params.yaml")
        tracking.check_reachable(tracking.tracking_uri(cfg, root))
        run(cfg, root, check(cfg, root))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        why, status = lifecycle.stop_reason()
        print(f"error: {STAGE}: interrupted ({why})", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
