"""DVC stage `prepare`: list (or, by default, make) the image data set."""
from pipeline.classify import prepare
from pipeline import stage

if __name__ == "__main__":
    stage.exit_with("prepare", prepare.check_prepare, prepare.run_prepare)
