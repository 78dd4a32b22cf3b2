"""P1, P2 and P7: the pretrain stage's training loop against plain loops, its fixed cost, torch.compile.

Every measurement runs in a fresh process (`python -m benchmarks.run _one ...`), so no idle
Ray or compiled cache sits beside the next one; repetitions are interleaved.
"""
from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import ROOT, child_result, import_floor


# -- the measurements, each in its own process -------------------------------------------
def bare_loop(cfg, prepared, epochs: int, threads: int) -> list[dict]:
    """A plain single-process PyTorch loop: same data, transforms, model, optimiser and loss."""
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
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = create_optimizer_v2(model, opt=cfg.optim.name, lr=cfg.lr, weight_decay=cfg.optim.weight_decay,
                              betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=cfg.optim.fused)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
    rows = []
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for x, y in loader:
            loss = loss_fn(model(x.contiguous(memory_format=layout)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
        took = time.perf_counter() - start
        rows.append({"img_per_sec": seen / took, "epoch_seconds": took})
    return rows


def one_measurement(kind: str, threads: int, repo: Path, tag: str, compile_: bool) -> None:
    """Child process: the stage's Ray Train job or the bare loop; prints `HISTORY <json>`."""
    from pipeline.classify import pretrain
    from pipeline.config import load_config

    os.environ["IFORMER_ROOT"] = str(repo)
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    cfg = load_config(repo / "params.yaml")
    cfg.ray.cpus_per_worker = float(threads)
    cfg.train.compile = compile_
    inputs = pretrain.check(cfg, repo)
    if kind == "stage":
        cfg.ray.storage_path = repo / "bench_ray"
        inputs.run_name = f"bench-{tag}-{time.time_ns()}"
        history = pretrain.fit(cfg, repo, inputs, None)["history"]
    else:
        history = bare_loop(cfg, inputs.prepared, cfg.train.epochs, threads)
    print("HISTORY " + json.dumps([{k: r[k] for k in ("img_per_sec", "epoch_seconds")} for r in history]))


def steady(history: list[dict], key: str = "img_per_sec") -> float:
    """Mean over the epochs after the first (the first warms caches, or compiles)."""
    return statistics.mean([r[key] for r in history[1:]] or [history[0][key]])


def _measure(repo, kind: str, threads: int, tag: str, compile_: bool = False) -> list[dict]:
    return child_result(repo, "HISTORY", "_one", kind, str(threads), str(repo.path), tag, str(int(compile_)),
                        # A cold compile each time: Inductor's cache would hide the cost from the second run on.
                        env={"TORCHINDUCTOR_CACHE_DIR": str(repo.path / f"inductor-{tag}")})


def _digits_repo(tmp: Path, epochs: int):
    from conftest import make_repo

    repo = make_repo(tmp / "repo", {"train": {"epochs": epochs, "log_every_batches": 1000},
                                    "mlflow": {"log_model": False}})
    repo.stage("prepare")
    return repo


# -- timm's train.py on the same images ------------------------------------------------
def image_folder(prepared, dest: Path) -> Path:
    """The prepared digits as an ImageFolder (links, class folders by label) for timm's train.py."""
    for split in ("train", "val"):
        for i, (rel, label) in enumerate(prepared.samples(split)):
            d = dest / split / f"{label:04d}"
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(prepared.root / rel, d / f"{i:06d}{Path(rel).suffix}")
    return dest


#: train.py's last log line of an epoch: "Train: E [ N/N (100%)] ... (avg s, avg img/s)".
EPOCH_END = re.compile(r"Train: (\d+) \[\s*\d+/\d+ \(100%\)\].*\(\s*[\d.]+s,\s*([\d.]+)/s\)")


def timm_train(train_py: Path, folder: Path, cfg: dict, epochs: int, out: Path) -> list[float]:
    """Steady img/s of timm's own train.py with the stage's settings (CPU, eager, no prefetcher)."""
    a, o, s, t = cfg["aug"], cfg["optim"], cfg["schedule"], cfg["train"]
    lr = o["base_lr"] * t["batch_size"] / o["base_batch_size"]
    args = [str(folder), "--train-split", "train", "--val-split", "val", "--model", cfg["model"]["variant"],
            "--num-classes", "10", "--img-size", str(cfg["data"]["image_size"]), "-b", str(t["batch_size"]),
            "--epochs", str(epochs), "--opt", o["name"], "--lr", str(lr), "--weight-decay", str(o["weight_decay"]),
            "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", str(int(s["warmup_epochs"])),
            "--warmup-lr", str(s["warmup_lr"]), "--min-lr", str(s["min_lr"]), "--warmup-prefix",
            "--smoothing", str(a["label_smoothing"]), "--scale", *map(str, a["scale"]),
            "--ratio", *map(str, a["ratio"]), "--hflip", str(a["hflip"]), "--color-jitter", str(a["color_jitter"]),
            "--interpolation", a["interpolation"], "--reprob", "0", "--mixup", "0", "--cutmix", "0",
            "--crop-pct", str(a["crop_pct"]), "-j", str(cfg["data"]["loader_workers"]), "--device", "cpu",
            "--no-prefetcher", "--log-interval", "10", "--seed", "0", "--checkpoint-hist", "1",
            "--output", str(out)] + (["--channels-last"] if t["channels_last"] else []) \
        + (["--opt-kwargs", "fused=True"] if o["fused"] else [])
    proc = subprocess.run([sys.executable, str(train_py), *args], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONPATH": ""})
    rates = {int(m[1]): float(m[2]) for m in EPOCH_END.finditer(proc.stdout + proc.stderr)}
    if proc.returncode != 0 or len(rates) < epochs:
        raise RuntimeError(f"timm train.py failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return [rates[e] for e in sorted(rates)]


# -- P1 --------------------------------------------------------------------------------------
def p1(reps: int, epochs: int, train_py: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = _digits_repo(Path(tmp), epochs)
        cfg = repo.params()
        folder = None
        if train_py is not None:
            from pipeline.classify.datasets import Prepared

            folder = image_folder(Prepared.load(repo.path / "artifacts/prepare"), Path(tmp) / "folder")
        for threads in (2, 1):
            ratios, ratios_timm = [], []
            for i in range(reps):  # interleaved: stage, bare, timm, stage, bare, timm, ...
                s = steady(_measure(repo, "stage", threads, f"{threads}t{i}"))
                b = steady(_measure(repo, "bare", threads, f"{threads}t{i}"))
                ratios.append(s / b)
                line = f"P1 {threads} thread(s) rep {i + 1}: stage {s:.1f} img/s, bare {b:.1f} img/s"
                if folder is not None and threads == 2:  # train.py leaves torch at its default: every core
                    rates = timm_train(train_py, folder, cfg, epochs, Path(tmp) / f"timm-{i}")
                    tm = statistics.mean(rates[1:] or rates)
                    ratios_timm.append(s / tm)
                    line += f", timm train.py {tm:.1f} img/s"
                print(line, flush=True)
            head = (f"P1 [{cfg['model']['variant']} {cfg['data']['image_size']}px batch {cfg['train']['batch_size']}, "
                    f"{threads} thread(s), {reps} rep(s)]")
            print(f"{head} stage / bare loop: median {statistics.median(ratios):.3f} (goal >= 0.97)")
            if ratios_timm:
                print(f"{head} stage / timm train.py: median {statistics.median(ratios_timm):.3f} (goal >= 1.0)")
        if train_py is None:
            print("P1 stage / timm train.py: not measured; pass --timm-train PATH (train.py from "
                  "github.com/huggingface/pytorch-image-models; it is not in timm's wheel)")


# -- P2 --------------------------------------------------------------------------------------
def p2(reps: int) -> None:
    from conftest import make_repo

    from benchmarks import timeline

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo", {"train": {"epochs": 2}})
        repo.stage("prepare")
        overheads, parts = [], []
        for i in range(reps):
            repo.set_params({"train": {"seed": i}})  # a new Ray run each time, not a resumed one
            code, out, marks = timeline.run([sys.executable, "-m", "stages.pretrain"], repo.path, repo.env)
            if code != 0:
                raise SystemExit(f"P2: the pretrain stage failed ({code}):\n{out[-4000:]}")
            with open(repo.path / "artifacts/pretrain/history.csv") as f:
                epochs = sum(float(row["epoch_seconds"]) for row in csv.DictReader(f))
            wall = marks["end"]
            overheads.append(wall - epochs)
            parts.append(timeline.phases(marks, epochs))
            print(f"P2 rep {i + 1}: stage {wall:.1f} s, epochs {epochs:.1f} s, fixed overhead {wall - epochs:.1f} s",
                  flush=True)
    print(f"P2 fixed overhead of the pretrain stage (imports, Ray start-up and shutdown, worker start, final "
          f"checkpoint, model logging): median {statistics.median(overheads):.1f} s (goal <= 10 s), of which:")
    for k, (label, _) in enumerate(parts[0]):
        seen = [p[k][1] for p in parts if p[k][1] is not None]
        print(f"    {statistics.median(seen):5.1f} s  {label}" if seen else f"      n/a  {label} (not seen)")
    floor = import_floor("pretrain's driver", "a pretrain worker (the network: timm)", together=True)
    print(f"P2 within the first and fourth phases, {floor}", flush=True)


# -- P7 --------------------------------------------------------------------------------------
def p7(reps: int, epochs: int) -> None:
    """train.compile on vs off in the stage: compile time and steady img/s; pays off in the default run?"""
    from pipeline.config import load_config

    default_epochs = load_config(ROOT / "params.yaml").train.epochs
    with tempfile.TemporaryDirectory() as tmp:
        repo = _digits_repo(Path(tmp), max(epochs, 2))
        runs: dict[bool, list[list[dict]]] = {False: [], True: []}
        for i in range(reps):
            for compiled in (False, True):
                runs[compiled].append(_measure(repo, "stage", 2, f"c{int(compiled)}-{i}", compiled))
                h = runs[compiled][-1]
                print(f"P7 rep {i + 1} compile={compiled}: first epoch {h[0]['epoch_seconds']:.1f} s, "
                      f"then {steady(h, 'epoch_seconds'):.1f} s/epoch, {steady(h):.1f} img/s", flush=True)

    def med(compiled, f):
        return statistics.median(f(h) for h in runs[compiled])

    first = {c: med(c, lambda h: h[0]["epoch_seconds"]) for c in runs}
    per_epoch = {c: med(c, lambda h: steady(h, "epoch_seconds")) for c in runs}
    ips = {c: med(c, steady) for c in runs}
    compile_s = (first[True] - per_epoch[True]) - (first[False] - per_epoch[False])
    saved = (per_epoch[False] - per_epoch[True]) * default_epochs
    print(f"P7 [train.compile, 2 threads, median of {reps}] compile time ~{compile_s:.1f} s; steady "
          f"{ips[True]:.1f} img/s compiled vs {ips[False]:.1f} eager ({ips[True] / ips[False]:.2f}x); over the "
          f"default {default_epochs} epochs it saves {saved:.1f} s for {compile_s:.1f} s of compiling: "
          f"{'pays off' if saved > compile_s else 'does not pay off (kept off by default)'}")
