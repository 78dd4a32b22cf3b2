"""Recipes and overrides applied: a Config built from a recipe, params.yaml rewritten in place.

`with_dotted` is the one reading of dotted overrides (`optim.base_lr=1e-3`) that
the recipes command, the sweep's trials and its best-params file share.
"""
from __future__ import annotations

import copy

import yaml

from ..errors import PipelineError
from . import Config, parse_config
from .presets import PRESETS
from .recipes import RECIPES, merge


def with_dotted(data: dict, values: dict) -> dict:
    """A copy of the nested dict `data` with each dotted key of `values` set (missing levels made)."""
    out = copy.deepcopy(data)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def parse_sets(items: list[str]) -> dict:
    """`KEY=VALUE` strings (`-S`) as {dotted key: value parsed as YAML}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise PipelineError(f"-S {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def build(name: str, keep: dict | None = None, overrides: dict | None = None):
    """The Config of recipe `name`, with `keep` sections and dotted `overrides` on top."""
    if name in PRESETS:  # one dense section; everything else stays as written
        section, over = PRESETS[name]
        data = copy.deepcopy(keep) if keep else Config().to_dict()
        data[section] = merge(Config().to_dict()[section], over)
    elif name in RECIPES:
        data = merge(Config().to_dict(), RECIPES[name])
        data["recipe"] = name
        for section in ("ray", "mlflow"):
            if keep and section in keep:
                data[section] = keep[section]
    else:
        raise PipelineError(f"unknown recipe {name!r}; known: {', '.join(sorted([*RECIPES, *PRESETS]))}")
    return parse_config(with_dotted(data, overrides or {}), f"recipe {name}")


def rewrite(text: str, values: dict) -> str:
    """`text` (a params.yaml) with `values` written in, its comments and layout kept."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    rt = YAML()
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(text)

    def assign(node, new: dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(node.get(k), dict):
                assign(node[k], v)
            elif node.get(k) != v:
                if isinstance(v, list):  # keep pairs on one line, as the file writes them
                    v = CommentedSeq(v)
                    v.fa.set_flow_style()
                node[k] = v

    assign(doc, values)
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()
