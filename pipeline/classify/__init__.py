"""Image classification: the `prepare`, `pretrain` and `evaluate` stages.

`prepare` (the data sources, `SOURCES`, listed into sample lists), `datasets`
(what training and evaluation read: `Prepared`, `ImageListDataset`, timm's
transforms), `worker` (the training loop each Ray Train worker runs, read top
to bottom), `pretrain` (the stage: a Ray Train run of that loop, or released
weights passed through) and `evaluate` (accuracy, parameters and GMACs).
"""
