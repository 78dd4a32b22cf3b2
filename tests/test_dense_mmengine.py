"""mmengine checkpoints under torch's weights-only default (pipeline/dense/mmengine_checkpoints.py).

Each run is a fresh process: the allow-list and the HistoryBuffer pickling are
process-wide, so "before" and "after" must not share one.
"""
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import ROOT

RUN = r'''
import sys
import torch
from torch import nn
from mmengine.model import BaseModel
from mmengine.runner import Runner

work_dir, mode, iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode != "plain":
    from pipeline.dense.mmengine_checkpoints import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()


class Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode="tensor"):
        out = self.lin(inputs).squeeze(-1)
        return {"loss": ((out - labels) ** 2).mean()} if mode == "loss" else out


data = [{"inputs": torch.randn(2), "labels": torch.randn(())} for _ in range(8)]
runner = Runner(
    model=Toy(), work_dir=work_dir, default_scope="mmengine", log_level="WARNING",
    train_dataloader=dict(dataset=data, batch_size=2, sampler=dict(type="DefaultSampler", shuffle=True),
                          collate_fn=dict(type="default_collate")),
    optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
    train_cfg=dict(by_epoch=False, max_iters=iters),
    param_scheduler=dict(type="MultiStepLR", milestones=[2], by_epoch=False),
    default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=4, by_epoch=False)),
    load_from=sys.argv[4] if len(sys.argv) > 4 else None, resume=len(sys.argv) > 4,
)
runner.train()
print("finished at iter", runner.iter, "with", len(runner.message_hub.get_scalar("train/loss").data[0]), "losses")
'''


def _run(tmp_path, name, mode, iters, resume_from=None):
    work = tmp_path / name
    cmd = [sys.executable, "-c", RUN, str(work), mode, str(iters)] + ([str(resume_from)] if resume_from else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return work, out


def _globals(path) -> set:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_resume_loads_under_weights_only_and_allows_no_getattr(tmp_path):
    work, out = _run(tmp_path, "first", "patched", 4)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = work / "iter_4.pth"
    found = _globals(ckpt)
    assert "mmengine.logging.history_buffer HistoryBuffer" in found and "collections Counter" in found
    assert not any("getattr" in g for g in found), found

    from pipeline.dense.mmengine_checkpoints import allow_mmengine_checkpoints, needed_globals

    allow_mmengine_checkpoints()
    state = torch.load(ckpt, map_location="cpu")  # torch's default: weights_only=True
    assert state["meta"]["iter"] == 4 and "message_hub" in state
    allowed = {f"{g.__module__} {g.__qualname__}" for g in needed_globals()}
    torch_defaults = ("torch ", "torch._utils ", "collections OrderedDict", "_codecs encode")
    assert {g for g in found if not g.startswith(torch_defaults)} <= allowed, "exactly the needed globals"

    _, resumed = _run(tmp_path, "second", "patched", 6, resume_from=ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished at iter 6 with 6 losses" in resumed.stdout, "resumed with the message hub's history"


def test_checkpoints_pickled_the_original_way_stay_refused(tmp_path):
    work, out = _run(tmp_path, "plain", "plain", 4)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = work / "iter_4.pth"
    assert any("getattr" in g for g in _globals(ckpt))

    from pipeline.dense.mmengine_checkpoints import allow_mmengine_checkpoints

    allow_mmengine_checkpoints()
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(ckpt, map_location="cpu")
    _, resumed = _run(tmp_path, "again", "patched", 6, resume_from=ckpt)
    assert resumed.returncode != 0 and "getattr" in resumed.stderr


def test_reading_a_backbone_checkpoint_keeps_the_mmengine_allow_list(tmp_path):
    from iformer.dense.backbone import read_checkpoint
    from pipeline.dense.mmengine_checkpoints import allow_mmengine_checkpoints, needed_globals

    allow_mmengine_checkpoints()
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "official.pth")
    read_checkpoint(tmp_path / "official.pth")
    assert set(needed_globals()) <= set(torch.serialization.get_safe_globals())
