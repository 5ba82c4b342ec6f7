# run 10, call 6: call 5 again after its fixes (batched rewrite, 3 staging boxes loaded ahead of the ring, fold declined below a box) (s4_pingpong_rowbox_split_fold): its checks against
# float64, its output bit for bit against the same config unfolded, an A/B of the kernel and the plan against the
# split in two processes, then the hopper_conv GPU tests
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
mkdir -p $OUT
F=s4_pingpong_rowbox_split_fold S=s5_pingpong_rowbox_split
cases=small_fp32_$F
for c in multitile_fp32 c8_24_37x52_pad1 c8_24_37x53_pad1_fold_declined k7_cin3_pad3 k5_dil2_nobias cin96_k1_cout256 \
         special_fp32 mish1_fp32 stride_h2 ref_fp32_nchw ref_fp32_nchw_pad1; do
    case $c in *declined) cases=$cases,$c ;; *) cases=$cases,${c}_fold ;; esac
done
timeout -k 10 120 python3 benchmarks/bench_hopper_conv.py --no-time --cases $cases --configs $F > $OUT/checks.log 2>&1
echo "checks exit $?"; grep -E "^checks passed" $OUT/checks.log; grep -E "^FAIL" $OUT/checks.log | cut -c1-300
timeout -k 10 60 python3 - > $OUT/bitwise.log 2>&1 <<'PY'
import torch
from mishops.plans import hopper_conv as hc
torch.backends.cudnn.allow_tf32 = True
for pad in ((0, 0), (1, 1)):
    x = torch.randn(64, 64, 256, 256, device="cuda"); w = torch.randn(128, 64, 3, 3, device="cuda") / 24
    b = torch.randn(128, device="cuda") * 0.1
    a = hc.conv_mish(x, w, b, pad, (1, 1), 2, torch.contiguous_format, hc.HopperConfig(4, 2, True, "split", True))
    r = hc.conv_mish(x, w, b, pad, (1, 1), 2, torch.contiguous_format, hc.HopperConfig(4, 2, True, "split"))
    print("padding", pad, "fold == unfolded bitwise:", torch.equal(a, r), "max diff", float((a - r).abs().max()))
PY
echo "bitwise exit $?"; cat $OUT/bitwise.log | tail -n 3
for i in 1 2; do
    timeout -k 10 150 python3 benchmarks/bench_hopper_conv.py --cases small_fp32_nchw --configs $S,$F > $OUT/ab$i.log 2>&1
    echo "ab$i exit $?"; sed -n '/=== summary ===/,$p' $OUT/ab$i.log | grep -E "^fp32_nchw" | grep -E "kernel_|plan_|pad_pass" | cut -c1-72
done
ARCHIVE=$OUT/results.tgz STEPS="tests" TESTS="tests/test_plans_hopper_conv.py" TEST_JOBS=1 TEST_TIMEOUT=250 bash benchmarks/run_gpu.sh 2>&1 | tail -n 3
