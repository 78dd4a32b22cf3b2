"""Benchmarks: ratios and wall times printed side by side from one run (not tests).

    python -m benchmarks.run            # all
    python -m benchmarks.run p1 --reps 3
    python -m benchmarks.run p3 --threads 1
    python -m benchmarks.run p4 p5
    python -m benchmarks.run p6 --reps 1

P1  pretrain-stage training throughput (the Ray Train loop) / a bare
    single-process PyTorch loop: same model, batch, data and transforms.
    Interleaved repetitions, median ratio; at 2 threads and at 1 thread.
    Goal >= 0.97.
P2  fixed overhead of the pretrain stage: its wall time (`python -m
    stages.pretrain`, default config, model logged) minus the time of its
    epochs (training + validation, from history.csv). Goal <= 15 s.
P3  CPU latency of iformer_m at 224, batch 1: fused (timm `fuse()`) / unfused eval network,
    the deploy form (fused, explicit attention: what export ships) / unfused, and ONNX Runtime /
    torch on the deploy form. Round-robin blocks of calls, so noise hits all alike; median
    and IQR of the per-call times and of the per-round ratios. Goal fused / unfused <= 0.8.
P4  full default `dvc repro` wall time in a fresh copy of the repo. Goal <= 10 min.
P5  no-op `dvc repro` wall time: the default, and with a 100 k-file ImageNet-layout
    tree configured as the data set. Goal <= 3 s.
P6  per-epoch time of the pretrain stage with 2 workers on 2 nodes / 1 worker on 1
    node, same global batch, on a 2-node loopback Ray cluster (one CPU per node,
    token auth, an MLflow server; tests/cluster_fixture.py). Median epoch time
    after the first epoch, from history.csv; runs interleaved. Goal <= 0.6.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


# -- P1 ----------------------------------------------------------------------------
def bare_loop_ips(cfg, prepared, epochs: int, threads: int) -> float:
    """A plain PyTorch loop; mean img/s over the epochs after the first (warm-up)."""
    import torch
    from timm.optim import create_optimizer_v2
    from torch.utils.data import DataLoader

    from iformer.models import build_model
    from pipeline.classify.datasets import ImageListDataset, build_transforms

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ds = ImageListDataset(prepared, "train", build_transforms(cfg, training=True))
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.loader_workers)
    model = build_model(cfg.model.variant, prepared.num_classes).train()
    # The same optimiser implementation as the stage, so only the pipeline's overhead differs.
    opt = create_optimizer_v2(model, opt=cfg.optim.name, lr=cfg.lr, weight_decay=cfg.optim.weight_decay,
                              betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
    ips = []
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
        ips.append(seen / (time.perf_counter() - start))
    return statistics.mean(ips[1:] or ips)


def stage_loop_ips(cfg, root: Path, inputs, storage: Path, tag: str) -> float:
    """The pretrain stage's Ray Train job; mean img/s it reports after the first epoch."""
    from pipeline.classify import pretrain

    cfg.ray.storage_path = storage
    inputs.run_name = f"bench-{tag}-{time.time_ns()}"
    state = pretrain.fit(cfg, root, inputs, None)
    ips = [row["img_per_sec"] for row in state["history"]]
    return statistics.mean(ips[1:] or ips)


def one_measurement(kind: str, threads: int, repo: Path, tag: str) -> None:
    """Child process: one stage or bare measurement, printed as `IPS <value>`."""
    import os

    from pipeline.classify import pretrain
    from pipeline.config import load_config

    os.environ["IFORMER_ROOT"] = str(repo)
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    cfg = load_config(repo / "params.yaml")
    cfg.ray.cpus_per_worker = float(threads)
    inputs = pretrain.check(cfg, repo)
    if kind == "stage":
        ips = stage_loop_ips(cfg, repo, inputs, repo / "bench_ray", tag)
    else:
        ips = bare_loop_ips(cfg, inputs.prepared, cfg.train.epochs, threads)
    print(f"IPS {ips}")


def p1(reps: int, epochs: int) -> None:
    from conftest import make_repo

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo", {"train": {"epochs": epochs, "log_every_batches": 1000},
                                              "mlflow": {"log_model": False}})
        repo.stage("prepare")
        cfg = repo.params()

        def measure(kind: str, threads: int, tag: str) -> float:
            # Each measurement in a fresh process: no idle Ray beside the bare loop.
            out = repo.run(sys.executable, "-m", "benchmarks.run", "_one", kind, str(threads), str(repo.path), tag,
                           env={"PYTHONPATH": str(ROOT)})
            return float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("IPS ")))

        results = {}
        for threads in (2, 1):
            ratios, stage_ips, bare_ips = [], [], []
            for i in range(reps):  # interleaved: stage, bare, stage, bare, ...
                s = measure("stage", threads, f"{threads}t{i}")
                b = measure("bare", threads, f"{threads}t{i}")
                stage_ips.append(s)
                bare_ips.append(b)
                ratios.append(s / b)
                print(f"P1 {threads} thread(s) rep {i + 1}: stage {s:.1f} img/s, bare {b:.1f} img/s, "
                      f"ratio {s / b:.3f}", flush=True)
            results[threads] = (statistics.median(ratios), statistics.median(stage_ips), statistics.median(bare_ips))
    for threads, (ratio, s, b) in results.items():
        print(f"P1 [{threads} thread(s), {cfg['model']['variant']} {cfg['data']['image_size']}px "
              f"batch {cfg['train']['batch_size']}] median stage {s:.1f} img/s / bare {b:.1f} img/s; "
              f"median ratio {ratio:.3f} (goal >= 0.97)")


# -- P2 ------------------------------------------------------------------------------
def p2(reps: int) -> None:
    import csv

    from conftest import make_repo

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo", {"train": {"epochs": 2}})
        repo.stage("prepare")
        overheads = []
        for i in range(reps):
            repo.set_params({"train": {"seed": i}})  # a new Ray run each time, not a resumed one
            start = time.perf_counter()
            repo.stage("pretrain")
            wall = time.perf_counter() - start
            with open(repo.path / "artifacts/pretrain/history.csv") as f:
                epochs = sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))
            overheads.append(wall - epochs)
            print(f"P2 rep {i + 1}: stage {wall:.1f} s, epochs {epochs:.1f} s, fixed overhead {wall - epochs:.1f} s",
                  flush=True)
    print(f"P2 fixed overhead of the pretrain stage (imports, Ray start-up and shutdown, worker start, final "
          f"checkpoint, model logging): median {statistics.median(overheads):.1f} s (goal <= 15 s)")
# -- P3 ----------------------------------------------------------------------------
def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def p3(rounds: int, per_round: int, threads: int, variant: str = "iformer_m", size: int = 224) -> None:
    import torch

    from iformer.export import deploy_form
    from iformer.models import build_model, fused_copy
    from pipeline.core import console
    from pipeline.deploy import backends, onnx

    torch.set_num_threads(threads)
    unfused = build_model(variant, 1000).eval()
    nets = {"unfused": unfused, "fused": fused_copy(unfused), "deploy": deploy_form(unfused)}
    x = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "deploy.onnx"
        start = time.perf_counter()
        with console.to_log(Path(tmp) / "export.log"):
            program = torch.export.export(nets["deploy"], (x,))
            onnx.export(program, nets["deploy"], x, path, 18, "image", ["logits"])
        print(f"P3 torch.export + dynamo ONNX export of {variant}: {time.perf_counter() - start:.1f} s", flush=True)
        sess = onnx.session(path, threads)
    feed = {"image": x.numpy()}
    calls = {name: (lambda net=net: net(x)) for name, net in nets.items()}
    calls["onnxruntime"] = lambda: sess.run(None, feed)
    pairs = (("fused", "unfused"), ("deploy", "unfused"), ("onnxruntime", "fused"), ("onnxruntime", "deploy"))
    samples = {k: [] for k in calls}
    ratios = {f"{a} / {b}": [] for a, b in pairs}
    with torch.inference_mode():
        for f in calls.values():
            backends.time_calls(f, 0, 5)
        for r in range(rounds):
            names = list(calls)[r % len(calls):] + list(calls)[: r % len(calls)]  # rotate the order
            med = {}
            for name in names:
                s = backends.time_calls(calls[name], per_round, 1)
                samples[name] += s
                med[name] = statistics.median(s)
            for a, b in pairs:
                ratios[f"{a} / {b}"].append(med[a] / med[b])
    head = f"P3 [{variant} {size}px batch 1, {threads} thread(s), {rounds} rounds x {per_round} calls]"
    for name, s in samples.items():
        q1, m, q3 = _quartiles(s)
        print(f"{head} {name}: median {m:.2f} ms, IQR {q1:.2f}-{q3:.2f} ms")
    for name, rs in ratios.items():
        q1, m, q3 = _quartiles(rs)
        goal = " (goal <= 0.8)" if name == "fused / unfused" else ""
        print(f"{head} {name}: median ratio {m:.3f}, IQR {q1:.3f}-{q3:.3f}{goal}")


# -- P4 / P5 -------------------------------------------------------------------------
def _timed(repo, *cmd) -> float:
    start = time.perf_counter()
    repo.run(*cmd, timeout=3600)
    return time.perf_counter() - start


def make_tree(root: Path, n_files: int, n_classes: int = 100) -> None:
    """An ImageNet-layout tree of tiny real PNGs."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="PNG")
    png = buf.getvalue()
    per_class = n_files // n_classes
    for split, count in (("train", per_class * 9 // 10), ("val", per_class - per_class * 9 // 10)):
        for c in range(n_classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(count):
                (d / f"{i:06d}.png").write_bytes(png)


def p4_p5(noop_reps: int) -> None:
    from conftest import make_repo

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo")
        full = _timed(repo, "dvc", "repro")
        print(f"P4 full default dvc repro: {full:.1f} s (goal <= 600 s)", flush=True)
        noop = [_timed(repo, "dvc", "repro") for _ in range(noop_reps)]
        print(f"P5 no-op dvc repro (default): median {statistics.median(noop):.2f} s over {noop_reps} "
              f"(goal <= 3 s)", flush=True)

        tree = Path(tmp) / "imagenet-like"
        make_tree(tree, 100_000)
        repo.set_params({"data": {"source": "imagefolder", "root": str(tree), "verify": "none"}})
        listing = _timed(repo, "dvc", "repro", "prepare")
        # Record the downstream stages as up to date without training on the tree:
        # what is measured is DVC's own no-op check with the big tree configured.
        repo.run("dvc", "commit", "-f")
        noop_big = [_timed(repo, "dvc", "repro") for _ in range(noop_reps)]
        print(f"P5 no-op dvc repro (100k-file tree): median {statistics.median(noop_big):.2f} s over "
              f"{noop_reps} (goal <= 3 s; listing the tree in prepare took {listing:.1f} s)", flush=True)


# -- P6 ------------------------------------------------------------------------------
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="*", default=["p1", "p2", "p3", "p4", "p5", "p6"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15, help="P3: round-robin rounds")
    ap.add_argument("--calls", type=int, default=10, help="P3: timed calls per network per round")
    ap.add_argument("--threads", type=int, default=1, help="P3: torch / ONNX Runtime threads")
    if sys.argv[1:2] == ["_one"]:
        kind, threads, repo, tag = sys.argv[2:6]
        one_measurement(kind, int(threads), Path(repo), tag)
        return
    args = ap.parse_args()
    which = {w.lower() for w in args.which}
    if "p1" in which:
        p1(args.reps, args.epochs)
    if "p2" in which:
        p2(args.reps)
    if "p3" in which:
        p3(args.rounds, args.calls, args.threads)
    if which & {"p4", "p5"}:
        p4_p5(args.reps)
    if "p6" in which:
        p6(args.reps, args.epochs)


if __name__ == "__main__":
    main()
