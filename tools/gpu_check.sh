#!/bin/sh
# tools/gpu_check.sh: everything the GPU path has to prove, on a machine with an H100/H200:
# build, the test suite with the GPU tests and the GEMV benchmark, the GPU tests under
# compute-sanitizer memcheck and racecheck, and a deliberately broken kernel that the tests must catch.
# Logs go to $OUT (or build/) as gpu-test.log, gpu-memcheck.log, gpu-racecheck.log, gpu-mutant.log.
set -u
LOG=${OUT:-build}
mkdir -p build "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
make -s nvfp4 build/test build/deepseek-tokenizer.json || exit 1
echo "== make bench-gpu (test suite + GPU tests + benchmark)"
NVFP4_GPU_BENCH=1 ./build/test > "$LOG/gpu-test.log" 2>&1; status=$?
grep -E "^GPU|^  GPU|^FAIL|passed|^format|^NVFP4|^MXFP4|^FP8|^BF16" "$LOG/gpu-test.log"
for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool (NVFP4_GPU_QUICK=1: small shapes, NVFP4 2048x4096, FP8 32768x1024)"
    NVFP4_GPU_QUICK=1 compute-sanitizer --tool $tool ./build/test > "$LOG/gpu-$tool.log" 2>&1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|^FAIL" "$LOG/gpu-$tool.log"
done
echo "== mutant: E2M1 decode loses a magnitude bit (0x81C00000 -> 0x81800000); the FP4 tests must fail"
# the mutant is built in a copy of the tree: the working tree's kernels.ptx is never touched
mutant=$(mktemp -d)
cp -r Makefile nvfp4.c nvfp4.h kernels.ptx test.c testdata models "$mutant"/ 2>/dev/null
sed -i 's/0x81C00000/0x81800000/' "$mutant/kernels.ptx"
(cd "$mutant" && make -s build/test build/deepseek-tokenizer.json && NVFP4_GPU_QUICK=1 ./build/test) > "$LOG/gpu-mutant.log" 2>&1
rm -rf "$mutant"
grep -E "^FAIL.*GPU|passed" "$LOG/gpu-mutant.log"
exit $status
