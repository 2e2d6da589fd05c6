"""Throughput of one worker serving one model, then two at once (docs/performance.md, "One thread per worker").

    python scripts/two_models.py TREE MODEL_DIR [STREAMS] [CHUNK] [ROUNDS]

MODEL_DIR is an exported model (a directory with model.onnx). It is served twice, as `a` and `b`, by
`python -m serve --workers 1 --backend onnxruntime --threads 1` run from TREE (a checkout's root); each
round times STREAMS streams of 4,000 characters (CHUNK a message) on `a` alone, then STREAMS on each of
`a` and `b` together, and prints the total characters per second of each.
"""
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

tree, model_dir = sys.argv[1], Path(sys.argv[2])
streams, chunk, rounds = [int(a) for a in sys.argv[3:6]] + [32, 16, 3][len(sys.argv[3:6]):]
sys.path.insert(0, tree)
from protos.charrnn.v1 import charrnn_pb2 as pb  # noqa: E402
from protos.charrnn.v1 import charrnn_pb2_grpc as pb_grpc  # noqa: E402


async def stream(stub, model: str, seed: int) -> int:
    request = pb.GenerateRequest(model=model, prompt="The ", max_chars=4000, temperature=1.0, seed=seed,
                                 chunk_chars=chunk)
    return sum([len(r.text) async for r in stub.Generate(request)])


async def measure(port: int) -> list[tuple[int, float]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for _ in range(120):  # the server is opening its models
            try:
                await stub.ListModels(pb.ListModelsRequest())
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
        out = []
        for _ in range(rounds):
            for models in (["a"], ["a", "b"]):
                t = time.perf_counter()
                chars = await asyncio.gather(*(stream(stub, m, i) for m in models for i in range(streams)))
                out.append((len(models), sum(chars) / (time.perf_counter() - t)))
        return out


with tempfile.TemporaryDirectory() as root:
    for name in ("a", "b"):
        shutil.copytree(model_dir, Path(root) / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "serve", "--models", root, "--port", str(port), "--http-port",
                               "0", "--threads", "1", "--workers", "1", "--backend", "onnxruntime"],
                              cwd=tree, stderr=subprocess.DEVNULL)
    try:
        results = asyncio.run(measure(port))
    finally:
        server.terminate()
        server.wait()
for n in (1, 2):
    print(f"{n} model(s) busy: " + ", ".join(f"{v:,.0f}" for k, v in results if k == n) + " chars/s")
