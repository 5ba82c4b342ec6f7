# run 9, call 5: A/B in one call, alternating processes: the split epilogue with two quarter-tile buffers (the tree's
# csrc/hopper_conv.cu, fd08b00) against one slice buffer (dd26485's, carried as .diag/hopper_conv_slice.cu)
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
mkdir -p $OUT
cp csrc/hopper_conv.cu /tmp/quarter.cu
ab() {
    cp "$2" csrc/hopper_conv.cu
    timeout -k 10 150 python3 benchmarks/bench_hopper_conv.py --cases small_fp32_nchw --configs s5_pingpong_rowbox_split > $OUT/ab-$1.log 2>&1
    echo "$1 exit $?"; grep -E "^PASS|^FAIL" $OUT/ab-$1.log | cut -c1-60; grep -E "_split +[0-9]" $OUT/ab-$1.log
}
ab quarter1 /tmp/quarter.cu; ab slice1 .diag/hopper_conv_slice.cu; ab quarter2 /tmp/quarter.cu; ab slice2 .diag/hopper_conv_slice.cu
cp /tmp/quarter.cu csrc/hopper_conv.cu
