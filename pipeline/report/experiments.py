"""The experiment table: the experiments side by side, one short column per headline.

`dvc exp show` has a column per dependency hash and per metric statistic, and
headers as long as their JSON paths (`onnxruntime.classifier_224.median`), so
at 160 columns little beyond the first metric is visible. This reads the same
data (`dvc exp show --json`) and prints: the workspace, the baseline commit
and every experiment; each param whose value differs between them (dotted
name); and the headline metrics under short headers, in the report's units
(accuracy and AP in percent, latency in ms). A figure whose stage, or a stage
before it, is not up to date with that row's params and code reads "stale"
(`dvc exp run pretrain` leaves evaluate's old top-1 in the experiment): for the
workspace `dvc status` says so, for a commit or experiment its `dvc.lock`
(`pipeline.core.freshness`); a missing one reads "–".

`python -m pipeline.exps` prints it.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import yaml

from ..core import freshness
from ..deploy.backends import BACKENDS

#: (header, metrics file, key path, scale, decimals)
HEADLINES = (
    ("top1 %", "metrics/evaluate.json", "top1", 100, 2),
    ("top5 %", "metrics/evaluate.json", "top5", 100, 2),
    ("params M", "metrics/evaluate.json", "params_m", 1, 2),
    ("GMACs", "metrics/evaluate.json", "gmacs_224", 1, 2),
    ("box AP", "metrics/finetune_coco.json", "bbox_ap", 100, 1),
    ("mask AP", "metrics/finetune_coco.json", "segm_ap", 100, 1),
    ("mIoU", "metrics/finetune_ade20k.json", "miou", 1, 1),
    ("img/s", "metrics/pretrain.json", "img_per_sec", 1, 0),
)
LATENCY_FILE = "metrics/latency.json"
#: A figure its row's params and code did not produce (see the module docstring).
STALE = "stale"
#: For `--dvc`: metric columns that are detail rather than headline.
NOISY_METRICS = (r".*\.(mean|std|min|max|p90|runs|ops|reshape|transpose)",
                 r".*(ops_without_const|ops_total|reshape_transpose|weight_mb|softmax|layer_norm|gelu|matmul|conv)",
                 r".*max_abs_diff.*", r"num_images", r".*_seconds", r".*\.skipped", r"miou_majority_baseline",
                 r"(bbox|segm)_ap(50|75)", r"macc|aacc", r"loss")


def dependency_paths(root: Path) -> list[str]:
    """Every `deps` path of every stage in dvc.yaml: the hash columns of `dvc exp show`."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return sorted({d for s in stages.values() for d in s.get("deps", [])})


def dvc_command(root: Path, extra: list[str]) -> list[str]:
    drop = "^(" + "|".join([re.escape(d) for d in dependency_paths(root)] + list(NOISY_METRICS) + ["Created"]) + ")$"
    keep = "^(" + "|".join([re.escape(key) for _, _, key, _, _ in HEADLINES] + [r".*\.median", "train_s"]) + ")$"
    return ["dvc", "exp", "show", "--no-pager", "--only-changed", "--drop", drop, "--keep", keep, *extra]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _data(rev: dict | None) -> tuple[dict, dict]:
    """(flat params of params.yaml, {metrics file: its data}) of one `dvc exp show --json` revision."""
    data = (rev or {}).get("data") or {}
    params = _flat(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    metrics = {f: (m or {}).get("data") or {} for f, m in (data.get("metrics") or {}).items()}
    return params, metrics


def rows_of(show: list[dict]) -> list[dict]:
    """[{"name", "params", "metrics"}] for the workspace, each baseline commit and its experiments."""
    rows = []
    for commit in show:
        rev = commit.get("rev", "")
        name = commit.get("name") or (rev if rev == "workspace" else rev[:7])
        rows.append({"name": name, "rev": rev, **dict(zip(("params", "metrics"), _data(commit)))})
        for exp in commit.get("experiments") or []:
            last = (exp.get("revs") or [{}])[0]
            label = f"  {exp.get('name') or last.get('name') or last.get('rev', '')[:7]}"
            rows.append({"name": label, "rev": last.get("rev", ""), **dict(zip(("params", "metrics"), _data(last)))})
    return rows


def mark_stale(root: Path, rows: list[dict]) -> list[dict]:
    """Each row with `stale`: {metrics file: why} for the files its not-up-to-date stages wrote."""
    for r in rows:
        rev = r.get("rev")
        verdict = freshness.workspace(root) if rev == "workspace" else freshness.at_revision(root, rev) if rev else None
        r["stale_stages"] = verdict.stale if verdict else {}
        r["stale"] = {f: r["stale_stages"][stage] for f, stage in (verdict.owners if verdict else {}).items()
                      if stage in r["stale_stages"]}
    return rows


def _short(backend: str) -> str:
    """A latency backend's column name (a backend no longer registered keeps its own)."""
    known = BACKENDS.get(backend)
    return (known.short if known else "") or backend


def latency_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(header, backend, model) for every median any row holds, classifier first."""
    seen = []
    for r in rows:
        for backend, models in (r["metrics"].get(LATENCY_FILE) or {}).items():
            for model, stats in (models or {}).items() if isinstance(models, dict) else ():
                if isinstance(stats, dict) and "median" in stats and (backend, model) not in seen:
                    seen.append((backend, model))
    seen.sort(key=lambda bm: (not bm[1].startswith("classifier"), bm[1], bm[0]))
    return [(f"{_short(b)} {m.rsplit('_', 1)[-1]} ms", b, m) for b, m in seen]


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in rows for k in r["params"]})
    changed = [k for k in keys if len({json.dumps(r["params"].get(k)) for r in rows}) > 1]
    lat = latency_columns(rows)
    header = ["Experiment", *changed, *[h for h, *_ in HEADLINES[:4]], *[h for h, *_ in lat],
              *[h for h, *_ in HEADLINES[4:]]]
    body = []
    for r in rows:
        stale = r.get("stale") or {}

        def metric(spec):
            _, f, key, scale, dec = spec
            v = r["metrics"].get(f, {}).get(key)
            return "–" if not isinstance(v, (int, float)) else STALE if f in stale else f"{v * scale:.{dec}f}"

        def latency(backend, model):
            v = ((r["metrics"].get(LATENCY_FILE) or {}).get(backend) or {}).get(model, {})
            if not (isinstance(v, dict) and isinstance(v.get("median"), (int, float))):
                return "–"
            return STALE if LATENCY_FILE in stale else f"{v['median']:.2f}"

        body.append([r["name"], *[str(r["params"].get(k, "–")) for k in changed],
                     *[metric(s) for s in HEADLINES[:4]], *[latency(b, m) for _, b, m in lat],
                     *[metric(s) for s in HEADLINES[4:]]])
    return header, body


def render(header: list[str], body: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows([[c.strip() for c in row] for row in body])
        return buf.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c.strip() for c in row) + " |" for row in body]) + "\n"
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths), *map(fmt_row, body)]) + "\n"


def _with_unit(header: str, value: str) -> str:
    """`top1 %` + `98.89` -> `top1 98.89 %`; `ort 224 ms` -> `ort 224 px 1.23 ms`; `img/s` -> `151 img/s`."""
    *name, unit = header.split()
    if unit == "ms" and name and name[-1].isdigit():  # a latency column: backend, input size
        name[-1] += " px"
    if unit in ("%", "M", "ms"):
        return f"{' '.join(name)} {value} {unit}"
    return f"{value} {header}" if header in ("GMACs", "img/s") else f"{header} {value}"


def workspace_summary(root: Path) -> str:
    """This workspace's headline figures in one line, from its metrics files as they are (`make pipeline`'s end)."""
    files = {f for _, f, *_ in HEADLINES} | {LATENCY_FILE}
    metrics = {f: json.loads((root / f).read_text()) for f in sorted(files) if (root / f).is_file()}
    header, body = table([{"name": "workspace", "params": {}, "metrics": metrics}])
    return ", ".join(_with_unit(h, v) for h, v in zip(header[1:], body[0][1:]) if v != "–") or "no metrics yet"
