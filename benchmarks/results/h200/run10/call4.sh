# run 10, call 4: the pad pass overlapped with the kernel by batch chunks on two streams (overlap_probe.py)
export MISHOPS_CACHE_DIR=/tmp/mishops-cache PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout -k 10 400 python3 benchmarks/results/h200/run10/overlap_probe.py > $OUT/overlap.log 2>&1; echo "probe exit $?"
cat $OUT/overlap.log | tail -n 30
