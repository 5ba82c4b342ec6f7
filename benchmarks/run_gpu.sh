#!/usr/bin/env bash
# The one GPU entry point: the environment, every GPU test file in its own process, the benchmark suite
# with its report, the whole-block plans (inference and training), the Hopper conv kernel's checks and
# configs, the host cost of a cached call, fuse() on a timm model, and KernelBench's own check of ModelNew.
# Logs and results go to $OUT.
#
#     bash benchmarks/run_gpu.sh                       # everything; OUT=dir (default benchmarks/results/latest)
#     STEPS="tests fuse" bash benchmarks/run_gpu.sh    # some of: env tests bench plans hopper overhead fuse kernelbench
#     TESTS="tests/test_plans.py tests/test_fuse.py" bash benchmarks/run_gpu.sh
#     PLANS_ARGS="--shapes ref --cases 1 --train" bash benchmarks/run_gpu.sh   # bench_plans' arguments
#     (FUSE_ARGS: bench_fuse_timm's; *_TIMEOUT: a step's limit in seconds: TEST PLANS HOPPER OVERHEAD FUSE KERNELBENCH)
#
# ARCHIVE=file.tgz rewrites that one archive of everything under $OUT after every step, for machines that return
# few files and may stop a run at their limit: whatever steps finished are in it.
# TUNING_OUT=file.tgz keeps the tuning cache's measurements (not its builds) at the end; TUNING_IN=file.tgz (such
# an archive, brought along) starts from them, so a later run on a new machine re-times nothing an earlier one
# timed with the same code and versions (the cache checks both).
#
# Wheels in .whl/ (a machine without internet) are installed into /tmp/site first. Each step runs under
# its own time limit (SIGINT first, so pytest still writes what it has): one slow JIT build, hang or
# crash cannot cost the others their results. Needs the test extra (pytest, pytest-benchmark) and,
# for the fuse step, timm.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-env tests bench plans hopper overhead fuse kernelbench}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -n 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 MISHOPS_BENCH_QUICK=0 MISHOPS_CACHE_DIR="${MISHOPS_CACHE_DIR:-/tmp/mishops-cache}"
unset MISHOPS_BACKEND MISHOPS_PLAN MISHOPS_AUTOTUNE TRITON_INTERPRET
if [ -n "${TUNING_IN:-}" ]; then
    # a missing archive would make every step re-tune from scratch and likely run out its limit: stop first
    # (on a lent machine, a git-ignored file travels only where the call names it to be carried)
    if [ ! -f "$TUNING_IN" ]; then
        echo "run_gpu.sh: TUNING_IN=$TUNING_IN not found here; nothing run" >&2
        exit 2
    fi
    mkdir -p "$MISHOPS_CACHE_DIR" && tar -xzf "$TUNING_IN" -C "$MISHOPS_CACHE_DIR" && echo "tuning cache from $TUNING_IN"
fi

archive() {  # rewrite $ARCHIVE from everything under $OUT (one writer at a time: test files finish in parallel)
    if [ -n "${ARCHIVE:-}" ]; then
        flock "$ARCHIVE.lock" sh -c 'tar -czf "$1.tmp" -C "$2" . 2>/dev/null && mv "$1.tmp" "$1"' _ "$ARCHIVE" "$OUT"
    fi
}

step() {  # is step $1 wanted? (and, first, archive what the previous steps left)
    archive
    [[ " $STEPS " == *" $1 "* ]]
}

limited() {  # limit in seconds, log file, command...
    local limit=$1 logfile=$2 started=$SECONDS status
    shift 2
    timeout --signal=INT --kill-after=30 "$limit" "$@" > "$logfile" 2>&1
    status=$?
    echo "$(basename "$logfile"): exit $status after $((SECONDS - started)) s: $(tail -n 1 "$logfile")"
    return $status
}

if step env; then
    {
        date -u +"%Y-%m-%d %H:%M UTC"
        # the tree that ran can differ from HEAD (a device copy's git metadata may lag its files): say by how much
        echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
             "$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) tracked files differ from it"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
        "$PYTHON" -m mishops info
    } > "$OUT/env.txt" 2>&1
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see $OUT/nvidia-smi.txt)"
    head -n 4 "$OUT/env.txt"
fi

if step tests; then
    # TEST_JOBS files at a time (they share the GPU; the timing-sensitive ones are in test_integration_gpu.py,
    # which runs alone after the others)
    mkdir -p "$OUT/tests"
    # -v names each test as it starts, and a test past TEST_HANG_S dumps every thread's stack: a file killed at
    # its limit still says where it was
    run_test() {
        limited "${TEST_TIMEOUT:-300}" "$OUT/tests/$(basename "$1" .py).log" \
            "$PYTHON" -X faulthandler -m pytest "$1" -m gpu -v -p no:cacheprovider -rfEs --durations=5 \
            -o faulthandler_timeout="${TEST_HANG_S:-120}"
        archive  # each file's log is kept as soon as it is written, whatever stops the run later
    }
    export -f limited run_test archive
    export OUT PYTHON TEST_TIMEOUT TEST_HANG_S ARCHIVE
    files=$(for f in ${TESTS:-tests/test_*.py}; do [ "$f" != tests/test_integration_gpu.py ] && echo "$f"; done)
    {
        printf '%s\n' $files | xargs -P "${TEST_JOBS:-1}" -I{} bash -c 'run_test {}'
        for f in ${TESTS:-tests/test_*.py}; do [ "$f" = tests/test_integration_gpu.py ] && run_test "$f"; done
    } | tee "$OUT/gpu-tests.txt"
fi

if step bench; then
    mkdir -p "$OUT/bench"
    jsons=()
    for spec in ${BENCH_SPECS:-mish2:180 backward:60 grad_bias:60 model:100 overhead:20}; do
        name=${spec%%:*}
        limited "${spec##*:}" "$OUT/bench/$name.log" "$PYTHON" -m pytest "benchmarks/test_bench_$name.py" \
            --benchmark-only -q -rs -p no:cacheprovider --benchmark-columns=min,median,max,rounds \
            --benchmark-json="$OUT/bench/$name.json"
        [ -s "$OUT/bench/$name.json" ] && jsons+=("$OUT/bench/$name.json")
    done
    if [ ${#jsons[@]} -gt 0 ]; then
        "$PYTHON" -m mishops report "${jsons[@]}" --out "$OUT/bench"
    else
        echo "no benchmark JSON was written; see the logs in $OUT/bench" >&2
    fi
fi

if step plans; then
    # shellcheck disable=SC2086  # PLANS_ARGS is a list of arguments
    limited "${PLANS_TIMEOUT:-400}" "$OUT/plans.log" "$PYTHON" benchmarks/bench_plans.py ${PLANS_ARGS:---shapes ref --train} \
        --out "$OUT/plans.md"
fi

if step hopper; then
    limited "${HOPPER_TIMEOUT:-150}" "$OUT/hopper-conv.log" "$PYTHON" benchmarks/bench_hopper_conv.py --json "$OUT/hopper-conv.json"
fi

if step overhead; then
    limited "${OVERHEAD_TIMEOUT:-120}" "$OUT/host-overhead.log" "$PYTHON" benchmarks/bench_host_overhead.py --out "$OUT/host-overhead.md"
fi

if step fuse; then
    # shellcheck disable=SC2086  # FUSE_ARGS is a list of arguments
    limited "${FUSE_TIMEOUT:-500}" "$OUT/fuse-timm.log" "$PYTHON" benchmarks/bench_fuse_timm.py ${FUSE_ARGS:-} --out "$OUT/fuse-timm.md"
fi

if step kernelbench; then
    limited "${KERNELBENCH_TIMEOUT:-200}" "$OUT/kernelbench.log" "$PYTHON" benchmarks/bench_kernelbench.py --out "$OUT/kernelbench.md"
fi

if [ -n "${TUNING_OUT:-}" ] && [ -d "$MISHOPS_CACHE_DIR" ]; then
    tar -czf "$TUNING_OUT" -C "$MISHOPS_CACHE_DIR" --exclude=./build . && echo "tuning cache kept in $TUNING_OUT"
fi
step end || true  # the last archive
