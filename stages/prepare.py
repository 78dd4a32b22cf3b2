"""DVC stage `prepare`: list (or, by default, make) the image data set."""
from pipeline import data, stage

if __name__ == "__main__":
    stage.exit_with("prepare", data.check_prepare, data.run_prepare)
