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
