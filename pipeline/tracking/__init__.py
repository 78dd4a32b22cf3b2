"""MLflow: one parent run per pipeline run, one child run per stage, and what they carry.

`runs` (the parent and stage runs, linked children for stages DVC skipped),
`invocation` (which `dvc` process started them), `baseline` (the params that
differ from the committed params.yaml), `store` (the tracking store reachable,
its artifact links after the repo moves) and `registry` (Model Registry versions).
"""
