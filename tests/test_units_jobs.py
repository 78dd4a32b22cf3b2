"""`pipeline.jobs.plan`, which `pipeline.submit --exp/--queue` checks everything with before a job
is sent: the override splitting, the experiment names, the remote URL and the `dvc exp run`
arguments. A throw-away git repository holding only params.yaml and an empty `.dvc/`, and a bare
one as the remote: no cluster, no stage, no repo copy."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.jobs.plan import Experiment, exp_ref, parse_exp, plan, remote_url, run_args

ROOT = Path(__file__).resolve().parents[1]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """(a git checkout with this project's params.yaml and `.dvc/`, its bare remote, HEAD's commit)."""
    base = tmp_path_factory.mktemp("plan")
    remote, root = base / "remote.git", base / "checkout"
    git(base, "init", "-q", "--bare", str(remote))
    root.mkdir()
    git(root, "init", "-q")
    (root / ".dvc").mkdir()
    shutil.copyfile(ROOT / "params.yaml", root / "params.yaml")
    git(root, "add", "params.yaml")
    git(root, "commit", "-qm", "params")
    git(root, "remote", "add", "shared", str(remote))
    return root, remote, git(root, "rev-parse", "HEAD")


# -- overrides and names, as the user types them -------------------------------------------------
def test_parse_exp_takes_an_optional_name_and_the_overrides_as_given():
    named = parse_exp("fast", ["train.epochs=3", "optim.lr=0.002"], 2)
    assert (named.name, named.overrides, named.index, named.label) == (
        "fast", ["train.epochs=3", "optim.lr=0.002"], 2, "--exp 2 (fast)")
    unnamed = parse_exp(None, ["train.epochs=3"], 1)
    assert (unnamed.name, unnamed.overrides, unnamed.label) == ("", ["train.epochs=3"], "--exp 1")
    # Each -S is one override, whole: commas and colons are part of its value.
    assert parse_exp("x", ["data.root=C:/x,y", "aug.scale=[0.5,1.0]"], 1).overrides == [
        "data.root=C:/x,y", "aug.scale=[0.5,1.0]"]
    assert parse_exp("x", ["~distill"], 1).overrides == ["~distill"]  # Hydra's delete needs no `=`
    assert parse_exp("a" * 64, ["k=v"], 1).name == "a" * 64


@pytest.mark.parametrize("name, sets, message", [
    ("bad name", ["k=v"], "--exp 3 (bad name): 'bad name' is not an experiment name (letters, digits, - and _)"),
    ("-x", ["k=v"], "--exp 3 (-x): '-x' is not an experiment name"),  # a git option, not a ref name
    ("a/b", ["k=v"], "--exp 3 (a/b): 'a/b' is not an experiment name"),
    ("a" * 65, ["k=v"], "is not an experiment name"),
    ("lr=0.1", ["k=v"], "is not an experiment name (letters, digits, - and _); overrides go in -S K=V after it"),
    ("fast", ["train.epochs"], "--exp 3 (fast): 'train.epochs' is not KEY=VALUE"),
    ("fast", ["k=v", "oops"], "--exp 3 (fast): 'oops' is not KEY=VALUE"),
    ("fast", [], "--exp 3 (fast): no -S KEY=VALUE after it"),
    (None, [], "--exp 3: no -S KEY=VALUE after it"),
])
def test_parse_exp_rejects_bad_names_and_overrides_naming_the_option(name, sets, message):
    with pytest.raises(PipelineError) as err:
        parse_exp(name, sets, 3)
    assert message in str(err.value)


def test_exp_ref_is_where_dvc_keeps_an_experiment():
    assert exp_ref("0123456789abcdef0123456789abcdef01234567", "fast") == \
        "refs/exps/01/23456789abcdef0123456789abcdef01234567/fast"


def test_a_queued_experiment_is_labelled_by_its_queue_name():
    assert Experiment("q1", [], stash_rev="abc").label == "queued q1"


@pytest.mark.parametrize("command, args", [
    ([], []),
    (["dvc", "exp", "run"], []),
    (["dvc", "exp", "run", "pretrain", "--force"], ["pretrain", "--force"]),
])
def test_run_args_are_what_follows_dvc_exp_run(command, args):
    assert run_args(command) == args


@pytest.mark.parametrize("command, message", [
    (["dvc", "repro"], "after `--`: dvc repro: with --exp / --queue, the command is `dvc exp run [TARGETS...]`"),
    (["python", "-m", "x"], "the command is `dvc exp run"),
    (["dvc", "exp", "run", "-n", "x"], "after `--`: -n: set per experiment by this command; not allowed here"),
    (["dvc", "exp", "run", "--name=x"], "after `--`: --name=x: set per experiment"),
    (["dvc", "exp", "run", "-S", "a=1"], "after `--`: -S: set per experiment"),
    (["dvc", "exp", "run", "--queue"], "after `--`: --queue: set per experiment"),
    (["dvc", "exp", "run", "--temp"], "after `--`: --temp: set per experiment"),
    (["dvc", "exp", "run", "-j", "2"], "after `--`: -j: set per experiment"),
])
def test_run_args_refuse_other_commands_and_the_flags_the_tool_sets(command, message):
    with pytest.raises(PipelineError) as err:
        run_args(command)
    assert message in str(err.value)


# -- the remote ------------------------------------------------------------------------------------
def test_remote_url_from_a_remote_name_a_relative_path_the_environment_or_a_url(checkout, monkeypatch):
    root, remote, _ = checkout
    monkeypatch.delenv("IFORMER_GIT_REMOTE", raising=False)
    bare = str(remote.resolve())
    assert remote_url(root, "shared") == bare  # a remote of the checkout
    assert remote_url(root, "../remote.git") == bare  # a path, from the checkout (not the current directory)
    assert remote_url(root, remote.as_uri()) == remote.as_uri()  # a URL stays as given
    monkeypatch.setenv("IFORMER_GIT_REMOTE", "shared")
    assert remote_url(root, None) == bare
    assert remote_url(root, "../remote.git") == bare, "the option wins over the environment"


def test_remote_url_refuses_none_a_password_and_an_unreadable_remote(checkout, monkeypatch):
    root, _, _ = checkout
    monkeypatch.delenv("IFORMER_GIT_REMOTE", raising=False)
    with pytest.raises(PipelineError, match=r"^--git-remote / IFORMER_GIT_REMOTE: not set; name a git remote"):
        remote_url(root, None)
    with pytest.raises(PipelineError, match="has a password in it; give the nodes SSH keys") as err:
        remote_url(root, "https://me:s3cret@git.example.com/exps.git")
    assert "s3cret" not in str(err.value), "the password must not reach the console"
    monkeypatch.setenv("IFORMER_GIT_REMOTE", "https://me:s3cret@git.example.com/exps.git")
    with pytest.raises(PipelineError, match="has a password in it"):
        remote_url(root, None)
    missing = (root / "../nowhere.git").resolve()
    with pytest.raises(PipelineError, match=re.escape(f"IFORMER_GIT_REMOTE: {missing} cannot be read (")):
        remote_url(root, "../nowhere.git")


# -- plan: validation against params.yaml and the names already taken -------------------------------
def test_plan_names_the_unnamed_and_keeps_the_given_names(checkout):
    root, remote, head = checkout
    baseline, exps = plan(root, [("fast", ["train.epochs=3"]), (None, ["train.epochs=4"]), (None, ["train.epochs=5"])],
                           False, str(remote))
    assert baseline == head
    assert exps[0].name == "fast" and [e.overrides for e in exps] == [["train.epochs=3"], ["train.epochs=4"],
                                                                      ["train.epochs=5"]]
    generated = [e.name for e in exps[1:]]
    assert all(n and n != "fast" for n in generated) and len(set(generated)) == 2
    assert all(len(n.split("-")) == 2 for n in generated), "DVC's generator names them adjective-noun"


@pytest.mark.parametrize("specs, message", [
    ([(None, ["train.nope=1"])], "--exp 1: Could not override 'train.nope'"),  # Hydra, as `dvc exp run -S` would say
    ([("a", ["train.epochs=many"])], "--exp 1 (a): train.epochs = 'many'"),  # the schema, naming the field
    ([("a", ["train.epochs=3"]), ("b", ["train.epochs=3", "latency.runs=7"])],
     "--exp 2 (b): trains exactly as --exp 1 (a) (same model/data/aug/optim/schedule/train/distill params)"),
    ([("a", ["train.epochs=3"]), ("a", ["train.epochs=4"])], "--exp 2 (a): the name is given twice"),
])
def test_plan_refuses_overrides_the_pipeline_would_refuse_and_repeated_names(checkout, specs, message):
    root, remote, _ = checkout
    with pytest.raises(PipelineError) as err:
        plan(root, specs, False, str(remote))
    assert str(err.value).startswith(message)


def test_plan_refuses_a_name_taken_on_this_commit_here_or_on_the_remote(checkout):
    root, remote, head = checkout
    git(root, "update-ref", exp_ref(head, "taken-here"), head)
    git(root, "push", "-q", str(remote), f"HEAD:{exp_ref(head, 'taken-there')}")
    with pytest.raises(PipelineError, match=r"^--exp 1 \(taken-here\): an experiment of this name already exists on "
                                            r"this commit here; pick another name"):
        plan(root, [("taken-here", ["train.epochs=3"])], False, str(remote))
    with pytest.raises(PipelineError, match="^" + re.escape(f"--exp 2 (taken-there): an experiment of this name already "
                                                            f"exists on this commit on {remote}; pick another name")):
        plan(root, [("free", ["train.epochs=3"]), ("taken-there", ["train.epochs=4"])], False, str(remote))


def test_plan_needs_the_main_checkout(tmp_path):
    with pytest.raises(PipelineError, match="^" + re.escape(f"{tmp_path}: not the main checkout of a git repository")):
        plan(tmp_path, ["train.epochs=3"], False, "unused")
