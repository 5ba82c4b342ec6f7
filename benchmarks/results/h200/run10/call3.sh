# run 10, call 3: the cooperative consumers with the split epilogue (coop):
# its checks against float64, then an A/B of the kernel against the split in two processes (configs in either
# order), then the hopper_conv GPU tests
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
mkdir -p $OUT
H=s4_coop_rowbox S=s5_pingpong_rowbox_split
cases=small_fp32_$H
for c in multitile_fp32 multitile_bf16_cl small_bf16_nchw c8_24_37x53_pad1_cl_bf16 c8_24_37x53_pad1_fp32 k1_cout256 \
         k1_cout256_cl_fp16 special_fp32 mish1_fp16_cl stride2_bf16_cl stride2_fp32_nchw ref_fp32_nchw ref_fp32_cl \
         ref_bf16_nchw; do cases=$cases,${c}_coop; done
timeout -k 10 280 python3 benchmarks/bench_hopper_conv.py --cases $cases --configs $H,$S --json $OUT/ab1.json > $OUT/ab1.log 2>&1
echo "ab1 exit $?"; grep -cE "^PASS" $OUT/ab1.log; grep -E "^FAIL" $OUT/ab1.log | cut -c1-120
sed -n '/=== summary ===/,$p' $OUT/ab1.log | grep -E "^(fp32|bf16)" | grep -E "kernel_|plan_|pad_pass" | cut -c1-75
timeout -k 10 200 python3 benchmarks/bench_hopper_conv.py --cases small_fp32_nchw --configs $S,$H --json $OUT/ab2.json > $OUT/ab2.log 2>&1
echo "ab2 exit $?"; sed -n '/=== summary ===/,$p' $OUT/ab2.log | grep -E "^(fp32|bf16)" | grep -E "kernel_|plan_|pad_pass" | cut -c1-75
ARCHIVE=$OUT/results.tgz STEPS="tests" TESTS="tests/test_plans_hopper_conv.py" TEST_JOBS=1 TEST_TIMEOUT=250 bash benchmarks/run_gpu.sh 2>&1 | tail -n 5
