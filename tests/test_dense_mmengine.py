"""mmengine checkpoints under torch's weights-only default (pipeline/dense/mmengine_checkpoints.py).

Each run is a fresh process: the allow-list and the HistoryBuffer pickling are
process-wide, so "before" and "after" must not share one. The runs are forked,
one after another, from one process that imported mmengine and allowed nothing
(`RUN`): each starts as that process was, and mmengine is imported once.
"""
import json
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from conftest import ROOT

RUN = r'''
import json, os, sys, traceback
import torch
from torch import nn
from mmengine.model import BaseModel
from mmengine.runner import Runner


class Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode="tensor"):
        out = self.lin(inputs).squeeze(-1)
        return {"loss": ((out - labels) ** 2).mean()} if mode == "loss" else out


def train(work_dir, mode, iters, resume_from):
    if mode != "plain":
        from pipeline.dense.mmengine_checkpoints import allow_mmengine_checkpoints
        allow_mmengine_checkpoints()
    data = [{"inputs": torch.randn(2), "labels": torch.randn(())} for _ in range(8)]
    runner = Runner(
        model=Toy(), work_dir=work_dir, default_scope="mmengine", log_level="WARNING",
        train_dataloader=dict(dataset=data, batch_size=2, sampler=dict(type="DefaultSampler", shuffle=True),
                              collate_fn=dict(type="default_collate")),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        param_scheduler=dict(type="MultiStepLR", milestones=[2], by_epoch=False),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=4, by_epoch=False)),
        load_from=resume_from, resume=resume_from is not None,
    )
    runner.train()
    print("finished at iter", runner.iter, "with", len(runner.message_hub.get_scalar("train/loss").data[0]), "losses")


for run in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:  # the run's own output to its own files, its status to ours
        code = 1
        with open(run["work_dir"] + ".out", "w") as out, open(run["work_dir"] + ".err", "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                train(run["work_dir"], run["mode"], run["iters"], run["resume_from"])
                code = 0
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    print(run["work_dir"], os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
'''

#: name: (mode, iterations, the run whose 4th-iteration checkpoint it resumes from), in order.
PLAN = {"first": ("patched", 4, None), "second": ("patched", 6, "first"),
        "plain": ("plain", 4, None), "again": ("patched", 6, "plain")}


class Run(NamedTuple):
    work: Path
    returncode: int
    stdout: str
    stderr: str


def _runs(base: Path) -> dict[str, Run]:
    spec = [{"work_dir": str(base / name), "mode": mode, "iters": iters,
             "resume_from": str(base / since / "iter_4.pth") if since else None}
            for name, (mode, iters, since) in PLAN.items()]
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(spec)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    codes = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
    return {name: Run(base / name, int(codes[str(base / name)]), (base / f"{name}.out").read_text(),
                      (base / f"{name}.err").read_text()) for name in PLAN}


def _globals(path) -> set:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_resume_loads_under_weights_only_and_the_original_pickles_stay_refused(tmp_path):
    """One test, so that one worker makes the four runs (`PLAN`) once."""
    from pipeline.dense.mmengine_checkpoints import allow_mmengine_checkpoints, needed_globals

    runs = _runs(tmp_path)
    # Ours: no `getattr` in the pickle, exactly the allowed globals, and a resume with the history.
    first = runs["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = first.work / "iter_4.pth"
    found = _globals(ckpt)
    assert "mmengine.logging.history_buffer HistoryBuffer" in found and "collections Counter" in found
    assert not any("getattr" in g for g in found), found
    allow_mmengine_checkpoints()
    state = torch.load(ckpt, map_location="cpu")  # torch's default: weights_only=True
    assert state["meta"]["iter"] == 4 and "message_hub" in state
    allowed = {f"{g.__module__} {g.__qualname__}" for g in needed_globals()}
    torch_defaults = ("torch ", "torch._utils ", "collections OrderedDict", "_codecs encode")
    assert {g for g in found if not g.startswith(torch_defaults)} <= allowed, "exactly the needed globals"
    resumed = runs["second"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished at iter 6 with 6 losses" in resumed.stdout, "resumed with the message hub's history"

    # mmengine's own pickling (`getattr` of HistoryBuffer's methods) stays refused, here and in a resume.
    plain = runs["plain"]
    assert plain.returncode == 0, plain.stderr[-3000:]
    ckpt = plain.work / "iter_4.pth"
    assert any("getattr" in g for g in _globals(ckpt))
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(ckpt, map_location="cpu")
    resumed = runs["again"]
    assert resumed.returncode != 0 and "getattr" in resumed.stderr


def test_reading_a_backbone_checkpoint_keeps_the_mmengine_allow_list(tmp_path):
    from iformer.dense.backbone import read_checkpoint
    from pipeline.dense.mmengine_checkpoints import allow_mmengine_checkpoints, needed_globals

    allow_mmengine_checkpoints()
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "official.pth")
    read_checkpoint(tmp_path / "official.pth")
    assert set(needed_globals()) <= set(torch.serialization.get_safe_globals())
