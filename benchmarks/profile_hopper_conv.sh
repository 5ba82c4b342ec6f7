#!/usr/bin/env bash
# Nsight Compute on the hopper_conv kernel at the reference shape: for each "config:mode" in PROFILES, one
# launch (after one unprofiled) with the full section set and per-instruction stall sampling; writes
# the details page, the SASS source page (CSV) and the SASS of the built extension to $OUT/profile/.
#
#     OUT=dir PROFILES="s6_pingpong:0 s6_pingpong:2" bash benchmarks/profile_hopper_conv.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT/profile"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MISHOPS_CACHE_DIR="${MISHOPS_CACHE_DIR:-/tmp/mishops-cache}"
python3 benchmarks/profile_hopper_conv.py --launches 1 > "$OUT/profile/build.log" 2>&1  # build outside ncu
so=$(find "$MISHOPS_CACHE_DIR" -name 'mishops_hopper_conv*.so' | head -n 1)
[ -n "$so" ] && cuobjdump -sass "$so" > "$OUT/profile/hopper_conv.sass" 2>&1
for spec in ${PROFILES:-s6_pingpong:0}; do
    cfg=${spec%%:*} mode=${spec##*:} name="$cfg-mode$mode${PROFILE_DTYPE:+-$PROFILE_DTYPE}"
    timeout 240 ncu --clock-control none --set full --import-source yes -k regex:conv_mish_kernel \
        --launch-skip 1 --launch-count 1 -f -o "$OUT/profile/$name" \
        python3 benchmarks/profile_hopper_conv.py --config "$cfg" --mode "$mode" --launches 2 \
        ${PROFILE_DTYPE:+--dtype $PROFILE_DTYPE} > "$OUT/profile/$name.log" 2>&1
    echo "$name: ncu exit $? ($(tail -n 1 "$OUT/profile/$name.log"))"
    ncu --import "$OUT/profile/$name.ncu-rep" --page details > "$OUT/profile/$name-details.txt" 2>&1
    ncu --import "$OUT/profile/$name.ncu-rep" --page source --print-source sass --csv \
        > "$OUT/profile/$name-sass.csv" 2>&1
    gzip -f "$OUT/profile/$name-sass.csv"
    rm -f "$OUT/profile/$name.ncu-rep"
done
