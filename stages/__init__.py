"""One module per DVC stage: `python -m stages.NAME` (see dvc.yaml)."""
