#!/bin/sh
# tools/gpu_compare.sh: measure a change against other commits the way docs/performance.md describes:
# every binary benchmarked in ONE device call, alternating, on the same card.
#
#   sh tools/gpu_compare.sh build REV...   here (no GPU needed): build/nvfp4-REV for each git
#                                          revision (a commit or branch), from `git archive`
#   sh tools/gpu_compare.sh run [ROUNDS]   on the GPU machine (carry build/nvfp4-*): builds the
#                                          working tree, runs the test suite with the GPU tests,
#                                          then ROUNDS (default 3) rounds of `--bench`, each
#                                          round every build/nvfp4-* binary and then ./nvfp4;
#                                          then `make gpu-sanitize` when the tests passed.
#                                          BENCH_ARGS adds options to every `--bench`, e.g.
#                                          BENCH_ARGS="--layers 8 --gpu-mem 18" (host experts).
# Logs go to $OUT (or build/): test.log, sanitize.log.
set -u
LOG=${OUT:-build}
mkdir -p build "$LOG"
case "${1:-}" in
build)
    shift
    for rev in "$@"; do
        dir=$(mktemp -d)
        # a binary without kernels (no ptxas) would bench nothing: only one with the cubin counts
        if git archive "$rev" | tar -x -C "$dir" && make -s -C "$dir" nvfp4 >/dev/null &&
            [ -s "$dir/build/kernels_cubin.h" ] && cp "$dir/nvfp4" "build/nvfp4-$rev"; then
            echo "build/nvfp4-$rev: $(git rev-parse --short "$rev")"
        else
            echo "build/nvfp4-$rev: FAILED (build error, or no GPU kernels)" >&2
        fi
        rm -rf "$dir"
    done ;;
run)
    rounds=${2:-3}
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    make -s nvfp4 build/test build/deepseek-tokenizer.json || exit 1
    ./build/test > "$LOG/test.log" 2>&1
    status=$?
    grep -m1 "^GPU tests" "$LOG/test.log"    # "GPU tests on ..." or "GPU tests skipped: why"
    tail -1 "$LOG/test.log"
    grep "^FAIL" "$LOG/test.log" | head -20
    round=1
    while [ "$round" -le "$rounds" ]; do
        for binary in build/nvfp4-* ./nvfp4; do
            case "$binary" in *sanitize*) continue ;; esac
            printf '%s %s: ' "$round" "$binary"
            # BENCH_ARGS unquoted: a list of options
            "$binary" --bench ${BENCH_ARGS:-} 2>&1 | grep -E "^decode|^speed|^pcie|^kernels  [0-9]|^sampling" |
                tr '\n' ' ' | sed 's/  */ /g'
            echo
        done
        round=$((round + 1))
    done
    if [ "$status" -eq 0 ]; then
        rm -f build/sanitize-*.txt           # no summaries of an earlier run
        make gpu-sanitize > "$LOG/sanitize.log" 2>&1
        echo "gpu-sanitize: exit $?"
        grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY" build/sanitize-*.txt
    fi
    exit $status ;;
*)
    echo "usage: sh tools/gpu_compare.sh build REV... | run [ROUNDS]" >&2
    exit 2 ;;
esac
