"""Per-step cost of the serving core's decode bookkeeping, on a stand-in runtime (fixed logits, no model).

    python scripts/steptime.py TREE ROWS CHUNK REPEATS STEPS

prints the median and least CPU us per step over REPEATS runs of STEPS steps. TREE is a checkout's root:
its serve.batch (the new core) or serve.streams (the old core, 4e9ec72) is timed (docs/performance.md).
Rows sample at temperature 1.0 (as serve.bench), max_chars never reached, metrics on (as the worker does).
"""
import statistics
import sys
import time

tree, rows, chunk, repeats, steps = sys.argv[1], *map(int, sys.argv[2:6])
sys.path.insert(0, tree)
import numpy as np  # noqa: E402

from serve.metrics import ModelMetrics  # noqa: E402
from serve.types import GenerateRequest, SessionState  # noqa: E402
from train.vocab import Vocab  # noqa: E402

V = 65
vocab = Vocab("".join(chr(32 + i) for i in range(V)))
LOGITS = np.random.default_rng(0).standard_normal((256, V)).astype(np.float32)


class StandIn:
    vocab = vocab

    def step(self, tokens, state):
        return LOGITS[:len(tokens)], state

    def concat(self, states):
        return np.concatenate(states)

    def take(self, state, rows):
        return state[rows]


rt = StandIn()
reqs = [GenerateRequest("m", "ab", max_chars=10**9, temperature=1.0, seed=i, chunk_chars=chunk) for i in range(rows)]
metrics = ModelMetrics()

try:
    from serve.batch import Batch, Prefilled, Row

    def make():
        token = np.array([3]) if "tokens" in Prefilled.__dataclass_fields__ else 3  # after 281e631: the tokens to feed
        return Batch.from_requests([Prefilled(Row(i, r, SessionState.NONE, 0.0), token, np.zeros((1, 4), np.float32),
                                              10**9) for i, r in enumerate(reqs)], rt)

    def run(batch, n):
        clock = time.perf_counter
        for _ in range(n):
            batch.step(rt, clock, metrics)
except ImportError:  # the old core: GenerationStream (scalar, below VECTOR_ROWS rows) or GenerationRows
    from serve.streams import GenerationStream

    def make():
        streams = [GenerationStream(np.array([3], np.int64), None, r, vocab, SessionState.NONE, 0.0, metrics)
                   for r in reqs]
        return GenerationStream.rows(streams)

    def run(group, n):
        clock = time.perf_counter
        for _ in range(n):
            logits, _ = rt.step(group.tokens()[:, None], None)
            group.advance(logits, clock())

per = []  # CPU time of this process per step (the machine is shared: wall time counts others' work)
b = make()
run(b, 200)  # warm
for _ in range(repeats):
    t0 = time.process_time()
    run(b, steps)
    per.append((time.process_time() - t0) / steps * 1e6)
print(f"median {statistics.median(per):6.2f} min {min(per):6.2f}")
