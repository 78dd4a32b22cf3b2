"""Library chatter goes to a log file, our console lines stay short.

coremltools prints progress bars and version warnings, torch.onnx prints its
steps and the tracer its warnings, some of it from C. `to_log(path)` sends
everything written to stdout and stderr inside the block to `path`.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def to_log(path: Path) -> Iterator[None]:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log, warnings.catch_warnings():
        warnings.simplefilter("default")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
