#!/usr/bin/env bash
# Device call 2 of the training work (issue 15), after call 1's figures: the kernel GPU tests again
# (16-bit kernels under register caps, cupy with two packs a thread), the block's training
# gradients against float64 (store path, the Triton weight gradient), the bandwidth tables, then
# training steps at the reference shape: fp32 NCHW, bf16 autocast NCHW and fp32 channels_last, both
# configurations, eager and torch.compile beside them, cuDNN's and the Triton weight gradient.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD MISHOPS_CACHE_DIR=/tmp/mc TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-index --no-deps --target /tmp/site ../.whl/*.whl 2>&1 | tail -1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'cupy', cupy.__version__)"
  date -u; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
start=$(date +%s)
timeout 80 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" -k "not cold and not second_process" \
  -W ignore::DeprecationWarning tests/test_backend_cuda.py tests/test_backend_triton.py tests/test_backend_cupy.py \
  2>&1 | grep -v "^\.*$" | tail -12 > $OUT/gpu-tests-kernels.txt
echo "kernel tests: $(( $(date +%s) - start )) s" >> $OUT/gpu-tests-kernels.txt; cat $OUT/gpu-tests-kernels.txt
start=$(date +%s)
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning tests/test_plans_training.py \
  -k "triton_weight_grad or (torch_conv and tf32) or (torch_conv and bf16 and not reference and not batch1) or layouts_agree" \
  2>&1 | grep -v "^\.*$" | tail -12 > $OUT/gpu-tests-training.txt
echo "training tests: $(( $(date +%s) - start )) s" >> $OUT/gpu-tests-training.txt; cat $OUT/gpu-tests-training.txt
start=$(date +%s)
MISHOPS_BENCH_SIZES=ref timeout 45 python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_mish2.py \
  benchmarks/test_bench_backward.py benchmarks/test_bench_grad_bias.py --benchmark-only \
  --benchmark-json=$OUT/bandwidth.json 2>&1 | tail -2 > $OUT/bench-bandwidth-log.txt
echo "bandwidth: $(( $(date +%s) - start )) s" >> $OUT/bench-bandwidth-log.txt; cat $OUT/bench-bandwidth-log.txt
python3 - <<'PY' || true
import json, os
rows = json.load(open(os.path.join(os.environ["OUT"], "bandwidth.json")))["benchmarks"]
for r in rows:
    e = r["extra_info"]
    print(e.get("op"), e.get("dtype"), e.get("layout", ""), e.get("impl"), f'{e.get("median_ms", 0):.3f} ms',
          f'{e.get("pct_of_copy", 0):.1f}% of copy', e.get("max_abs_err", ""))
PY
timeout 100 python3 benchmarks/bench_plans.py --shapes ref --cases 1,4,3 --train --train-only --plans torch_conv \
  --backward-variants triton-wgrad,triton-wgrad-s2 --no-auto --reps 6 --out $OUT/train-ref.md > $OUT/train-log.txt 2>&1
grep "^|" $OUT/train-log.txt | tail -30
