#!/usr/bin/env bash
# The whole GPU benchmark and its report, in one command (about 3-6 minutes on one H100):
#
#     bash benchmarks/run_gpu.sh            # OUT=dir to choose where results go
#
# Writes into $OUT (default benchmarks/results): one pytest-benchmark JSON and log per benchmark
# module, nvidia-smi's view of the GPU, then report.md and benchmark.png built from the JSONs.
# Each module runs under its own time limit (SIGINT first, so pytest still writes the rows it has),
# so a slow JIT build or torch.compile in one cannot cost the others their results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MISHOPS_BENCH_QUICK=0
unset MISHOPS_BACKEND MISHOPS_AUTOTUNE TRITON_INTERPRET

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see $OUT/nvidia-smi.txt)"

run_module() {  # module name, time limit in seconds
    local name=$1 limit=$2 started=$SECONDS status
    timeout --signal=INT --kill-after=30 "$limit" \
        "$PYTHON" -m pytest "benchmarks/test_bench_$name.py" --benchmark-only -q -rs -p no:cacheprovider \
        --benchmark-columns=min,median,max,rounds --benchmark-json="$OUT/$name.json" > "$OUT/$name.log" 2>&1
    status=$?
    echo "$name: exit $status after $((SECONDS - started)) s: $(tail -n 1 "$OUT/$name.log")"
}

run_module mish2 180
run_module backward 60
run_module model 100
run_module overhead 20

jsons=()
for name in mish2 backward model overhead; do
    [ -s "$OUT/$name.json" ] && jsons+=("$OUT/$name.json")
done
if [ ${#jsons[@]} -eq 0 ]; then
    echo "no benchmark JSON was written; see the logs in $OUT" >&2
    exit 1
fi
"$PYTHON" -m mishops.report "${jsons[@]}" --out "$OUT"
