#!/bin/sh
# tools/gpu_multi.sh: what several GPUs of one host have to prove (issue 19), in one device call
# on a machine with 2, 4 or 8 H100/H200s:
#   - the GPU tests with every GPU opened (test_gpu_ranks splits the models 2, 3, 4 and 8 ways over
#     them, peer-memory sums and NCCL's, each split run twice for the same bits);
#   - the shipped model's greedy text with --gpus 2 .. N against one GPU's;
#   - two processes as two hosts (--hosts 2, half the GPUs each): host 0's text against one GPU's;
#   - --bench --gpus N for N = 2, 4, 8 (as many as the machine has), 8 layers and the whole shape,
#     and V4-Pro's whole shape on 8;
#   - FLASH=1: a 4-layer V4-Flash-shaped checkpoint (17 GB, tools/gen_flash_checkpoint.py) through
#     the same tests (NVFP4_FLASH_DIR).
# NCCL: libnccl.so.2 where the loader finds it, else a Python environment's nvidia/nccl/lib.
# Logs go to $OUT (or build/): multi-test.log, multi-text-N.txt, multi-bench.log.
set -u
LOG=${OUT:-build}
mkdir -p build "$LOG"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -12
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], 'lib'))" 2>/dev/null)
[ -n "$nccl" ] && LD_LIBRARY_PATH="$nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" && export LD_LIBRARY_PATH
make -s nvfp4 build/test build/deepseek-tokenizer.json || exit 1
if [ "${FLASH:-0}" = 1 ]; then
    python3 tools/gen_flash_checkpoint.py build/flash --layers 4 > "$LOG/multi-flash-gen.log" 2>&1 &&
        NVFP4_FLASH_DIR=build/flash && export NVFP4_FLASH_DIR
fi
echo "== the GPU tests on $gpus GPUs"
NVFP4_GPU_ONLY=1 ./build/test > "$LOG/multi-test.log" 2>&1
status=$?
grep -E "^GPU tests|GPUs opened|ranks on|^FAIL|passed" "$LOG/multi-test.log"
echo "== the shipped model's greedy text, --gpus 1 .. $gpus"
prompt="Call me Ishmael. Some years ago"
n=1
while [ "$n" -le "$gpus" ]; do
    ./nvfp4 --gpus "$n" models/v4-small "$prompt" -n 24 --temp 0 > "$LOG/multi-text-$n.txt" 2> "$LOG/multi-text-$n.err"
    rc=$?
    if [ "$rc" -eq 0 ] && cmp -s "$LOG/multi-text-1.txt" "$LOG/multi-text-$n.txt"; then same=same; else same=DIFFERENT; status=1; fi
    echo "--gpus $n: exit $rc, text $same as one GPU's; $(grep -E 'divided|sum of|error' "$LOG/multi-text-$n.err" | tr '\n' ' ')"
    n=$((n + 1))
done
echo "== two processes as two hosts (--hosts 2), half the GPUs each, against one GPU's text"
half=$((gpus / 2))
if [ "$half" -ge 1 ]; then
    rm -f build/nccl-id
    first=$(seq -s, 0 $((half - 1)))
    second=$(seq -s, "$half" $((2 * half - 1)))
    CUDA_VISIBLE_DEVICES=$first ./nvfp4 --hosts 2 --host 0 --nccl-id build/nccl-id models/v4-small "$prompt" -n 24 \
        --temp 0 > "$LOG/multi-hosts-0.txt" 2> "$LOG/multi-hosts-0.err" &
    CUDA_VISIBLE_DEVICES=$second ./nvfp4 --hosts 2 --host 1 --nccl-id build/nccl-id models/v4-small "$prompt" -n 24 \
        --temp 0 > "$LOG/multi-hosts-1.txt" 2> "$LOG/multi-hosts-1.err"
    rc1=$?
    wait $!
    rc0=$?
    if [ "$rc0$rc1" = 00 ] && cmp -s "$LOG/multi-text-1.txt" "$LOG/multi-hosts-0.txt" && [ ! -s "$LOG/multi-hosts-1.txt" ]; then
        same=same
    else
        same=DIFFERENT; status=1
    fi
    echo "--hosts 2 of $half GPUs: exits $rc0 $rc1, host 0's text $same as one GPU's (host 1 prints none);" \
        "$(grep -h -E 'divided|sum of|error' "$LOG/multi-hosts-0.err" "$LOG/multi-hosts-1.err" | tr '\n' ' ')"
fi
echo "== --bench --gpus N"
for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || continue
    for layers in 8 43; do
        printf -- '--gpus %s --layers %s: ' "$n" "$layers"
        ./nvfp4 --bench --gpus "$n" --layers "$layers" 2>&1 | tee -a "$LOG/multi-bench.log" |
            grep -E "^decode|^speed|^sums|^bytes" | tr '\n' ' ' | sed 's/  */ /g'
        echo
    done
done
if [ "$gpus" -ge 8 ]; then
    printf -- '--model pro --layers 61 --gpus 8: '
    ./nvfp4 --bench --model pro --layers 61 --gpus 8 2>&1 | tee -a "$LOG/multi-bench.log" |
        grep -E "^decode|^speed|^sums|^bytes" | tr '\n' ' ' | sed 's/  */ /g'
    echo
fi
exit $status
