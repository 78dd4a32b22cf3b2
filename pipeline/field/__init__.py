"""The measured field: the paper's comparison (Fig. 1, Table 3) timed on this host, without training.

`measured` is the `field` stage (its own `field/dvc.yaml`, off the default
`dvc repro`): the paper's networks through the deployment path of
`pipeline.deploy.bench`, their measured Pareto fronts and how each backend
ranks them against the paper's iPhone 13.
"""
