#!/usr/bin/env bash
# One device call: GPU tests (selected by $1, a pytest -k/-path spec) + a bench, logs under $OUT.
# Usage on the GPU machine: bash benchmarks/gpu_tests.sh "tests/test_a.py tests/test_b.py" [bench]
set -uo pipefail
OUT=${OUT:-benchmarks/results/latest}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 MISHOPS_CACHE_DIR=${MISHOPS_CACHE_DIR:-/tmp/mishops-cache}
{
  date -u +"%Y-%m-%d %H:%M UTC"; git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'cupy', cupy.__version__)"
  python3 -m mishops info
} 2>&1 | tee "$OUT/env.txt"
# Each test file in its own process and time limit, so one crash or hang cannot hide the others.
for f in ${1:-tests/test_*.py}; do
  echo "=== $f" | tee -a "$OUT/gpu-tests.log"
  timeout ${TEST_TIMEOUT:-240} python3 -X faulthandler -m pytest "$f" -m gpu -q -p no:cacheprovider -rfE --durations=5 \
    2>&1 | tee "$OUT/$(basename "$f" .py).log" | tail -n 40 >> "$OUT/gpu-tests.log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu-tests.log"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/$(basename "$f" .py).log" | tail -n 15
done
if [ "${2:-}" = bench ]; then
  for dt in float32 bfloat16; do
    timeout 120 python3 -m mishops bench --dtype $dt --budget-ms 1500 2>&1 | tee -a "$OUT/bench.txt"
  done
fi
