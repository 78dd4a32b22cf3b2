"""Dense fine-tuning: COCO Mask R-CNN (MMDetection) and ADE20K Semantic FPN (MMSegmentation).

Owns the `prepare_dense`, `finetune_coco` and `finetune_ade20k` stages:
`prepare` (data: digit scenes or COCO/ADE20K checked, via `scenes` and
`datasets`), `configs` (mmengine config dicts built from params.yaml;
the paper's settings are `config.presets`; `configs.register` adds the types
they name), `roi_align` (Mask R-CNN's RoIAlign with a backward pass on every
CPU thread), `amp` (training steps under autocast, `*.train.amp`), `worker` (the mmengine Runner on
Ray Train workers, with `hooks` for Ray checkpoints and MLflow losses),
`finetune` (the stages' check/run), `samples` (prediction images) and `mmengine_checkpoints`
(mmengine checkpoints under torch's weights-only loading). OpenMMLab is
imported only where it is used, never by `import pipeline` or `import iformer`.
"""
