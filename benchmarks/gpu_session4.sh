#!/usr/bin/env bash
# One device call: every GPU test file the plans touch (one process each), the Triton conv at the
# reference problem's own shape (padding 0: 254x254 outputs), and the autocast rows of the plan benchmark.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
python3 benchmarks/sweep_triton_conv.py --padding 0 --configs 128x128x32x8x3,128x128x32x4x3,128x64x32x8x3,128x64x32x4x3,64x128x32x4x3 --dtypes fp32 2>&1 | tee $OUT/sweep-pad0.md
python3 benchmarks/sweep_triton_conv.py --padding 0 --configs 128x128x64x8x3,128x64x64x4x3 --dtypes bf16 2>&1 | tee -a $OUT/sweep-pad0.md
for f in test_plans_triton_conv test_plans_training test_plans test_plans_epilogue test_integration_gpu; do
  echo "== $f" >> $OUT/gpu-tests.txt
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning tests/$f.py 2>&1 | tail -6 >> $OUT/gpu-tests.txt
done
cat $OUT/gpu-tests.txt
MISHOPS_CACHE_DIR=/tmp/mc-bench timeout 200 python3 benchmarks/bench_plans.py --shapes ref --cases 4,7 --out $OUT/plans-ref-autocast-nchw.md > $OUT/bench-log.txt 2>&1
grep -v "n/a" $OUT/plans-ref-autocast-nchw.md | tail -20
