#!/usr/bin/env bash
# The device session that closes a change: tests that need one or two GPUs, tuning at the reference
# shape (first call, then a warm process), and the model-level and overhead benchmarks. Logs in $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results/latest}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MISHOPS_CACHE_DIR=/tmp/mishops-cache
nvidia-smi -L | tee "$OUT/summary.txt"
OUT=$OUT TEST_TIMEOUT=${TEST_TIMEOUT:-200} bash benchmarks/gpu_tests.sh "${TESTS:-tests/test_backend_cuda.py tests/test_integration_gpu.py tests/test_distributed.py}" \
  | grep -v "^[┃┏┡└│]" >> "$OUT/summary.txt"
for i in 1 2; do  # first: profiles; second process: served from the disk cache
  python3 -m mishops tune --shape 64x128x254x254 --dtype float32 --dtype bfloat16 --backward 2>&1 | tee -a "$OUT/tune.txt"
done
mkdir -p "$OUT/bench"
if [ -n "${BENCH:-model overhead}" ]; then
  for m in ${BENCH:-model overhead}; do
    timeout --signal=INT --kill-after=20 ${BENCH_TIMEOUT:-200} python3 -m pytest benchmarks/test_bench_$m.py --benchmark-only -q -rs \
      -p no:cacheprovider --benchmark-json="$OUT/bench/$m.json" > "$OUT/bench/$m.log" 2>&1; echo "$m exit $?: $(tail -n 1 $OUT/bench/$m.log)"
  done
  python3 -m mishops report "$OUT"/bench/*.json --out "$OUT/bench" && tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
fi
