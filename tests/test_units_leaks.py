"""The suite's leak check finds an orphaned Ray daemon of its own repos, and nothing else."""
import os
import subprocess
import time

import leaks


def _orphan(name: str, root: str) -> int:
    """A process named `name`, re-parented to init (its shell exits at once), with IFORMER_ROOT=root."""
    script = f"exec -a '{name}' sleep 60 </dev/null >/dev/null 2>&1 & echo $!"  # no pipe held open
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={**os.environ, "IFORMER_ROOT": root})
    return int(out.stdout.strip())


def test_an_orphaned_agent_of_a_test_repo_is_found_and_others_are_not(tmp_path):
    ours = _orphan("ray::DashboardAgent", str(tmp_path / "repo"))
    elsewhere = _orphan("ray::DashboardAgent", "/somewhere/else")
    not_ray = _orphan("sleepy", str(tmp_path / "repo"))
    try:
        time.sleep(0.3)
        found = {p.pid for p in leaks.orphans(str(tmp_path))}
        assert ours in found and not {elsewhere, not_ray} & found
    finally:
        for pid in (ours, elsewhere, not_ray):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass



def test_an_environment_whose_start_a_process_title_wiped_still_gives_the_variables_after_it():
    # As /proc/PID/environ of a live ray::DashboardAgent read (its title written over the first
    # variables): NUL bytes, a cut variable, then the rest intact. psutil's environ() gives {} here.
    raw = b"\0" * 200 + b"ATH=/usr/bin\0IFORMER_TEST_NODE=/tmp/rc-x/head\0A=b=c\0\0"
    assert leaks.parse_environ(raw) == {"ATH": "/usr/bin", "IFORMER_TEST_NODE": "/tmp/rc-x/head", "A": "b=c"}
