"""`python -m pipeline.sweep`: a Ray Tune search over the pretrain loop, tracked in MLflow.

Each trial draws values for the `sweep.space` fields from params.yaml's
ranges and choices and trains them with the pretrain loop as a `TorchTrainer`
of its own (Train V2: Tune runs a small driver function per trial,
`tune.with_resources(trial, {"CPU": 0.01})`, and the trainer's workers take
the trial's real CPUs). ASHA stops weak trials early on `sweep.metric`.

MLflow: one sweep parent run (the search space, the best trial) and one child
run per trial (its values and per-epoch metrics, logged by the workers as in
pretrain); a trial ASHA stopped is tagged `iformer.early_stopped`. The best
trial's values go to `artifacts/sweep/best.yaml` as a params fragment (merge
its `params` into params.yaml, or make a recipe of it), with
`artifacts/sweep/manifest.json` written last.

Latency (`sweep.latency`, see `objective`): every variant the search may draw
is timed once before training; with `budget_ms`, the slower ones are left
out of the search. Each trial then carries its model's `latency_ms`, and the
parent run records the trials' accuracy-latency Pareto front
(`sweep/pareto.json`, `sweep/pareto.png`, tag `iformer.pareto_trials`).

Needs the prepare stage's output. Distillation and released weights
(`model.weights`) are not swept. Each running
trial holds 0.01 CPU besides its workers' `ray.cpus_per_worker`: on nodes
with a whole number of CPUs, ask for a little less than a whole CPU per worker
(e.g. 0.5) or a node never has room for a worker next to a trial. Seen with
Ray 2.60 on the loopback test cluster: the placement group of a trial that
ASHA stopped can stay reserved after the trial is gone, so leave headroom.
"""
from .search import STAGE, TAG_EARLY, TAG_TRIAL, check, run

__all__ = ["STAGE", "TAG_EARLY", "TAG_TRIAL", "check", "run"]
