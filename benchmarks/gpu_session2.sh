#!/usr/bin/env bash
# One device call: the Triton conv plan's GPU tests, then the kernel variants' timings.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
python3 scratch_variants.py 2>&1 | tee $OUT/variants.txt
timeout 200 python3 -m pytest -q -m gpu tests/test_plans_triton_conv.py 2>&1 | tail -5 | tee $OUT/gpu-tests.txt
timeout 280 python3 -m pytest -q -m gpu tests/test_plans.py -x 2>&1 | tail -15 | tee -a $OUT/gpu-tests.txt
