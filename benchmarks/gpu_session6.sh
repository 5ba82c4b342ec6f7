#!/usr/bin/env bash
# One device call: the scratch-release tests, then the reference problem's forward after the release.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning \
    tests/test_plans.py::test_gpu_plan_profiling_hands_its_scratch_memory_back \
    tests/test_integration_gpu.py::test_profiling_hands_its_scratch_memory_back 2>&1 | tail -4 | tee $OUT/gpu-tests.txt
MISHOPS_CACHE_DIR=/tmp/mc-bench timeout 330 python3 benchmarks/bench_plans.py --shapes ref --cases 1,2,3,4,6 --out $OUT/plans-ref-final.md > $OUT/bench-log.txt 2>&1
grep -v "n/a" $OUT/plans-ref-final.md | grep "eager\|compile\|auto\|triton_conv\|cudnn_fused |"
