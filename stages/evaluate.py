"""DVC stage `evaluate`: top-1/top-5 of the fused model on the validation split."""
from pipeline.classify import evaluate
from pipeline import stage

if __name__ == "__main__":
    stage.exit_with("evaluate", evaluate.check, evaluate.run)
