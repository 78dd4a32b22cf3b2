"""What every stage shares below MLflow and Ray.

`layout` (where each stage's outputs live), `outputs` (a stage's outputs replaced
all at once when it succeeds; its manifest), `console` (short `[stage]` lines,
library chatter to a log file), `environment` (the tools' telemetry and log
levels), `cpus` (the CPUs this process may run on), `spawned` (work spread over
spawned processes that die with the stage), `lifecycle` (signals, the
parent watchdog, locks), `checkpoint` (weight files: the pipeline's own, official
releases, timm state dicts), `integrity` (the sha256 a producing stage recorded,
verified by its readers; finite metrics), `freshness` (which stages DVC records
as stale), `deps` (dvc.yaml's code deps and params, read from what each stage
imports) and `fronts` (Pareto fronts, rank correlation).
"""
