"""`python -m pipeline.recipes NAME`: write a recipe or dense preset into params.yaml.

`python -m pipeline.recipes NAME --data-root /path/to/imagenet` rewrites
`params.yaml` with the recipe (`pipeline/config/recipes.py`), keeping its `ray`
and `mlflow` sections (where the run happens is not part of a recipe) and its
comments. `python -m pipeline.recipes --list` lists them, one line each;
`-S KEY=VALUE` (repeatable, as in `dvc exp run -S`) sets any other field.

The `*_release` recipes start from the official released weights
(`model.weights`, a file in `weights/`; `--weights` names another):
`python -m pipeline.recipes iformer_m_release --data-root /data/imagenet`.

The dense presets (`mask_rcnn_1x`, `semantic_fpn_40k`; `pipeline/config/presets.py`)
rewrite only their own section (`detection` / `segmentation`) and keep the rest
of params.yaml; `--data-root` then names the COCO / ADE20K root.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .classify.prepare import check_prepare
from .config import Config, dump_config
from .config.apply import build, parse_sets, rewrite
from .config.presets import PRESETS
from .config.recipes import RECIPES, merge
from .core.layout import weights_path
from .errors import PipelineError, report


#: What each dense section trains, and the datasets' usual spelling, for `--list`.
_HEADS = {"detection": "Mask R-CNN + FPN", "segmentation": "Semantic FPN"}
_DATASETS = {"coco": "COCO", "ade20k": "ADE20K", "imagefolder": "ImageNet", "digits": "digits (bundled)"}


def summary(name: str) -> str:
    """One line on what recipe or preset `name` sets, read from its table entry."""
    if name in PRESETS:
        section, over = PRESETS[name]
        d = merge(Config().to_dict()[section], over)
        t = d["train"]
        length = f"{t['epochs']} epochs" if "epochs" in t else f"{t['iters']:,} iterations"
        return (f"{_HEADS[section]}, {_DATASETS[d['data']['source']]}, {length}, batch {t['batch_size']}, "
                f"lr {t['lr']:g}")
    d = merge(Config().to_dict(), RECIPES[name])
    variant = "iFormer-" + d["model"]["variant"].removeprefix("iformer_").upper()
    if d["model"]["weights"]:
        return f"{variant}, the official weights {d['model']['weights']}, evaluated at {d['data']['image_size']} px"
    teacher = f", {d['distill']['kind']} distillation ({d['distill']['teacher']})" if d["distill"]["enabled"] else ""
    return (f"{variant}, {_DATASETS[d['data']['source']]} {d['data']['image_size']} px, {d['train']['epochs']} "
            f"epochs, batch {d['train']['batch_size']}, base lr {d['optim']['base_lr']:g}{teacher}")


def listing() -> str:
    """`--list`: the classification recipes, then the dense presets, one line each."""
    width = max(map(len, [*RECIPES, *PRESETS]))
    lines = ["Classification recipes (rewrite params.yaml; keep ray and mlflow):"]
    lines += [f"  {n:<{width}}  {summary(n)}" for n in RECIPES]
    lines += ["Dense presets (rewrite only their detection / segmentation section):"]
    lines += [f"  {n:<{width}}  {summary(n)}" for n in PRESETS]
    return "\n".join(lines) + "\n"


def read_params(path: Path):
    """The params file's contents (None when there is none yet); one error naming it when unreadable."""
    if path.is_dir():
        raise PipelineError(f"--params: {path} is a directory; name the params file (params.yaml)")
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PipelineError(f"--params: {path} is not valid YAML{where} "
                            f"({getattr(err, 'problem', None) or type(err).__name__})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"--params: {path} cannot be read ({type(err).__name__}: {err})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.recipes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="recipe or dense preset to write into params.yaml (see --list)")
    ap.add_argument("--list", action="store_true", help="list the recipes and dense presets, one line each")
    ap.add_argument("--data-root", help="ImageNet root (train/<class>/*, val/<class>/*); "
                    "for a dense preset, the COCO / ADE20K root")
    ap.add_argument("--weights", help="released weights to start from (model.weights), a file in weights/; "
                    "the *_release recipes default to the official file name there")
    ap.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                    help="dotted override, value parsed as YAML, as `dvc exp run -S` (repeatable)")
    ap.add_argument("--params", default="params.yaml", help="params file to rewrite (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        sys.stdout.write(listing())
        return 0
    try:
        overrides = {}
        if args.data_root:
            field = f"{PRESETS[args.name][0]}.data.root" if args.name in PRESETS else "data.root"
            overrides[field] = args.data_root
        if args.weights:
            overrides["model.weights"] = args.weights
        overrides.update(parse_sets(args.sets))
        path = Path(args.params)
        keep = read_params(path)
        cfg = build(args.name, keep=keep if isinstance(keep, dict) else None, overrides=overrides)
        if args.name in PRESETS and args.data_root and not Path(args.data_root).expanduser().is_dir():
            # prepare_dense checks every annotation; here, only that the root is there
            raise PipelineError(f"{PRESETS[args.name][0]}.data.root: {args.data_root} is not a directory")
        if args.name not in PRESETS and cfg.data.source == "imagefolder":
            check_prepare(cfg, path.parent)
        if args.name not in PRESETS and cfg.model.weights is not None:
            weights_path(cfg.model.weights, path.parent.absolute())
    except PipelineError as err:
        return report(err)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(rewrite(path.read_text(), cfg.to_dict()) if path.exists() else
                   f"# Written by `python -m pipeline.recipes {args.name}`.\n" + dump_config(cfg))
    tmp.replace(path)
    if args.name in PRESETS:
        section = getattr(cfg, PRESETS[args.name][0])
        print(f"wrote {path} ({PRESETS[args.name][0]} preset {args.name}, lr {section.train.lr:g} "
              f"at global batch {section.train.batch_size})")
        return 0
    if cfg.train.epochs == 0:
        print(f"wrote {path} (recipe {args.name}: {cfg.model.weights} passed through, evaluated at "
              f"{cfg.data.image_size} px, crop {cfg.aug.crop_pct:g} {cfg.aug.interpolation})")
        return 0
    print(f"wrote {path} (recipe {args.name}, lr {cfg.lr:g} at global batch {cfg.train.batch_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
