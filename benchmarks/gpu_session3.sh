#!/usr/bin/env bash
# One device call: Triton conv sweep, then the GPU tests of every file the plans touch, one process each.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
python3 benchmarks/sweep_triton_conv.py --reps 20 2>&1 | tee $OUT/sweep.md
for f in test_plans_triton_conv test_plans_epilogue test_backend_cuda test_plans; do
  echo "== $f" | tee -a $OUT/gpu-tests.txt
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning tests/$f.py 2>&1 | tail -15 | tee -a $OUT/gpu-tests.txt
done
