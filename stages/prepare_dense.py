"""DVC stage `prepare_dense`: the detection and segmentation data (digit scenes, or COCO / ADE20K checked)."""
from pipeline import stage
from pipeline.dense import prepare

if __name__ == "__main__":
    stage.exit_with("prepare_dense", prepare.check, prepare.run)
