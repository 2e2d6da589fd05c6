"""The generation server (python -m serve): the gRPC edge (server) and the HTTP edge (http: OpenAI-compatible
completions, the playground) on one event loop, the front end's requests and limits
(engine), its handle on each worker (link), the model side that owns runtimes, batches and sessions
(worker, batch, sessions), the messages between them (messages); runtimes by backend (backends), settings
(config), plain types (types), errors (errors), metrics (metrics).

One character, from the model to the socket:
1. `Batch.step` (serve.batch) runs `runtime.step` on every row and samples the character; when its row's
   chunk is full (or the stream ends) it is a generation of the step.
2. `Model.turn` (serve.worker) puts the step's generations of every stream in one `Generations` message,
   which `worker_main` writes, pickled once, onto the worker's socket (a process's, or with `--workers 0` a
   thread's in the server's process).
3. The link (serve.link) reads it on the event loop and calls `Engine._dispatch`, which puts each text on
   its stream's queue.
4. `Engine.generate` (serve.engine) takes it (with everything queued, when coalescing), yields it as a
   `Chunk`, and grants the stream more credit as its client takes messages.
5. `GeneratorServicer.Generate` (serve.server) maps it to protobuf and awaits `context.write`.
"""
