"""DVC stage `prepare_dense`: the detection and segmentation data (digit scenes, or COCO / ADE20K checked)."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.dense import prepare
    return stage.Work(prepare.check, prepare.run)


if __name__ == "__main__":
    stage.exit_with("prepare_dense", work)
