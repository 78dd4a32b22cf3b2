"""DVC stage `report`: markdown/JSON summary beside the paper's reference row."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline import report
    return stage.Work(report.check, report.run)


if __name__ == "__main__":
    stage.exit_with("report", work)
