#!/usr/bin/env bash
# One device call: the plan GPU tests after the autocast-aware timing and the scratch release,
# then the reference problem's forward in every NCHW-input case.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
for f in tests/test_plans_triton_conv.py tests/test_plans.py "tests/test_integration_gpu.py -k scratch"; do
  echo "== $f" >> $OUT/gpu-tests.txt
  timeout 220 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning $f 2>&1 | grep -v "^\.\|^$" | tail -8 >> $OUT/gpu-tests.txt
done
cat $OUT/gpu-tests.txt
MISHOPS_CACHE_DIR=/tmp/mc-bench timeout 300 python3 benchmarks/bench_plans.py --shapes ref --cases 1,2,4,5,7 --out $OUT/plans-ref-final.md > $OUT/bench-log.txt 2>&1
grep -v "n/a" $OUT/plans-ref-final.md | grep "eager\|compile\|auto\|triton_conv\|cudnn_fused |"
