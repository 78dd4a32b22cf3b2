"""The code's shape, read from its own imports (inside functions too): no circles, nothing upward, short modules.

The layer order is `pipeline/__init__.py`'s docstring; `LAYERS` spells it for the test.
The import follower is the one that derives dvc.yaml's code deps (`pipeline.core.deps.imports`).
"""
from conftest import ROOT

from pipeline.core.deps import imports, module_file

#: `pipeline`'s layers, lowest first (as its docstring lists them). A module imports from its own
#: package and from earlier layers; two packages of one layer do not import each other.
LAYERS = (
    ("errors",), ("config",), ("core",), ("tracking",), ("stage",), ("compute",), ("classify",),
    ("dense", "deploy"), ("report", "field"), ("sweep", "jobs"),
    ("recipes", "exps", "store", "submit", "stage_deps", "__main__"),
)
#: Top-level packages, lowest first: `stages/` -> `pipeline/` -> `iformer/`.
PACKAGES = ("iformer", "pipeline", "stages")
MAX_LINES = 350


def modules() -> dict[str, object]:
    found = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports; a package above a module is not its dependency."""
    mods = modules()
    return {name: {d for d in imports(path, ROOT, name) if d in mods and not name.startswith(d + ".")}
            for name, path in mods.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def place(module: str) -> tuple[int, str] | None:
    """(layer, package) of a `pipeline` module; None for the `pipeline` package itself and outside it."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) == 1:
        return None
    return next(i for i, layer in enumerate(LAYERS) if parts[1] in layer), parts[1]


def test_every_pipeline_module_has_a_layer():
    unplaced = [m for m in modules() if m.startswith("pipeline.") and
                not any(m.split(".")[1] in layer for layer in LAYERS)]
    assert not unplaced, f"add these to pipeline/__init__.py's layers (and LAYERS here): {unplaced}"


def test_no_import_circles():
    assert circles(graph()) == []


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports that go up a layer, or across to another package of the same layer."""
    found = []
    for a, deps in g.items():
        for b in deps:
            top_a, top_b = PACKAGES.index(a.split(".")[0]), PACKAGES.index(b.split(".")[0])
            if top_b > top_a:
                found.append((a, b))
            elif top_a == top_b and place(a) and place(b):
                (la, pa), (lb, pb) = place(a), place(b)
                if lb > la or (lb == la and pa != pb):
                    found.append((a, b))
    return sorted(found)


def test_nothing_imports_upward():
    assert upward(graph()) == []


def test_modules_are_short():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: split by concern"


def test_the_follower_sees_imports_inside_functions():
    # pipeline.compute.cluster imports tracking.runs only inside a function: the graph must still see it
    assert "pipeline.tracking.runs" in graph()["pipeline.compute.cluster"]
    assert module_file(ROOT, "pipeline.compute.cluster") is not None


def test_a_planted_circle_and_upward_import_are_found():
    g = graph()
    g["pipeline.core.layout"] = g["pipeline.core.layout"] | {"pipeline.core.outputs"}  # outputs imports layout
    assert ["pipeline.core.layout", "pipeline.core.outputs"] in circles(g)
    g["pipeline.config.base"] = g["pipeline.config.base"] | {"pipeline.tracking.runs"}
    g["pipeline.dense.worker"] = g["pipeline.dense.worker"] | {"pipeline.deploy.backends"}
    g["iformer.models"] = g["iformer.models"] | {"pipeline.errors"}
    assert {("pipeline.config.base", "pipeline.tracking.runs"), ("pipeline.dense.worker", "pipeline.deploy.backends"),
            ("iformer.models", "pipeline.errors")} <= set(upward(g))
