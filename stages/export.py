"""DVC stage `export`: Core ML and ONNX files of the trained network, with op census."""
from pipeline import stage
from pipeline.deploy import export

if __name__ == "__main__":
    stage.exit_with("export", export.check, export.run)
