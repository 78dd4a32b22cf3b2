"""P3: CPU latency of the fused, deploy and ONNX Runtime forms against the unfused network."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


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
