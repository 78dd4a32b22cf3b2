"""P6: two workers on two nodes against one on one, on a loopback Ray cluster."""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path


def p6(reps: int, epochs: int) -> None:
    import csv
    import os

    from cluster_fixture import LoopbackCluster, MlflowServer
    from conftest import make_repo

    def epoch_seconds(repo) -> float:
        rows = list(csv.DictReader(open(repo.path / "artifacts/pretrain/history.csv")))
        times = [float(r["epoch_seconds"]) for r in rows]
        return statistics.median(times[1:] or times)

    with tempfile.TemporaryDirectory(prefix="bench-p6-") as tmp:
        base = Path(tmp)
        cluster = LoopbackCluster(base, cpus=1)
        server = None
        try:
            cluster.start(nodes=2)
            server = MlflowServer(base)
            auth = {k: v for k, v in cluster.env.items() if k.startswith("RAY_AUTH")}
            times: dict[int, list[float]] = {1: [], 2: []}
            for i in range(reps):
                for workers in (2, 1):
                    repo = make_repo(base / f"repo-{workers}-{i}", {
                        "train": {"epochs": epochs, "batch_size": 64}, "mlflow": {"tracking_uri": server.uri,
                                                                                 "log_model": False},
                        "ray": {"address": cluster.address, "num_workers": workers, "cpus_per_worker": 1.0,
                                "storage_path": str(base / "storage")}})
                    repo.env.update(auth)
                    repo.stage("prepare")
                    repo.stage("pretrain")
                    times[workers].append(epoch_seconds(repo))
                    print(f"P6 rep {i + 1}: {workers} worker(s): {times[workers][-1]:.1f} s/epoch", flush=True)
        finally:
            if server is not None:
                server.stop()
            cluster.stop()
    two, one = statistics.median(times[2]), statistics.median(times[1])
    print(f"P6 [iformer_t 64px, global batch 64, {epochs} epochs, {reps} rep(s), one CPU per node, "
          f"{os.cpu_count()} cores on the machine] 2 workers on 2 nodes {two:.1f} s/epoch / 1 worker on 1 node "
          f"{one:.1f} s/epoch = {two / one:.2f} (goal <= 0.6)", flush=True)
