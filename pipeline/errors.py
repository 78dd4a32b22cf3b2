"""The one exception type a command turns into a clear message and a non-zero exit."""
from __future__ import annotations

import sys


class PipelineError(Exception):
    """Bad input or environment: the message names the field or file at fault."""


def report(err: PipelineError, then: str = "") -> int:
    """Print the one `error: ...` line (ending with `then`) for `err`; returns the exit status, 2."""
    print(f"error: {one_line(str(err))}{then}", file=sys.stderr)
    return 2


def one_line(text: str) -> str:
    """`text` on one line: a library's multi-line message (a refused pickle, pydantic, an OSError) joined by `; `."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
