set -x
export PYTHON=${PYTHON:-python3}
python3 -c "from mishops.plans import hopper_conv as hc; hc.extension(); print(hc.extension().__file__)" 2>&1 | tail -1 > $OUT/so.txt
for c in small_bf16_nchw_tma small_bf16_s5_pingpong_rowbox_tma multitile_fp32_tma ref_fp32_nchw_tma multitile_bf16_cl_tma; do
  timeout 120 compute-sanitizer --tool memcheck --show-backtrace device python3 benchmarks/bench_hopper_conv.py --no-time --cases $c > $OUT/san-$c.txt 2>&1
  grep -E "PASS|FAIL|Illegal|Invalid|=========     at|Error" $OUT/san-$c.txt | head -12
done
so=$(cat $OUT/so.txt); cuobjdump -sass "$so" > $OUT/k.sass 2>&1; gzip $OUT/k.sass
