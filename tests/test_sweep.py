"""`python -m pipeline.sweep`: a 4-trial ASHA search on the 2-node loopback cluster; a latency-aware sweep on the local Ray."""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from cluster_fixture import cluster_repo
from conftest import TINY, make_repo
from pipeline.tracking import runs
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.sweep import TAG_EARLY, TAG_TRIAL
from pipeline.sweep import objective as sweep_latency
from pipeline.sweep.search import param_space, with_room_for_trials


@pytest.mark.slow
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
    assert parent.info.status == "FINISHED" and parent.data.tags[runs.TAG_KIND] == "sweep"
    assert parent.data.metrics["trials"] == 4
    assert parent.data.metrics["best_val_top1"] == pytest.approx(best["value"])
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`{runs.TAG_PARENT}` = '{parent.info.run_id}'")
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


def _trial(trial, variant, top1, ms):
    return {"trial": trial, "values": {"model.variant": variant}, "val_top1": top1, "latency_ms": ms}


def test_the_pareto_front_keeps_the_trials_nothing_beats_on_both_axes():
    rows = [_trial("a", "iformer_t", 0.80, 5.0), _trial("b", "iformer_t", 0.85, 5.0),
            _trial("c", "iformer_m", 0.84, 9.0), _trial("d", "iformer_m", 0.91, 9.0), _trial("e", "iformer_s", 0.90, 7.0),
            _trial("f", "iformer_t", 0.85, 5.0)]  # ties b: equal points are both undominated
    assert [r["trial"] for r in sweep_latency.front(rows, "val_top1")] == ["b", "f", "e", "d"]


def test_a_budget_leaves_the_slower_variants_out_and_none_within_it_is_one_error():
    cfg = Config.model_validate({"sweep": {"space": {"variant": ["iformer_t", "iformer_m"]},
                                           "latency": {"backend": "torch", "budget_ms": 6.0}}})
    timed = {"iformer_t": {"median": 4.2}, "iformer_m": {"median": 11.0}}
    assert sweep_latency.within_budget(cfg, timed) == ["iformer_t"]
    assert sorted(param_space(cfg, ["iformer_t"])["model.variant"].categories) == ["iformer_t"]
    with pytest.raises(PipelineError, match=r"sweep.latency.budget_ms: .*over 6 ms on torch \(iformer_t 8.00 ms, iformer_m 11.00 ms\)"):
        sweep_latency.within_budget(cfg, {"iformer_t": {"median": 8.0}, "iformer_m": {"median": 11.0}})


@pytest.mark.slow
def test_a_latency_sweep_times_each_variant_and_records_the_pareto_front_of_its_trials(tmp_path):
    repo = make_repo(tmp_path / "repo", {**TINY, "train": {"epochs": 1, "log_every_batches": 50},
                                         "latency": {"runs": 5, "warmup": 1},
                                         "sweep": {"space": {"variant": ["iformer_t", "iformer_s"]},
                                                   "latency": {"backend": "onnxruntime", "size": 64},
                                                   "num_samples": 3, "max_concurrent_trials": 1, "epochs": 1}})
    repo.stage("prepare")
    out = repo.run(sys.executable, "-m", "pipeline.sweep", timeout=1200)
    best = yaml.safe_load((repo.path / "artifacts/sweep/best.yaml").read_text())
    client = repo.mlflow_client()
    parent = client.get_run(best["mlflow_parent_run_id"])
    art = Path(parent.info.artifact_uri.removeprefix("file://")) / "sweep"
    timed = json.loads((art / "latency.json").read_text())
    assert sorted(timed) == ["iformer_s", "iformer_t"]
    assert all(t["median"] > 0 and t["ran_on"]["provider"] == "CPUExecutionProvider" for t in timed.values())
    trials = json.loads((art / "trials.json").read_text())
    assert len(trials) == 3
    for t in trials:  # each trial carries its variant's latency, in trials.json and on its MLflow run
        assert t["latency_ms"] == timed[t["values"]["model.variant"]]["median"]
        assert client.get_run(t["mlflow_run_id"]).data.metrics["latency_ms"] == pytest.approx(t["latency_ms"])
    spans = sorted((r.info.start_time, max(m.timestamp for m in client.get_metric_history(r.info.run_id, "val_top1")))
                   for r in (client.get_run(t["mlflow_run_id"]) for t in trials))
    assert all(later[0] > earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # one trial at a time
    front = json.loads((art / "pareto.json").read_text())
    dominated = [t for t in trials if any(o["latency_ms"] <= t["latency_ms"] and o["val_top1"] >= t["val_top1"]
                                          and (o["latency_ms"], o["val_top1"]) != (t["latency_ms"], t["val_top1"])
                                          for o in trials)]
    assert {t["trial"] for t in front} == {t["trial"] for t in trials if t not in dominated}
    assert parent.data.metrics["pareto_trials"] == len(front) and (art / "pareto.png").stat().st_size > 5000
    assert best["latency_ms"] == timed[best["params"]["model"]["variant"]]["median"]
    assert "Pareto front: trial" in out.stderr

    # A budget nothing meets: one error line before any trial, the sweep's run closed as failed.
    repo.set_params({"sweep": {"latency": {"budget_ms": 0.001}}})
    err = repo.run(sys.executable, "-m", "pipeline.sweep", check=False, timeout=600)
    assert err.returncode == 2 and "Traceback" not in err.stderr
    assert [line for line in err.stderr.splitlines() if line.startswith("error:")] == [
        line for line in err.stderr.splitlines() if line.startswith("error: sweep.latency.budget_ms: every variant")]
    assert "RUNNING" not in {r.info.status for r in repo.runs()}


def test_a_local_sweep_has_a_logical_cpu_more_for_its_trial_drivers(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = with_room_for_trials(Config())  # 2 CPUs per worker by default: 2.01 per trial
    assert local.ray.local_num_cpus == (os.cpu_count() or 1) + 1
    assert with_room_for_trials(Config.model_validate({"ray": {"local_num_cpus": 4}})).ray.local_num_cpus == 4
    remote = Config.model_validate({"ray": {"address": "ray://127.0.0.1:10001"}})
    assert with_room_for_trials(remote).ray.local_num_cpus is None
