"""The generation server (python -m serve): the gRPC edge (server), requests and sessions (engine,
sessions), continuous batching (scheduler, streams), runtimes by backend (backends), settings (config)."""
