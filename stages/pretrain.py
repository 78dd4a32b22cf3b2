"""DVC stage `pretrain`: pretrain an iFormer on Ray Train (optionally distilled)."""
from pipeline.classify import pretrain
from pipeline import stage

if __name__ == "__main__":
    stage.exit_with("pretrain", pretrain.check, pretrain.run, reopen=pretrain.interrupted_run)
