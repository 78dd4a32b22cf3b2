"""DVC stage `report`: markdown/JSON summary beside the paper's reference row."""
from pipeline import report, stage

if __name__ == "__main__":
    stage.exit_with("report", report.check, report.run)
