"""DVC stage `export`: Core ML and ONNX files of the trained network, with op census."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.deploy import export
    return stage.Work(export.check, export.run)


if __name__ == "__main__":
    stage.exit_with("export", work)
