# run 9, call 6 (the final tree: the kernel and plan of call 3): the block for a channels_last module on NCHW input
# at the reference shape, and batch 16 and batch 1 (mid, small) in fp32 and bf16, NCHW
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -n 1
timeout -k 10 120 python3 benchmarks/bench_plans.py --shapes ref --cases 2 --out $OUT/plans-ref-case2.md > $OUT/plans-ref-case2.log 2>&1; echo "ref case 2 exit $?"
timeout -k 10 200 python3 benchmarks/bench_plans.py --shapes mid,small --cases 1,4 --out $OUT/plans-mid-small.md > $OUT/plans-mid-small.log 2>&1; echo "mid/small exit $?"
grep -E "run_block auto|alternating|torch.compile|plan hopper_conv" $OUT/plans-*.md | cut -c1-220
