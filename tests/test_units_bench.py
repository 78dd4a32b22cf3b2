"""The benchmarks' own parsing and data plumbing (their figures come from `make bench`, not tests)."""
import pytest

import benchmarks
from benchmarks import cluster, dense, timeline, training
from pipeline.classify.datasets import Prepared


def test_timm_epoch_end_lines_give_each_epochs_average_rate():
    # The format of timm train.py's log line (its f-string, filled in by hand): the last
    # batch of an epoch shows "(100%)", and the second bracket holds the epoch's average.
    lines = """
Train: 0 [   0/22 (  5%)]  Loss: 2.31 (2.31)  Time: 1.234s,   51.86/s  (1.234s,   51.86/s)  LR: 1.000e-06  Data: 0.1 (0.1)
Train: 0 [  21/22 (100%)]  Loss: 2.10 (2.20)  Time: 0.400s,  160.00/s  (0.500s,  128.00/s)  LR: 2.000e-03  Data: 0.1 (0.1)
Train: 1 [  21/22 (100%)]  Loss: 1.10 (1.20)  Time: 0.400s,  160.00/s  (0.450s,  142.22/s)  LR: 1.000e-03  Data: 0.1 (0.1)
"""
    found = {int(m[1]): float(m[2]) for m in training.EPOCH_END.finditer(lines)}
    assert found == {0: 128.00, 1: 142.22}


def test_steady_leaves_the_first_epoch_out():
    rows = [{"img_per_sec": 10.0}, {"img_per_sec": 100.0}, {"img_per_sec": 110.0}]
    assert training.steady(rows) == 105.0 and training.steady(rows[:1]) == 10.0


def test_p6_reads_each_part_over_the_steady_epochs_and_splits_the_two_workers_epoch(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,epoch_seconds,train_seconds,val_seconds,checkpoint_seconds,train_loss\n"
                       "1,30,25,4,0,2.0\n2,20,16,3,1.0,1.5\n3,22,18,3,1.4,1.2\n")
    assert cluster.epoch_parts(history) == {"epoch_seconds": 21.0, "train_seconds": 17.0, "val_seconds": 3.0,
                                            "checkpoint_seconds": 1.2}
    two = {"epoch_seconds": 12.0, "train_seconds": 9.0, "val_seconds": 2.0, "checkpoint_seconds": 1.0}
    one = {"epoch_seconds": 19.0, "train_seconds": 15.0, "val_seconds": 4.0, "checkpoint_seconds": 1.0}
    half = {"epoch_seconds": 20.0, "train_seconds": 14.0, "val_seconds": 4.0, "checkpoint_seconds": 1.0}
    lines = cluster.breakdown(two, one, half)
    # 13 s with the checkpoint against 20 s; steps 9 s of which 7 s compute (14 / 2) and 2 s talk
    assert "13.0 s (1 worker: 20.0 s)" in lines[0]
    assert "computing 7.0 s" in lines[1] and "all-reduce and waiting 2.0 s (15 %)" in lines[1]
    assert "validation 2.0 s (15 %)" in lines[2] and "checkpoint and report 1.0 s (8 %)" in lines[3]
    assert "other 1.0 s (8 %)" in lines[4] and lines[5].endswith("would be 0.55")


def test_the_prepared_digits_become_an_image_folder_of_links(tmp_path):
    prep = tmp_path / "prep"
    (prep / "img").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (prep / "img" / name).write_bytes(b"png")
    (prep / "train.tsv").write_text("img/a.png\t0\nimg/b.png\t3\n")
    (prep / "val.tsv").write_text("img/c.png\t3\n")

    folder = training.image_folder(Prepared(prep, {"root": "."}), tmp_path / "folder")
    links = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert links == ["train/0000/000000.png", "train/0003/000001.png", "val/0003/000000.png"]
    assert (folder / "train/0003/000001.png").resolve() == (prep / "img/b.png").resolve()


def test_dvc_reads_yaml_through_ruamels_c_parser():
    """P5's no-op `dvc repro` parses params.yaml once per stage and dvc.lock several times; setup
    installs ruamel's C parser (optional since ruamel.yaml 0.19), and DVC's reads take it, with
    the YAML 1.2 values DVC writes (`1e-08` a number, `on` a string)."""
    from dvc.utils.serialize import loads_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__module__ == "ruamel.yaml.clib._ruamel_yaml"
    assert loads_yaml("lr: 1e-08\nflag: on\nn: 1_000\n") == {"lr": 1e-08, "flag": "on", "n": 1000}


def test_the_timeline_splits_a_stage_into_phases_that_add_up_to_its_fixed_cost():
    # A stage of 40 s: Ray's first daemon at 5 s, the controller's process at 11, the worker's at 14,
    # its loop ready at 21; 12 s of epochs inside 21..36; the model logged from 36 to 39.5.
    marks = {"start": 0.0, "ray": 5.0, "controller": 11.0, "worker": 14.0, "ready": 21.0, "logging": 36.0,
             "logged": 39.5, "end": 40.0}
    seconds = [s for _, s in timeline.phases(marks, epochs=12.0)]
    assert seconds == [5.0, 6.0, 3.0, 7.0, 3.0, 3.5, 0.5]
    assert sum(seconds) == 40.0 - 12.0  # the stage's wall time minus its epochs
    del marks["controller"]  # a process the watcher never saw: both phases it bounds are unknown
    assert [s for _, s in timeline.phases(marks, epochs=12.0)][1:3] == [None, None]


def test_the_timeline_marks_lines_and_processes_of_a_real_command(tmp_path):
    """A stand-in stage: prints the worker's line after starting a child whose command line holds
    `RayTrainWorker`, the way Ray titles a training worker's process."""
    import sys

    script = (
        "import subprocess, sys, time\n"
        "time.sleep(0.5)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)', 'RayTrainWorker'])\n"
        "time.sleep(0.8)\n"
        "print('[pretrain] rank 0/1 on cpu', flush=True)\n"
        "child.wait()\n")
    code, out, marks = timeline.run([sys.executable, "-c", script], tmp_path, None)
    assert code == 0 and "rank 0/1" in out
    assert 0.4 < marks["worker"] < marks["ready"] < marks["end"], marks
    assert marks["ready"] - marks["worker"] > 0.5 and "controller" not in marks


def test_p9s_short_schedules_are_valid_params_of_the_length_they_claim():
    import copy

    import yaml
    from conftest import ROOT, deep_update

    from pipeline.config import parse_config

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = parse_config(deep_update(params, copy.deepcopy(dense.P9_PARAMS)), "params.yaml + P9")
    # 256 scenes at batch 4 are 64 iterations an epoch: 128 in two; the lr drops after the first.
    assert (cfg.detection.data.train_scenes // cfg.detection.train.batch_size) * cfg.detection.train.epochs == 128
    assert cfg.detection.train.milestones == [1] and cfg.segmentation.train.iters == 120
    assert cfg.detection.samples == cfg.segmentation.samples == 0 and not cfg.mlflow.log_model


def test_p9_compares_median_times_as_throughput():
    got = {"stage": [{"seconds": 44.0, "busy": None}, {"seconds": 40.0, "busy": None}, {"seconds": 50.0, "busy": None}],
           "runner": [{"seconds": 36.0, "busy": 1.9}, {"seconds": 40.0, "busy": 1.95}, {"seconds": 35.0, "busy": 1.8}]}
    training_line, ratio_line = dense.summary("finetune_coco", got)
    # medians 44 s and 36 s: the stage runs at 36 / 44 = 0.818 of the Runner's rate
    assert training_line == ("P9 [finetune_coco, 3 reps] training: stage (Ray Train) 44.0 s, plain Runner 36.0 s "
                             "(1.90 cores busy)")
    assert ratio_line == "P9 [finetune_coco, 3 reps] stage / plain Runner throughput: 0.818 (goal >= 0.97)"


def test_an_import_floor_names_a_module_that_does_not_import():
    with pytest.raises(SystemExit, match=r"`import json, no_such_module_here` failed: ModuleNotFoundError: "
                                         r"No module named 'no_such_module_here'"):
        benchmarks.import_seconds("json, no_such_module_here", reps=1)
