"""DVC stage `latency`: the exported models timed on iPhone, Mac, ONNX Runtime and torch."""
from pipeline import stage


def work() -> stage.Work:
    from pipeline.deploy import latency
    return stage.Work(latency.check, latency.run)


if __name__ == "__main__":
    stage.exit_with("latency", work)
