"""DVC stage `finetune_ade20k`: Semantic FPN with the iFormer backbone (MMSegmentation on Ray Train)."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.dense import finetune
    return stage.Work(finetune.check_stage("finetune_ade20k"), finetune.run_stage("finetune_ade20k"),
                      reopen=finetune.interrupted_run)


if __name__ == "__main__":
    stage.exit_with("finetune_ade20k", work)
