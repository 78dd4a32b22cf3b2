"""DVC stage `field` (field/dvc.yaml, off the default path): the paper's networks timed on this host."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.field import measured as field
    return stage.Work(field.check, field.run)


if __name__ == "__main__":
    stage.exit_with("field", work)
