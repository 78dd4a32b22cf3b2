"""DVC stage `finetune_coco`: Mask R-CNN with the iFormer backbone (MMDetection on Ray Train)."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.dense import finetune
    return stage.Work(finetune.check_stage("finetune_coco"), finetune.run_stage("finetune_coco"),
                      reopen=finetune.interrupted_run)


if __name__ == "__main__":
    stage.exit_with("finetune_coco", work)
