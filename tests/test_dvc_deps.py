"""dvc.yaml's code deps and params are what each stage's command imports and reads, so DVC reruns what changed."""
import json
import textwrap

import pytest
import yaml

from conftest import ROOT, make_repo
from pipeline.core import deps


def test_dvc_yaml_lists_what_each_stage_imports_and_reads():
    problems = deps.problems(ROOT)
    assert not problems, ("dvc.yaml differs from the stages' code; run `python -m pipeline.stage_deps --write`:\n"
                          + "\n".join(problems))


def _edited(stage: str, key: str, drop: str | None = None, add: str | None = None) -> str:
    data = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    entries = data["stages"][stage][key]
    if drop:
        entries.remove(drop)
    if add:
        entries.insert(1, add)
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("stage, key, drop, add, expected", [
    # The stale pretrain: its training images come from pipeline/classify/datasets.py's build_transforms.
    ("pretrain", "deps", "pipeline/classify/datasets.py", None,
     "pretrain: deps miss pipeline/classify/datasets.py (imported by pipeline/classify/pretrain.py)"),
    ("evaluate", "deps", None, "pipeline/exps.py",
     "evaluate: deps list pipeline/exps.py, which `python -m stages.evaluate` does not run (or not all of it)"),
    ("prepare", "params", "aug", None, "prepare: params miss aug (read in pipeline/classify/datasets.py)"),
    ("latency", "params", None, "mlflow", "latency: params list mlflow, which the stage does not read"),
])
def test_check_names_the_stage_and_the_module(stage, key, drop, add, expected):
    assert deps.problems(ROOT, _edited(stage, key, drop, add)) == [expected]


def test_write_restores_dvc_yaml_with_its_comments():
    committed = (ROOT / "dvc.yaml").read_text()
    assert committed.startswith("# ") and deps.rewrite(ROOT, committed) == committed
    scrambled = committed.replace("      - pipeline/classify/datasets.py\n", "").replace("      - stages/evaluate.py\n",
                                                                       "      - pipeline/exps.py\n")
    assert deps.problems(ROOT, scrambled)
    assert deps.rewrite(ROOT, scrambled) == committed


# -- the rules, on a small project written here --------------------------------------------------
FILES = {
    "params.yaml": """
        model: {variant: t, drop_path: 0.1}
        optim: {base_lr: 0.1, base_batch_size: 8}
        train: {batch_size: 16, epochs: 2, log_every_batches: 5}
        mlflow: {experiment: x}
        detection: {data: {root: a}, lr: 1}
        segmentation: {data: {root: b}, lr: 2}
    """,
    "stages/__init__.py": "",
    "stages/one.py": "from pipeline import stage, work\n",
    "stages/two.py": "from pipeline import dense\n",
    "pipeline/__init__.py": "",
    "pipeline/stage.py": "from . import hidden\n",  # plumbing: not followed
    "pipeline/hidden.py": "X = 1\n",
    "pipeline/config.py": """
        class Config:
            @property
            def lr(self):
                return self.optim.base_lr * self.train.batch_size / self.optim.base_batch_size
    """,
    "pipeline/work.py": """
        def run(cfg):
            from .tools import helper
            from pipeline.pkg import sub
            print(cfg.mlflow.experiment, cfg.to_dict())
            return cfg.model.variant, cfg.lr, cfg.model.variant.upper()
    """,
    "pipeline/tools/__init__.py": '"""Tools."""\nfrom .helper import epochs\n\n__all__ = ["epochs"]\n',
    "pipeline/tools/helper.py": "def epochs(cfg):\n    return cfg.train.epochs\n",
    "pipeline/tools/unused.py": "",
    "pipeline/pkg/__init__.py": "REGISTRY = {}\n",
    "pipeline/pkg/sub.py": "import pipeline.pkg.more\n",
    "pipeline/pkg/more.py": "",
    "pipeline/dense.py": """
        def build(cfg, task):
            section = getattr(cfg, task)
            return section, cfg.segmentation.lr, getattr(cfg, "model").drop_path
    """,
}


@pytest.fixture
def project(tmp_path):
    for rel, text in FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    return tmp_path


def test_code_deps_follow_every_import_and_skip_plumbing(project):
    one = deps.derive(project, {"one": {"cmd": "python -m stages.one"}})["one"]
    # helper: a relative import inside a function; pkg: `from pipeline.pkg import sub`, then sub imports
    # more, so every module of pkg runs; the trivial __init__ files are followed, not listed; stage and
    # what it imports (hidden) are plumbing; config.py computes cfg.lr, which work.py reads.
    assert one.code == ["stages/one.py", "pipeline/config.py", "pipeline/pkg", "pipeline/tools/helper.py",
                        "pipeline/work.py"]
    assert one.why["pipeline/tools/helper.py"] == "imported by pipeline/work.py"
    assert one.why["pipeline/config.py"] == "defines cfg.lr, read in pipeline/work.py"


def test_params_are_the_keys_read_through_cfg(project):
    one = deps.derive(project, {"one": {"cmd": "python -m stages.one"}})["one"]
    # cfg.lr is a Config property reading all of optim and train.batch_size; mlflow is plumbing;
    # cfg.to_dict() and .upper() are methods, not keys; train.log_every_batches is plumbing.
    assert one.params == ["model.variant", "optim", "train.batch_size", "train.epochs"]
    assert one.reader[("train", "epochs")] == "pipeline/tools/helper.py"


def test_a_section_chosen_at_run_time_needs_its_stage_named(project, monkeypatch):
    stages = {"two": {"cmd": "python -m stages.two"}}
    assert deps.derive(project, stages)["two"].unresolved == ["pipeline/dense.py:3"]
    monkeypatch.setattr(deps, "TASK_SECTIONS", {"two": "detection", "other": "segmentation"})
    two = deps.derive(project, stages)["two"]
    assert two.unresolved == [] and two.params == ["model.drop_path", "detection"]  # not the other task's


# -- DVC itself, on a copy of the repo ------------------------------------------------------------
def _placeholders(repo) -> None:
    """Every stage's outputs as stand-in files, committed to DVC as if each stage had run.

    `dvc commit` takes every dvc.yaml in the repo, so the optional field stage (field/dvc.yaml,
    paths relative to its wdir) gets its stand-ins too."""
    specs = []
    for dvc_yaml in (repo.path / "dvc.yaml", repo.path / "field" / "dvc.yaml"):
        for spec in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
            specs.append((dvc_yaml.parent / spec.get("wdir", "."), spec))
    for wdir, spec in specs:
        for entry in [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]:
            path = wdir / (entry if isinstance(entry, str) else next(iter(entry)))
            if path.suffix in (".json", ".csv"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "manifest.json").write_text("{}\n")
    repo.run("dvc", "commit", "--force", "--quiet")


def _changed(repo) -> set[str]:
    return set(json.loads(repo.run("dvc", "status", "--json").stdout or "{}"))


def _edit(repo, rel: str, old: str, new: str) -> None:
    path = repo.path / rel
    text = path.read_text()
    assert text.count(old) == 1, f"{rel}: {old!r} not found once"
    path.write_text(text.replace(old, new))


@pytest.mark.slow
def test_dvc_reruns_the_stages_whose_code_or_params_changed(tmp_path):
    repo = make_repo(tmp_path / "repo")
    _placeholders(repo)
    assert _changed(repo) == set()

    # The reproduction: a flip in the training transforms. Before, only prepare listed
    # pipeline/data.py (now pipeline/classify/datasets.py), and `dvc repro` skipped pretrain with the old model.
    _edit(repo, "pipeline/classify/datasets.py", "hflip=a.hflip,", "hflip=0.5,")
    changed = _changed(repo)
    assert {"pretrain", "evaluate"} <= changed, changed
    assert not {"prepare_dense", "finetune_coco", "finetune_ade20k"} & changed, changed
    repo.git("checkout", "--", "pipeline/classify/datasets.py")
    assert _changed(repo) == set()

    # Plumbing and modules no stage runs change nothing.
    _edit(repo, "pipeline/core/console.py", '"""What a stage shows', '"""What the stage shows')
    _edit(repo, "pipeline/exps.py", '"""`python -m pipeline.exps`', '"""`python -m pipeline.exps` ')
    assert _changed(repo) == set()

    # The optional field stage (field/dvc.yaml) reruns with the deployment code it times, and
    # alone when only its own section changes.
    field = "field/dvc.yaml:field"
    _edit(repo, "pipeline/deploy/executorch.py", 'DELEGATE_CALL = "executorch_call_delegate"',
          'DELEGATE_CALL = "executorch_call_delegate"  # edited')
    changed = _changed(repo)
    assert {"export", "latency", field} <= changed and not {"pretrain", "evaluate"} & changed, changed
    repo.git("checkout", "--", "pipeline/deploy/executorch.py")
    repo.set_params({"field": {"runs": 7}})
    assert _changed(repo) == {field}
    repo.git("checkout", "--", "params.yaml")

    # Renaming the MLflow experiment reruns nothing; a training knob reruns pretrain, not the dense stages.
    repo.set_params({"mlflow": {"experiment": "renamed"}})
    assert _changed(repo) == set()
    repo.set_params({"aug": {"mixup": 0.2}})
    changed = _changed(repo)
    assert "pretrain" in changed and not {"prepare_dense", "finetune_coco"} & changed, changed


def test_write_rewrites_the_opt_in_stages_dvc_yaml_too(tmp_path, monkeypatch, capsys):
    from pipeline import stage_deps

    for code in ("stages", "pipeline", "iformer"):
        (tmp_path / code).symlink_to(ROOT / code)
    for name in ("dvc.yaml", "params.yaml", "field/dvc.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    field = tmp_path / "field" / "dvc.yaml"
    field.write_text(field.read_text().replace("      - pipeline/deploy/backends.py\n", ""))
    monkeypatch.setenv("IFORMER_ROOT", str(tmp_path))
    assert stage_deps.main([]) == 1
    assert "field: deps miss pipeline/deploy/backends.py" in capsys.readouterr().err
    assert stage_deps.main(["--write"]) == 0
    assert field.read_text() == (ROOT / "field" / "dvc.yaml").read_text()
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
