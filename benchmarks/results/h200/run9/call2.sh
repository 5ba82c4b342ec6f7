# run 9, call 2: the kernel's timings (3 configs, every setting), then the block at the reference shape with split offered
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout -k 10 150 python3 benchmarks/bench_hopper_conv.py --cases small_fp32_nchw --configs s5_pingpong_rowbox_split,s5_pingpong_split,s6_pingpong_rowbox --json $OUT/hopper-timing.json > $OUT/hopper-timing.log 2>&1; echo "hopper timing exit $?"
sed -n '/=== summary ===/,$p' $OUT/hopper-timing.log | grep -E "^(fp32|bf16)"
ARCHIVE=$OUT/results.tgz STEPS="plans" PLANS_ARGS="--shapes ref --cases 1,4,3,6" PLANS_TIMEOUT=400 bash benchmarks/run_gpu.sh
