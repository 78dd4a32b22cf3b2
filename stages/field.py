"""DVC stage `field` (field/dvc.yaml, off the default path): the paper's networks timed on this host."""
from pipeline import stage
from pipeline.field import measured as field

if __name__ == "__main__":
    stage.exit_with("field", field.check, field.run)
