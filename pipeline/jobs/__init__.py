"""Sending pipeline runs to a Ray cluster as Ray jobs, and bringing their results home.

- `submit` (the user's side, `python -m pipeline.submit -- dvc repro`): packs
  the workspace as the job's `working_dir` (what `.gitignore`, `.rayignore`
  and `.dvcignore` leave out stays home), submits through Ray's Job SDK,
  streams the job's log, maps its end state to an exit status, stops the job
  on Ctrl-C, and on success unpacks the job's results into the workspace.
- `entry` (the job's side, on the cluster): runs the command and, when it
  succeeds, uploads the small results (dvc.lock, metrics, plots, manifests,
  histories, model files under a size limit) as one archive to the job's
  MLflow run on the shared tracking server, the one place both sides reach.
- `experiments` (`python -m pipeline.submit --exp ... --queue`): a set of DVC
  experiments, one Ray job each, all at once; each job `dvc exp push`es its
  experiment to a git remote and this side `dvc exp pull`s it into `dvc exp
  show`. `plan` reads and checks the set before anything is submitted.
"""
