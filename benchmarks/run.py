"""Benchmarks: ratios and wall times printed side by side from one run (not tests).

    make bench                          # all, on a quiet machine (about an hour on 2 cores)
    python -m benchmarks.run p1 --reps 3 --timm-train /path/to/timm/train.py
    python -m benchmarks.run p3 --threads 1
    python -m benchmarks.run p4 p5
    python -m benchmarks.run p6 --reps 1

P1  pretrain-stage training throughput (the Ray Train loop, steady epochs) / a bare
    single-process PyTorch loop (same model, batch, data, transforms, optimiser), at 2
    threads and at 1; and / timm's own train.py on the same images as an ImageFolder
    (2 threads, eager, no prefetcher). Interleaved repetitions, median ratios.
    Goals >= 0.97 (bare) and >= 1.0 (timm). timm's train.py is not in its wheel: give
    its path (from github.com/huggingface/pytorch-image-models); it is never committed.
    Known share of the 2-thread gap: Ray Train V2 runs the loop in a second thread of its
    worker actor, whose main thread takes the GIL for Ray's signal check every 10 ms
    (hard-coded in Ray); the same loop measured 0.94x in an actor's thread vs a Ray task.
P2  fixed overhead of the pretrain stage: its wall time (`python -m stages.pretrain`,
    default config, model logged) minus the time of its epochs. Goal <= 10 s. Then where it
    goes, phase by phase, from the times the stage's lines arrive and the Ray processes it
    starts appear (`benchmarks/timeline.py`; the stage is not instrumented). Last, the
    libraries' own import in a fresh interpreter, for the driver and for a worker: the part
    of the first and fourth phases that no change here removes.
P3  CPU latency of iformer_m at 224, batch 1: fused / unfused, the deploy form / unfused,
    ONNX Runtime / torch. Round-robin blocks of calls; medians and IQRs. Goal fused /
    unfused <= 0.8.
P4  full default `dvc repro` in a fresh copy of the repo, each stage's MLflow run, and the
    time outside them per stage (process start, imports, checks), beside the libraries'
    own import (mlflow in every stage; torch and timm too in evaluate, before its run).
    Goals <= 300 s and <= 3 s per stage.
P5  no-op `dvc repro`: the default, DVC's own start, and with a 100 k-file ImageNet-layout
    tree configured as the data set. Goal <= 1.0 s.
P6  per-epoch time of the pretrain stage with 2 workers on 2 nodes / 1 worker on 1 node,
    same global batch, on a 2-node loopback Ray cluster (one CPU per node, token auth,
    an MLflow server). Goal <= 0.6. Then where two workers' epoch goes: steps (against
    one worker at half the batch: the rest is all-reduce and waiting), validation, the
    checkpoint (from history.csv's train/val/checkpoint_seconds).
P7  `train.compile` in the pretrain stage: compile time (a cold Inductor cache each run),
    steady img/s compiled / eager, and whether it pays for itself within the default run.
P8  a Mask R-CNN training step (params.yaml's detection network, digit scenes) with the
    separable RoIAlign gradient (`pipeline/dense/roi_align.py`) / with torchvision's serial
    CPU kernel, in alternating blocks of steps; median step times.
P9  each dense stage's training on Ray Train (its worker, hooks and checkpoints) / the
    Runner that stage builds, trained in one plain process with the same threads, on the
    same data, weights and seed, alternating; and that Runner's cores busy. Goal: the
    stage's throughput >= 0.97 x the Runner's (a stage uses its cores as a plain process does).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks import cluster, dense, latency, repro, training  # noqa: E402

#: Each benchmark: its name on the command line -> how it runs with the parsed arguments.
BENCHMARKS = {
    "p1": lambda a: training.p1(a.reps, a.epochs, a.timm_train),
    "p2": lambda a: training.p2(a.reps),
    "p3": lambda a: latency.p3(a.rounds, a.calls, a.threads),
    "p4": lambda a: repro.p4_p5(a.reps),  # P4 and P5 share one repo: one run prints both
    "p6": lambda a: cluster.p6(a.reps, a.epochs),
    "p7": lambda a: training.p7(a.reps, a.epochs),
    "p8": lambda a: dense.p8(a.reps),
    "p9": lambda a: dense.p9(a.reps),
}
ALIASES = {"p5": "p4"}


def main() -> None:
    if sys.argv[1:2] == ["_one"]:  # a child process of P1 / P7
        kind, threads, repo, tag, compile_ = sys.argv[2:7]
        training.one_measurement(kind, int(threads), Path(repo), tag, compile_ == "1")
        return
    if sys.argv[1:2] == ["_dense"]:  # a child process of P9
        kind, repo, stage, tag = sys.argv[2:6]
        dense.one_training(kind, Path(repo), stage, tag)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="*", default=list(BENCHMARKS), choices=[*BENCHMARKS, *ALIASES], metavar="PN")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15, help="P3: round-robin rounds")
    ap.add_argument("--calls", type=int, default=10, help="P3: timed calls per network per round")
    ap.add_argument("--threads", type=int, default=1, help="P3: torch / ONNX Runtime threads")
    ap.add_argument("--timm-train", type=Path, default=None, help="P1: timm's train.py, to compare against")
    args = ap.parse_args()
    if args.timm_train is not None and not args.timm_train.is_file():
        sys.exit(f"error: --timm-train: {args.timm_train} is not a file")
    for name in dict.fromkeys(ALIASES.get(w, w) for w in args.which):
        BENCHMARKS[name](args)


if __name__ == "__main__":
    main()
