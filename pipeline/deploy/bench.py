"""`python -m pipeline.deploy.bench MODEL...`: time any network through the deployment path, untrained.

With `--backends onnxruntime,torch,executorch` (the default) it builds each timm network (or a weights file of ours) in its deployment form,
exports it the way the export stage exports iFormer (one `torch.export`
program to ONNX, ExecuTorch and Core ML) and times it on each backend through
`pipeline.deploy.backends`, the registry the latency stage and the sweep use,
batch 1. The field stage (`pipeline.deploy.field`) runs the same code over
the paper's networks.

Deployment form: iFormer as the export stage makes it (`iformer.export.deploy_form`);
any other network re-parameterised and fused where it offers it (timm's
`reparameterize_model`: MobileOne, FastViT and RepViT branches folded, BatchNorm
fused), as each paper measured, with attention on its explicit path. A network
that fails to build, export or run on a backend gets that backend's reason in
its row (the paper's "Failed"); the others go on.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import PipelineError
from . import backends
from .backends import Skipped

log = logging.getLogger(__name__)


def deploy_network(name: str, num_classes: int = 1000):
    """The timm network `name` (or the weights file at that path) in deployment form, eval."""
    import timm
    from timm.utils.model import reparameterize_model

    from iformer.export import deploy_form, explicit_attention
    from iformer.distill import IFORMER_VARIANTS
    from iformer.models import build_model

    if name.endswith((".pt", ".pth")) and Path(name).is_file():
        from ..core import checkpoint

        return deploy_form(checkpoint.build_from_weights(checkpoint.load_weights(Path(name), "weights file")))
    if name in IFORMER_VARIANTS:  # the official configuration (layer scale as the paper's Table 15)
        return deploy_form(build_model(name, num_classes))
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    return explicit_attention(reparameterize_model(model).eval())


@dataclass
class Network:
    """One network to time (a `backends.Subject`), its files exported into `workdir` on first use."""

    name: str
    size: int
    workdir: Path
    num_classes: int = 1000
    opset: int = 18
    _module: object = None
    _program: object = None
    _files: dict = field(default_factory=dict)

    def torch_module(self):
        if self._module is None:
            self._module = deploy_network(self.name, self.num_classes)
        return self._module

    def _example(self):
        import torch

        return torch.randn(1, 3, self.size, self.size, generator=torch.Generator().manual_seed(0))

    def _export(self):
        if self._program is None:
            import torch

            self._program = torch.export.export(self.torch_module(), (self._example(),))
        return self._program

    def _file(self, kind: str, make: Callable[[Path], None]) -> Path:
        if kind not in self._files:
            path = self.workdir / f"{Path(self.name).stem}_{self.size}.{kind}"
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path)
            self._files[kind] = path
        return self._files[kind]

    def onnx_file(self) -> Path:
        from . import onnx

        return self._file("onnx", lambda p: onnx.export(self._export(), self.torch_module(), self._example(), p,
                                                        self.opset, "image", ["output"]))

    def executorch_file(self) -> Path:
        from . import executorch

        reason = executorch.available()
        if reason:
            raise Skipped(reason)
        return self._file("pte", lambda p: executorch.export(self._export(), p))

    def coreml_package(self, into: Path) -> Path:
        from ..config.deploy import CoreMLExportConfig
        from . import coreml

        return self._file("mlpackage", lambda p: coreml.convert(self._export(), self.size, ["output"],
                                                                CoreMLExportConfig(), None).save(str(p)))


def model_size(module, size: int) -> dict:
    from iformer.models import count_params, gmacs

    return {"params_m": count_params(module) / 1e6, "gmacs": gmacs(module, size)}


@dataclass
class Settings:
    """What `backends.BACKENDS` reads from the latency section, for the bench and the field."""

    runs: int = 20
    warmup: int = 5
    threads: int = 1
    compute_units: str = "all"
    device: Optional[str] = None


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def time_network(name: str, size: int, names: list[str], settings: Settings, ctx: backends.Context) -> dict:
    """One row: params, GMACs and, per backend, the timing summary or why there is none."""
    from ..core import console

    net = Network(name, size, ctx.workdir / Path(name).stem)
    row: dict = {"model": name, "size": size, "backends": {}}
    try:
        with console.to_log(ctx.workdir / "exporters.log"):
            row.update(model_size(net.torch_module(), size))
    except Exception as err:  # a network timm or its fusion cannot build: every backend says why
        row["backends"] = {b: {"failed": f"build: {_short(err)}"} for b in names}
        return row
    for b in names:
        try:
            with console.to_log(ctx.workdir / "exporters.log"):
                res, ran = backends.measure(b, {name: net}, settings, ctx)
            row["backends"][b] = {**{k: v for k, v in res[name].items() if k != "samples"},
                                  "label": backends.host_label(ran)}
        except Skipped as err:
            row["backends"][b] = {"skipped": str(err)}
        except PipelineError:
            raise
        except Exception as err:  # this backend cannot take this network: the row says so, the rest goes on
            row["backends"][b] = {"failed": _short(err)}
    return row


def time_all(models: list[tuple[str, int]], names: list[str], settings: Settings, workdir: Path,
             say: Callable[[str], None] = lambda s: None) -> list[dict]:
    """`time_network` for each (model, size), with a progress line per network and an estimate of what is left."""
    rows, start = [], time.monotonic()
    ctx = backends.Context(workdir)
    for i, (name, size) in enumerate(models, 1):
        row = time_network(name, size, names, settings, ctx)
        rows.append(row)
        took = time.monotonic() - start
        left = took / i * (len(models) - i)
        cells = ", ".join(f"{b} {r['median']:.2f} ms" if "median" in r else f"{b} {next(iter(r))}"
                          for b, r in row["backends"].items())
        say(f"{i}/{len(models)} {name} @ {size}: {cells} (about {left / 60:.0f} min left)")
    return rows


def table(rows: list[dict], names: list[str]) -> str:
    """The rows as a Markdown table: params, GMACs, median (p90) ms per backend, or why not."""
    head = ["network", "size", "params (M)", "GMACs"] + [f"{b} ms (p90)" for b in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["size"]), f"{r.get('params_m', float('nan')):.2f}",
                 f"{r.get('gmacs', float('nan')):.2f}"]
        for b in names:
            res = r["backends"].get(b, {})
            cells.append(f"{res['median']:.2f} ({res['p90']:.2f})" if "median" in res
                         else ("failed: " + res["failed"] if "failed" in res else "skipped"))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..config.deploy import LATENCY_BACKENDS

    ap = argparse.ArgumentParser(prog="python -m pipeline.deploy.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="MODEL", help="timm model names, or weights files of ours (.pt)")
    ap.add_argument("--backends", default="onnxruntime,torch,executorch",
                    help=f"comma-separated, from {', '.join(LATENCY_BACKENDS)} (default: %(default)s)")
    ap.add_argument("--size", type=int, default=224, help="input side in pixels (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per backend (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args(argv)
    names = [b for b in args.backends.split(",") if b]
    unknown = [b for b in names if b not in LATENCY_BACKENDS]
    problems = ([f"--backends: unknown {', '.join(unknown)}; known: {', '.join(LATENCY_BACKENDS)}"] if unknown else [])
    if not 32 <= args.size <= 2048:
        problems.append(f"--size: {args.size} is not in [32, 2048]")
    if not (1 <= args.runs <= 10_000 and 0 <= args.warmup <= 1000 and 1 <= args.threads <= 256):
        problems.append("--runs/--warmup/--threads: out of range (1-10000, 0-1000, 1-256)")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="iformer-bench-") as tmp:
        rows = time_all([(m, args.size) for m in args.models], names,
                        Settings(args.runs, args.warmup, args.threads), Path(tmp),
                        say=lambda s: print(s, file=sys.stderr))
    print(table(rows, names))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
