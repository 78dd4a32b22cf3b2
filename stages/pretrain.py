"""DVC stage `pretrain`: pretrain an iFormer on Ray Train (optionally distilled)."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.classify import pretrain
    return stage.Work(pretrain.check, pretrain.run, reopen=pretrain.interrupted_run)


if __name__ == "__main__":
    stage.exit_with("pretrain", work)
