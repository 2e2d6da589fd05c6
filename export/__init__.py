"""Checkpoint -> exported step models, each checked against eager PyTorch before it counts as done.

    python -m export --engine onnx|trt|triton --checkpoint PATH [--out DIR]    export (see --help)
    python -m export.check PATH                                               re-run the parity check

Modules: runtime (the step protocol every backend implements), onnx (the ONNX step model), parity
(the check), int8 (int8 step models) and quality (their held-out acceptance), manifest (manifest.json:
provenance and "done"), tensorrt (engines and their runtime; needs an NVIDIA GPU), triton (a Triton model
repository), check and __main__ (the command lines). docs/export.md is the user's page.
"""
