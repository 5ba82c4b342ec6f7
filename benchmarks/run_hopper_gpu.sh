#!/bin/bash
# One GPU call for the hopper_conv plan: environment, a smoke check (builds the kernel), then the
# full checks + timings, then the plan's GPU tests; a memory checker run if the smoke check fails.
set -o pipefail
export PYTHONUNBUFFERED=1 MISHOPS_CACHE_DIR=/tmp/mishops-cache
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2; } 2>&1 | tee "$OUT/env.txt"
# each smoke case alone, so a hang costs only its own time
for c in small_fp32_nchw multitile_fp32_single multitile_fp32_pingpong; do
  timeout ${T_CASE:-40} python3 benchmarks/bench_hopper_conv.py --no-time --cases $c 2>&1 | tee -a "$OUT/smoke.log"
done
CONFIGS=""
if ! grep -q "PASS multitile_fp32_pingpong" "$OUT/smoke.log"; then CONFIGS="--configs s6_single"; fi
if grep -q "PASS small_fp32_nchw" "$OUT/smoke.log"; then
  timeout ${T_BENCH:-140} python3 benchmarks/bench_hopper_conv.py --json "$OUT/bench.json" $CONFIGS $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
  if grep -qE "checks passed ([0-9]+)/\1" "$OUT/bench.log"; then
    timeout ${T_TEST:-90} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_plans_hopper_conv.py 2>&1 | tee "$OUT/pytest.log"
  fi
else
  timeout 60 compute-sanitizer --tool memcheck python3 benchmarks/bench_hopper_conv.py --no-time \
    --cases small_fp32_nchw 2>&1 | tail -80 | tee "$OUT/sanitizer.log"
fi
