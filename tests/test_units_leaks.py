"""The suite's leak check finds an orphaned Ray daemon of its own repos, and nothing else."""
import time

import leaks


def test_an_orphaned_agent_of_a_test_repo_is_found_and_others_are_not(tmp_path, orphan):
    ours = orphan({"IFORMER_ROOT": str(tmp_path / "repo")}, title="ray::DashboardAgent")
    elsewhere = orphan({"IFORMER_ROOT": "/somewhere/else"}, title="ray::DashboardAgent")
    not_ray = orphan({"IFORMER_ROOT": str(tmp_path / "repo")}, title="sleepy")
    time.sleep(0.3)
    found = {p.pid for p in leaks.orphans(str(tmp_path))}
    assert ours in found and not {elsewhere, not_ray} & found
