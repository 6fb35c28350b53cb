#!/usr/bin/env bash
# The CUDA paths, run once on a GPU machine (the device tool; CI has no GPU): the CUDA tests,
# then saturated swaps on cuda:0, then dynamic batching at 1 to 64 requests in flight. Wheels
# for what the machine lacks come in .whl/ when given.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, zmq, blosc2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/e2e/test_serving.py tests/e2e/test_rollout_e2e.py \
    tests/e2e/test_pt2.py 2>&1 | tail -5  # test_pt2: a package compiled for CUDA, served and updated
python3 scripts/bench_serving.py --only-saturated --device cuda:0 --clients 16 --swaps 3 \
    --json "$OUT/gpu_saturated.json" 2>"$OUT/gpu_bench.err"
echo "bench rc=$?"; tail -3 "$OUT/gpu_bench.err"
# dynamic batching on cuda:0: 1 to 64 requests in flight, batching on and off, the Python
# node (joined in pinned host buffers) and the C++ node when it is built
python3 scripts/bench_batching.py --device cuda:0 --no-torchserve --kinds "Python node K=1,C++ node" \
    --concurrency 1,4,16,64 --seconds 3 --json "$OUT/gpu_batching.json" >"$OUT/gpu_batching.md" \
    2>"$OUT/gpu_batching.err"
echo "batching rc=$?"; cat "$OUT/gpu_batching.md"
