"""The latency benchmark: `python -m serve.bench` (issue 5).

Every backend of the step protocol (`export.runtime.Runtime`) against eager PyTorch, carried-state
generation against the seed's re-feeding, the server end to end, and each step against what the
machine allows. Writes latency.md, latency.json (validated against schema.json) and PNG plots.

Modules: cli (options, the command), models (which checkpoints), backends (opening runtimes,
the CUDA-graph runtime), measure (timers, machine probes), grpc (server + load generator), floor (the
gRPC service with no model behind it: what the transport allows), report (speedups, limits, targets, and
the files).
"""
