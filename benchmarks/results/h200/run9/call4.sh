# run 9, call 4: the split epilogue with two quarter-tile buffers: its checks, its timings, the hopper_conv GPU tests
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
S=multitile_fp32_split,multitile_bf16_cl_split,small_bf16_nchw_split,c8_24_37x53_pad1_cl_bf16_split,c8_24_37x53_pad1_fp32_split,k1_cout256_split,k1_cout256_cl_fp16_split,special_fp32_split,mish1_fp16_cl_split,stride2_bf16_cl_split,stride2_fp32_nchw_split,ref_bf16_nchw_split,ref_fp32_nchw_split,ref_fp32_cl_split,multitile_fp32_single_split,small_fp32_s5_pingpong_rowbox_split,small_fp32_s5_pingpong_split
mkdir -p $OUT
timeout -k 10 240 python3 benchmarks/bench_hopper_conv.py --cases $S --configs s5_pingpong_rowbox_split,s5_pingpong_split --json $OUT/hopper-split.json > $OUT/hopper-split.log 2>&1; echo "split checks and timing exit $?"
grep -E "^FAIL|checks passed" $OUT/hopper-split.log | cut -c1-300
sed -n '/=== summary ===/,$p' $OUT/hopper-split.log | grep -E "^(fp32|bf16)"
ARCHIVE=$OUT/results.tgz STEPS="tests" TESTS="tests/test_plans_hopper_conv.py" TEST_TIMEOUT=120 bash benchmarks/run_gpu.sh
