"""The pipeline's machinery: sub-packages by concern, each importing only from those before it.

Layers, lowest first (`tests/test_architecture.py` checks them, with no import
circles, imports inside functions included, and no module over 350 lines):

1. `errors`: the one exception a rejected input becomes, and its `error:` line.
2. `config/`: the typed schema of params.yaml, the recipe table, the dense presets.
3. `core/`: what every stage shares below MLflow and Ray: where outputs live
   (`layout`), writing them all at once (`outputs`), the console, signals and
   the parent watchdog (`lifecycle`), weight files (`checkpoint`), DVC's view
   (`freshness`: which stages are stale; `deps`: dvc.yaml's deps from the imports),
   Pareto fronts and rank correlation (`fronts`).
4. `tracking/`: MLflow: the parent and stage runs (`runs`), who started them
   (`invocation`), the committed baseline, the store and the model registry.
5. `stage`: the stage contract, `check(cfg, root)` then `run(cfg, root, inputs, stage_run)`.
6. `compute/`: Ray: the cluster, Ray Train runs, the rendezvous and daemon niceness.
7. `classify/`: the classification stages: prepare, the datasets, the per-worker
   training loop, pretrain and evaluate.
8. `dense/` (the dense stages) and `deploy/` (export and latency, the latency
   backends, `bench`: any network timed through them).
9. `report/` (the report stage and the experiment table) and `field/` (the
   paper's networks timed on this host: the opt-in `field` stage).
10. `sweep/` (a Ray Tune search) and `jobs/` (runs sent to a cluster as Ray jobs).
11. The command-line modules a user types: `python -m pipeline.recipes`,
    `pipeline.exps`, `pipeline.store`, `pipeline.submit`, `pipeline.sweep`,
    `pipeline.stage_deps`: an argument parser and a `main` calling into the packages;
    `python -m pipeline` (`__main__`) lists them.
"""
