"""DVC stage `latency`: the exported models timed on iPhone, Mac, ONNX Runtime and torch."""
from pipeline import stage
from pipeline.deploy import latency

if __name__ == "__main__":
    stage.exit_with("latency", latency.check, latency.run)
