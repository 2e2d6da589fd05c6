"""Timers and machine probes.

Shared machines are noisy, so every comparison is measured side by side: the backends of one model and
batch take turns in rounds (and the carried/re-fed decodings alternate block by block), so a burst of
load from a neighbour lands on all of them alike. Warm-up calls are never timed. A timed GPU call ends
with the logits on the host and `torch.cuda.synchronize()`, so kernels still queued are never missed.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from export.runtime import Runtime
from serve.bench.backends import synchronize
from train.checkpoint import load_checkpoint
from train.sampling import BatchSampler, Uniforms, generate, generate_refeed

QUANTILES = (50, 90, 99)


def summary_us(seconds: np.ndarray, per: int = 1) -> dict:
    """p50/p90/p99/mean in microseconds of the samples (seconds), each divided by `per`."""
    us = np.asarray(seconds, np.float64) * 1e6 / per
    return {**{f"p{q}": float(v) for q, v in zip(QUANTILES, np.percentile(us, QUANTILES))}, "mean": float(us.mean())}


@dataclass
class Subject:
    """One backend's runtime of the model under test."""
    name: str
    device: str
    precision: str
    runtime: Runtime
    threads: int = 1  # torch's intra-op threads while it runs (an onnxruntime session has its own, fixed)

    @property
    def key(self) -> str:
        return f"{self.name} {self.precision} t{self.threads}"

    def activate(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


def time_steps(subjects: list[Subject], batch: int, seconds: float, max_calls: int, min_calls: int = 20,
               rounds: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Seconds per `step` call by Subject.key, one token per stream (tokens (batch, 1)), the state carried.

    Each subject gets about `seconds` of timed calls (min_calls..max_calls, sized from its warm-up),
    split into `rounds` turns taken in rotating order: each backend spends the same share of any burst of
    load from elsewhere."""
    vocab = len(subjects[0].runtime.vocab)
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, 1), dtype=np.int64)  # (B, 1)
    states, calls = {}, {}
    for s in subjects:
        rt = s.runtime
        s.activate()
        state = rt.new_state(batch)
        _, state = rt.step(tokens, state)  # the first call may build or capture: never timed
        synchronize(s.device)
        warm, t_end = [], time.perf_counter() + min(0.5, max(0.05, seconds / 5))
        while len(warm) < 5 or (time.perf_counter() < t_end and len(warm) < 1000):
            t0 = time.perf_counter()
            _, state = rt.step(tokens, state)
            synchronize(s.device)
            warm.append(time.perf_counter() - t0)
        states[s.key] = state
        calls[s.key] = int(np.clip(seconds / np.median(warm), min(min_calls, max_calls), max_calls))
    times: dict[str, list[float]] = {s.key: [] for s in subjects}
    rounds = max(1, min(rounds, min(calls.values())))
    for r in range(rounds):
        for s in subjects[r % len(subjects):] + subjects[: r % len(subjects)]:
            rt, state, out = s.runtime, states[s.key], times[s.key]
            s.activate()
            for _ in range(-(-calls[s.key] // rounds)):  # ceil
                t0 = time.perf_counter()
                _, state = rt.step(tokens, state)
                synchronize(s.device)
                out.append(time.perf_counter() - t0)
            states[s.key] = state
    return {name: np.asarray(ts) for name, ts in times.items()}


def time_loop(rt: Runtime, chars: int, batch: int = 1, temperature: float = 1.0, warmup: int = 10) -> np.ndarray:
    """Seconds per call of the in-process generation loop a user would write around a runtime: `batch` streams,
    each character sampled from the last logits as the server samples (train.sampling.BatchSampler, prepared
    once, a generator per stream) and fed to the next `step`, the state carried; `chars` calls. What the
    server's streams are compared with: one stream's time per character, and what batching gives without gRPC."""
    tokens = np.zeros((batch, 1), np.int64)
    logits, state = rt.step(tokens, rt.new_state(batch))
    sample = BatchSampler([temperature] * batch, [0] * batch, [1.0] * batch, [Uniforms(i) for i in range(batch)],
                          logits.shape[1])
    times = []
    for _ in range(warmup + chars):
        t0 = time.perf_counter()
        tokens[:, 0] = sample(logits)
        logits, state = rt.step(tokens, state)  # logits come back to the host: the call is complete
        times.append(time.perf_counter() - t0)
    return np.asarray(times[warmup:])


def decoding_prompt(vocab, length: int, seed: int = 0) -> str:
    """A fixed text of the model's characters: re-feeding's windows are full from the first character."""
    ids = np.random.default_rng(seed).integers(0, len(vocab), length)
    return vocab.decode(ids)


def time_decoding(ckpt_dir: Path, seq_lens: tuple[int, ...], chars: int, block: int = 25
                  ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Seconds per character, per block of `block` characters: greedy carried-state generation
    (train.sampling.generate, from a one-character prompt: one step per character plus one) and the
    seed's re-feeding (train.sampling.generate_refeed) at each window length, alternating block by block."""
    ckpt = load_checkpoint(ckpt_dir)
    model, vocab = ckpt.model.eval(), ckpt.vocab
    prompt = decoding_prompt(vocab, max(seq_lens))
    generate(model, vocab, prompt[-1], 5)  # warm-up
    for n in seq_lens:
        generate_refeed(model, vocab, prompt, 2, n)
    carried, refeed = [], {n: [] for n in seq_lens}
    for _ in range(max(1, chars // block)):
        t0 = time.perf_counter()
        generate(model, vocab, prompt[-1], block, temperature=0.0)
        carried.append((time.perf_counter() - t0) / block)
        for n in seq_lens:
            t0 = time.perf_counter()
            generate_refeed(model, vocab, prompt, block, n)
            refeed[n].append((time.perf_counter() - t0) / block)
    return np.asarray(carried), {n: np.asarray(v) for n, v in refeed.items()}


# --- what the machine allows ----------------------------------------------------------------------

def _best_rate(work: float, fn, device: str, seconds: float, min_reps: int = 5) -> float:
    """work / the fastest of fn()'s runs (after a warm-up), repeated for about `seconds`: a limit is what the
    machine can do, and load from elsewhere only ever slows a run down."""
    fn()
    synchronize(device)
    ts, t_end = [], time.perf_counter() + seconds
    while len(ts) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        ts.append(time.perf_counter() - t0)
    return work / min(ts)


def bandwidth(working_set: int, device: str = "cpu", seconds: float = 0.2) -> dict:
    """Memory bandwidth, bytes/s, over a working set of `working_set` bytes touched over and over (as steps
    read their weights over and over: a working set that fits a cache runs at the cache's speed).

    Two probes with torch (on the intra-op threads set for the run): `copy`, a copy whose source and
    destination together span the working set (bytes read plus written, STREAM's convention), and `read`,
    a sum over it (bytes read). `best` is the faster: the strictest limit for a step, which only reads."""
    n = max(working_set // 8, 1024)  # float32s in each of the two copy buffers
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    whole = torch.rand(2 * n, device=device)
    # several passes per timing when they are small, so the cost of a call (a kernel launch, on a GPU) is noise
    reps = max(1, int((1.6e6 if device == "cpu" else 1e9) // (8 * n)))

    def copy():
        for _ in range(reps):
            dst.copy_(src)

    def read():
        for _ in range(reps):
            whole.sum()

    rates = {"copy": _best_rate(8.0 * n * reps, copy, device, seconds / 2),
             "read": _best_rate(8.0 * n * reps, read, device, seconds / 2)}
    return {**rates, "best": max(rates.values())}


def matmul_rate(device: str = "cpu", n: int = 1024, dtype=torch.float32, seconds: float = 0.5,
                threads: int = 1) -> dict:
    """Matrix-multiply throughput, FLOP/s, of an n x n x n product: torch's BLAS and, on the CPU, onnxruntime's
    MLAS at the same thread count (on some CPUs one is clearly faster: MKL on AMD, say). `best`: the faster."""
    a, b = torch.rand(n, n, device=device, dtype=dtype), torch.rand(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    rates = {"torch": _best_rate(2.0 * n ** 3, lambda: torch.mm(a, b, out=c), device, seconds)}
    if device == "cpu" and dtype == torch.float32:
        try:
            rates["onnxruntime"] = _ort_matmul_rate(n, threads, seconds)
        except ImportError:
            pass
    return {**rates, "best": max(rates.values())}


def _ort_matmul_rate(n: int, threads: int, seconds: float) -> float:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(rng.random((n, n), np.float32), "b")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.random((n, n), np.float32)
    return _best_rate(2.0 * n ** 3, lambda: session.run(None, {"a": a}), "cpu", seconds)


# --- the machine, described -----------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_name() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _caches() -> dict:
    """{'L1d': '32K', 'L2': '512K', 'L3': '32768K'} from sysfs (cpu0), where the kernel exposes it."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind, size = (_read(str(index / f)).strip() for f in ("level", "type", "size"))
        if level and size:
            out[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = size
    return out


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def describe_machine() -> dict:
    mem = next((line.split()[1] for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), None)
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
               "compute_capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    try:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
                "grpcio": _version("grpcio"), "protobuf": _version("protobuf"), "tensorrt": _version("tensorrt")}
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(int(mem) / 2**20, 1) if mem else None, "caches": _caches(), "gpu": gpu,
        "os": platform.platform(), "versions": versions, "onnxruntime_providers": providers,
        "torch_blas": "MKL" if torch.backends.mkl.is_available() else "other",
    }


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
