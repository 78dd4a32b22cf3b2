"""A stage process's exit (`lifecycle.exit_now`): what Python owes at exit happens, its teardown does not."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    if sys.argv[2] == "ray":  # a process that started Ray: the ordinary exit
        lifecycle.keep_teardown()
    if sys.argv[2] in ("now", "ray"):
        lifecycle.exit_now(3)
    sys.exit(3)
""")


@pytest.mark.parametrize("how", ["now", "ray", "sys.exit"])
def test_exit_now_does_the_exits_duties_and_skips_the_teardown(tmp_path, how):
    out = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path), how], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "no newline, still buffered" and out.stderr == ""
    assert (tmp_path / "atexit").is_file() and (tmp_path / "thread").is_file()
    # The control (an ordinary exit) frees the module's objects; exit_now leaves that to the OS, except
    # in a process that started Ray.
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
