"""A stage process's exit (`lifecycle.exit_now`): what Python owes at exit happens, its teardown does not;
what a local Ray left after its shutdown is ended first (`lifecycle.end_marked`)."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.core import lifecycle

ROOT = Path(__file__).resolve().parents[1]

EXITING = textwrap.dedent("""
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from pipeline.core import lifecycle

    out = Path(sys.argv[1])

    class Teardown:  # freed only when the interpreter tears its modules down
        def __del__(self):
            (out / "teardown").write_text("ran")

    kept = Teardown()
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def late():
        time.sleep(0.3)
        (out / "thread").write_text("ran")

    threading.Thread(target=late).start()  # not a daemon: the exit waits for it
    pool = ThreadPoolExecutor(1)  # its idle worker must be told to stop, or the exit hangs
    pool.submit(lambda: None).result()
    sys.stdout.write("no newline, still buffered")
    if sys.argv[2] == "now":
        lifecycle.exit_now(3)
    sys.exit(3)
""")


@pytest.mark.parametrize("how", ["now", "sys.exit"])
def test_exit_now_does_the_exits_duties_and_skips_the_teardown(tmp_path, how):
    out = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path), how], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "no newline, still buffered" and out.stderr == ""
    assert (tmp_path / "atexit").is_file() and (tmp_path / "thread").is_file()
    # The control (an ordinary exit) frees the module's objects; exit_now leaves that to the OS.
    assert (tmp_path / "teardown").exists() == (how != "now")


@pytest.mark.parametrize("argv, started", [
    (["python", "-m", "stages.evaluate"], True),
    (["python", "-X", "importtime", "-m", "stages.evaluate", "--params", "p.yaml"], True),
    (["python", "-m", "stages.evaluate_more"], False),
    (["python", "-m", "pytest", "-n", "2", "tests"], False),  # a stage run inside the tests' process
    (["python", "-c", "import sys;exec(eval(sys.stdin.readline()))"], False),  # an xdist worker
])
def test_only_a_process_started_as_the_stage_skips_the_teardown(monkeypatch, argv, started):
    from pipeline import stage

    monkeypatch.setattr(sys, "orig_argv", argv)
    assert stage._started_as("stages.evaluate") is started


def test_an_environment_whose_start_a_process_title_wiped_still_gives_the_variables_after_it():
    # As /proc/PID/environ of a live ray::DashboardAgent read (its title written over the first
    # variables): NUL bytes, a cut variable, then the rest intact. psutil's environ() gives {} here.
    raw = b"\0" * 200 + b"ATH=/usr/bin\0IFORMER_TEST_NODE=/tmp/rc-x/head\0A=b=c\0\0"
    assert lifecycle.parse_environ(raw) == {"ATH": "/usr/bin", "IFORMER_TEST_NODE": "/tmp/rc-x/head", "A": "b=c"}


def test_what_a_shut_down_ray_left_is_ended_before_the_stage_exits_and_nothing_else(tmp_path, orphan):
    # Orphans as the dashboard's forkserver is one after Ray's shutdown: re-parented to init, the
    # session's marker in its environment; one ignores SIGTERM (as Ray's dashboard agent does).
    marker = str(tmp_path / "auth_token")
    polite = orphan({"RAY_AUTH_TOKEN_PATH": marker})
    stubborn = orphan({"RAY_AUTH_TOKEN_PATH": marker}, ignore_term=True)
    other = orphan({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "another_ray" / "auth_token")})
    time.sleep(0.2)
    assert lifecycle.end_marked("RAY_AUTH_TOKEN_PATH", marker, grace=0.5) == 2
    time.sleep(0.1)
    assert not _running(polite) and not _running(stubborn)
    assert _running(other)  # another Ray's (another pipeline's) process is not ours to end
    assert lifecycle.end_marked("RAY_AUTH_TOKEN_PATH", marker, grace=0.5) == 0


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
