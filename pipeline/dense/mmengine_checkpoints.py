"""Let mmengine's checkpoints load under torch's `weights_only=True` default.

mmengine 0.10.7 calls `torch.load` without `weights_only`, which since torch
2.6 means weights-only unpickling; that refuses the few non-tensor objects
mmengine stores beside the weights, so `load_from` and `resume` fail with
"Unsupported global ... HistoryBuffer". Instead of turning weights-only
loading off, `allow_mmengine_checkpoints()` (idempotent, called once per process
before a Runner saves or loads) does two things:

1. It allows exactly the globals mmengine's checkpoints hold: the message
   hub's `HistoryBuffer` logs and the numpy arrays inside them, numpy scalars
   (e.g. the `eta` runtime info), and `collections.Counter` (MultiStepLR's
   milestones).
2. `HistoryBuffer.__getstate__` copies the class-wide registry of statistics
   methods (min/max/mean/current) into every pickle, as references that
   unpickle through `builtins.getattr`. Allowing `getattr` would let a
   checkpoint reach any attribute of any allowed object -- the hole
   weights-only loading exists to close. Those methods are re-registered by
   `HistoryBuffer` itself on unpickling (`_set_default_statistics`), so the
   pickled copy is redundant: our checkpoints are written without it.

Checkpoints written elsewhere with mmengine's original pickling still refuse
to load (naming `getattr`), which is the safe outcome.
"""
from __future__ import annotations

import collections

import numpy as np
import torch


def needed_globals() -> list:
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = np._core.multiarray
    return [
        HistoryBuffer,
        collections.Counter,
        np.ndarray,
        multiarray._reconstruct,  # how numpy arrays pickle
        multiarray.scalar,        # numpy scalars
        np.dtype,
        *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)},
    ]


def _state_without_methods(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "statistics_methods"}


_applied = False


def allow_mmengine_checkpoints() -> None:
    global _applied
    if _applied:
        return
    from mmengine.logging.history_buffer import HistoryBuffer

    HistoryBuffer.__getstate__ = _state_without_methods
    torch.serialization.add_safe_globals(needed_globals())
    _applied = True
