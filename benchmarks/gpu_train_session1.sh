#!/usr/bin/env bash
# Device call 1 of the training work (issue 15): the kernel GPU tests (the double Mish with shared
# reciprocals, the fused activation + bias gradient, the differentiable backward), the double-Mish
# and grad_bias bandwidth at the reference size beside a same-run copy, then the fp32 NCHW training
# step at the reference shape in both configurations with eager and torch.compile in the same run.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-index --no-deps --target /tmp/site ../.whl/*.whl 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'cupy', cupy.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
start=$(date +%s)
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" -k "not cold and not second_process" \
  -W ignore::DeprecationWarning tests/test_backend_cuda.py tests/test_backend_triton.py tests/test_backend_cupy.py \
  tests/test_ops.py 2>&1 | grep -v "^\.*$" | tail -25 > $OUT/gpu-tests-kernels.txt
echo "kernel tests: $(( $(date +%s) - start )) s" >> $OUT/gpu-tests-kernels.txt; cat $OUT/gpu-tests-kernels.txt
start=$(date +%s)
MISHOPS_BENCH_SIZES=ref timeout 75 python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_mish2.py \
  benchmarks/test_bench_backward.py benchmarks/test_bench_grad_bias.py --benchmark-only \
  --benchmark-json=$OUT/bandwidth.json 2>&1 | tail -3 > $OUT/bench-bandwidth-log.txt
echo "bandwidth: $(( $(date +%s) - start )) s" >> $OUT/bench-bandwidth-log.txt; cat $OUT/bench-bandwidth-log.txt
python3 - <<'PY' || true
import json, os
rows = json.load(open(os.path.join(os.environ["OUT"], "bandwidth.json")))["benchmarks"]
for r in rows:
    e = r["extra_info"]
    print(e.get("op"), e.get("dtype"), e.get("layout", ""), e.get("impl"), f'{e.get("median_ms", 0):.3f} ms',
          f'{e.get("pct_of_copy", 0):.1f}% of copy', e.get("max_abs_err", ""))
PY
timeout 95 python3 benchmarks/bench_plans.py --shapes ref --cases 1 --train --train-only \
  --plans torch_conv,cudnn_conv_epilogue_triton --no-auto --reps 10 --out $OUT/train-ref-fp32-nchw.md > $OUT/train-log.txt 2>&1
cat $OUT/train-log.txt | tail -20
