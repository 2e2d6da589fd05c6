#!/usr/bin/env bash
# The prepared run for a session lent the device tool's GPU machine (nvidia-h200: 16 CPU cores, Python 3.12
# with a CUDA build of torch, onnx and onnxruntime (CPU) installed; nothing can be fetched there). TensorRT and
# onnxruntime-gpu are too large to carry (the tool carries 64 MiB), so their checks skip with the reason.
#
# Here, once: the serving wheels the machine lacks, for Python 3.12, into .whl/ (7.4 MB; ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl grpcio==1.85.3 grpcio-health-checking==1.85.1 \
#       grpcio-reflection==1.85.1 protobuf==7.36.2
# There: the device tool's run, carry [".whl"], timeout_s 600, command `bash scripts/device_check.sh`.
#
# Each step has its own time limit; logs and reports go to $OUT (at most 8 files come back):
#   gpu-check   scripts/gpu_check.sh with QUICK=1: parity and timings of every runtime this machine has, the
#               GPU tests, AMP training (TensorRT and onnxruntime-gpu rows skip with the reason)
#   bench-gpu   python -m serve.bench --quick, step mode: eager CUDA and CUDA graphs against eager (GPU targets)
#   bench-grpc  the server's targets with the server on SERVER_CPUS (0,1) and the load generator on
#               CLIENT_CPUS (2-5): 64 streams against 1, one stream against the in-process loop
# Exit 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/device}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/charrnn-device.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch, onnxruntime, grpc; print('torch', torch.__version__, 'cuda',
  torch.cuda.is_available(), '| onnxruntime', onnxruntime.__version__, '| grpcio', grpc.__version__)"; nproc; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: its output to $OUT/NAME.log, the end of it here
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 60 "$OUT/$name.log"
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

step gpu-check 190 env QUICK=1 bash scripts/gpu_check.sh
step bench-gpu 200 python3 -m serve.bench --quick --backends torch,torch-cuda,torch-cudagraph,ort-cpu \
  --modes step,limit --out "$WORK/bench-gpu"
step bench-grpc 200 python3 -m serve.bench --cells lstm --hidden-sizes 128,256 --backends ort-cpu --modes grpc \
  --concurrency 1,64 --chunk-chars 1,16,64 --grpc-chars 500 --grpc-requests 3 --server-cpus "${SERVER_CPUS:-0,1}" \
  --client-cpus "${CLIENT_CPUS:-2-5}" --out "$WORK/bench-grpc"
for name in bench-gpu bench-grpc; do  # the tables and records; the plots stay behind
  cp "$WORK/$name/latency.md" "$OUT/$name.md" 2>/dev/null && cp "$WORK/$name/latency.json" "$OUT/$name.json"
done
exit $status
