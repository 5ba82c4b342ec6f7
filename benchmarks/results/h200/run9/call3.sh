# run 9, call 3: every GPU test file at the final tree, KernelBench's check, and a trace of the plan's calls
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
mkdir -p $OUT
ARCHIVE=$OUT/results.tgz STEPS="env tests kernelbench" TEST_JOBS=8 TEST_TIMEOUT=300 TEST_HANG_S=120 KERNELBENCH_TIMEOUT=120 bash benchmarks/run_gpu.sh 2>&1 | tail -20
PYTHONPATH=$PWD timeout -k 10 60 python3 benchmarks/results/h200/run9/trace_plan.py > $OUT/trace-plan.log 2>&1; echo "trace exit $?"; grep -E "==|a call|gap" $OUT/trace-plan.log | cut -c1-140 | head -30
