"""DVC stage `prepare`: list (or, by default, make) the image data set."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.classify import prepare
    return stage.Work(prepare.check_prepare, prepare.run_prepare)


if __name__ == "__main__":
    stage.exit_with("prepare", work)
