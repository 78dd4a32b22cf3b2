"""`python -m pipeline.sweep`: a 4-trial ASHA search over the pretrain loop on the 2-node loopback cluster."""
import sys

import pytest
import yaml

from cluster_fixture import cluster, cluster_repo  # noqa: F401 (fixture)
from pipeline import tracking
from pipeline.sweep import TAG_EARLY, TAG_TRIAL

pytestmark = pytest.mark.slow


def test_an_asha_sweep_logs_each_trial_under_one_parent_and_writes_the_best_config(tmp_path, cluster):
    repo = cluster_repo(tmp_path / "repo", cluster, {
        # A 1-CPU node must hold a trial driver (0.01 CPU) beside its worker, and Ray 2.60 can keep
        # the placement group of a trial ASHA stopped reserved for a while: small worker requests.
        "ray": {"num_workers": 1, "cpus_per_worker": 0.25},
        "sweep": {"space": {"base_lr": [0.0005, 0.005], "weight_decay": [0.01, 0.1], "drop_path": [0.0, 0.1],
                            "batch_size": [32, 64]},
                  "num_samples": 4, "max_concurrent_trials": 2, "epochs": 2, "grace_period": 1},
    })
    repo.stage("prepare")
    out = repo.run(sys.executable, "-m", "pipeline.sweep", timeout=1500)
    best = yaml.safe_load((repo.path / "artifacts/sweep/best.yaml").read_text())
    assert (repo.path / "artifacts/sweep/manifest.json").is_file()

    client = cluster.mlflow.client()
    parent = client.get_run(best["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.TAG_KIND] == "sweep"
    assert parent.data.metrics["trials"] == 4
    assert parent.data.metrics["best_val_top1"] == pytest.approx(best["value"])
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent.info.run_id}'")
    assert len(trials) == 4 and len({t.data.tags[TAG_TRIAL] for t in trials}) == 4
    assert all(t.info.status == "FINISHED" for t in trials), [t.info.status for t in trials]
    for t in trials:  # per-epoch metrics from the trial's workers, one value per epoch
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "val_top1")]
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 2, steps
        assert (t.data.tags[TAG_EARLY] == "true") == (len(steps) < 2)
    winner = client.get_run(best["mlflow_run_id"])
    assert max(winner.data.metrics["val_top1"] for _ in [0]) == pytest.approx(best["value"])
    assert float(winner.data.params["optim.base_lr"]) == pytest.approx(best["params"]["optim"]["base_lr"])
    assert best["params"]["train"]["batch_size"] in (32, 64)
    assert "best: val_top1" in out.stderr
