"""P6: two workers on two nodes against one on one, on a loopback Ray cluster, and where the time goes."""
from __future__ import annotations

import csv
import os
import statistics
import tempfile
from pathlib import Path

#: What each configuration runs: its label -> (workers, global batch). One worker at half the
#: batch computes what each of two workers computes per step, without their all-reduce.
RUNS = {"two": (2, 64), "one": (1, 64), "one_half_batch": (1, 32)}
PARTS = ("epoch_seconds", "train_seconds", "val_seconds", "checkpoint_seconds")


def epoch_parts(history: Path) -> dict[str, float]:
    """Median over the steady epochs (the first, warming up, only when it is alone) of each part."""
    with open(history, newline="") as f:
        rows = [{k: float(r[k]) for k in PARTS} for r in csv.DictReader(f)]
    steady = rows[1:] or rows
    return {k: statistics.median(r[k] for r in steady) for k in PARTS}


def breakdown(two: dict[str, float], one: dict[str, float], half: dict[str, float]) -> list[str]:
    """Where two workers' epoch goes against one worker's: steps (their ideal is half of one worker's
    at half the batch; the rest is all-reduce and waiting), validation, the checkpoint."""
    total2 = two["epoch_seconds"] + two["checkpoint_seconds"]
    total1 = one["epoch_seconds"] + one["checkpoint_seconds"]
    ideal_steps = half["train_seconds"] / 2
    comm = max(0.0, two["train_seconds"] - ideal_steps)
    other = two["epoch_seconds"] - two["train_seconds"] - two["val_seconds"]  # epoch-end sums, rank 0 vs mean
    share = lambda s: f"{s:.1f} s ({100 * s / total2:.0f} %)"  # noqa: E731
    best = (total2 - comm) / total1
    return [f"P6 breakdown of 2 workers' epoch with its checkpoint, {total2:.1f} s (1 worker: {total1:.1f} s):",
            f"  steps {share(two['train_seconds'])}: computing {ideal_steps:.1f} s (half of 1 worker's at batch 32, "
            f"{half['train_seconds']:.1f} s), all-reduce and waiting {share(comm)}",
            f"  validation {share(two['val_seconds'])} (1 worker: {one['val_seconds']:.1f} s)",
            f"  checkpoint and report {share(two['checkpoint_seconds'])} (1 worker: {one['checkpoint_seconds']:.1f} s)",
            f"  other {share(other)}",
            f"  without the all-reduce and waiting the ratio would be {best:.2f}"]


def p6(reps: int, epochs: int) -> None:
    from cluster_fixture import LoopbackCluster, MlflowServer
    from conftest import make_repo

    parts: dict[str, list[dict[str, float]]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="bench-p6-") as tmp:
        base = Path(tmp)
        cluster = LoopbackCluster(base, cpus=1)
        server = None
        try:
            cluster.start(nodes=2)
            server = MlflowServer(base)
            auth = {k: v for k, v in cluster.env.items() if k.startswith("RAY_AUTH")}
            for i in range(reps):
                for name, (workers, batch) in RUNS.items():
                    repo = make_repo(base / f"repo-{name}-{i}", {
                        "train": {"epochs": epochs, "batch_size": batch},
                        "mlflow": {"tracking_uri": server.uri, "log_model": False},
                        "ray": {"address": cluster.address, "num_workers": workers, "cpus_per_worker": 1.0,
                                "storage_path": str(base / "storage")}})
                    repo.env.update(auth)
                    repo.stage("prepare")
                    repo.stage("pretrain")
                    parts[name].append(epoch_parts(repo.path / "artifacts/pretrain/history.csv"))
                    print(f"P6 rep {i + 1}: {workers} worker(s), batch {batch}: "
                          f"{parts[name][-1]['epoch_seconds']:.1f} s/epoch", flush=True)
        finally:
            if server is not None:
                server.stop()
            cluster.stop()
    med = {name: {k: statistics.median(p[k] for p in runs) for k in PARTS} for name, runs in parts.items()}
    two, one = med["two"]["epoch_seconds"], med["one"]["epoch_seconds"]
    print(f"P6 [iformer_t 64px, global batch 64, {epochs} epochs, {reps} rep(s), one CPU per node, "
          f"{os.cpu_count()} cores on the machine] 2 workers on 2 nodes {two:.1f} s/epoch / 1 worker on 1 node "
          f"{one:.1f} s/epoch = {two / one:.2f} (goal <= 0.6)", flush=True)
    for line in breakdown(med["two"], med["one"], med["one_half_batch"]):
        print(line, flush=True)
