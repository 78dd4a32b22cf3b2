"""Deployment: the `export` and `latency` stages.

`export` turns `artifacts/pretrain/model.pt` into what ships (Core ML ML Program
and ONNX, for the classifier and the dense backbone), checks the numerics
against torch, counts the ML Program's operations (`census`) and, on macOS,
records where Core ML would run them (`compute_plan`). `latency` times the
exported models on the backends in `latency.backends` (`backends`): an iPhone
through a macOS host, the Mac itself, ONNX Runtime and torch on the CPU.
"""
