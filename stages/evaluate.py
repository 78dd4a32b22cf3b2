"""DVC stage `evaluate`: top-1/top-5 of the fused model on the validation split."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.classify import evaluate
    return stage.Work(evaluate.check, evaluate.run)


if __name__ == "__main__":
    stage.exit_with("evaluate", work)
