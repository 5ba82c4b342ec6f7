#!/usr/bin/env bash
# One device call: the GPU tests of the plans after the register cap, then the reference problem's
# forward for every plan, eager, torch.compile and ModelNew's automatic choice.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
for f in test_plans_triton_conv test_plans; do
  echo "== $f" >> $OUT/gpu-tests.txt
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning tests/$f.py 2>&1 | tail -4 >> $OUT/gpu-tests.txt
done
cat $OUT/gpu-tests.txt
MISHOPS_CACHE_DIR=/tmp/mc-bench timeout 280 python3 benchmarks/bench_plans.py --shapes ref --cases 1,2,3,4,6 --out $OUT/plans-ref-final.md > $OUT/bench-log.txt 2>&1
grep -v "n/a" $OUT/plans-ref-final.md | tail -40
