# nvfp4: `make` builds the engine; `make test` builds and runs the test suite (offline, CPU only);
# `make test-sanitize` runs it again under AddressSanitizer + UndefinedBehaviorSanitizer;
# `make fuzz` runs each libFuzzer target (clang) for FUZZ_SECONDS.
# Where ptxas is found (PATH or /usr/local/cuda/bin), kernels.ptx is run through the C
# preprocessor, assembled for sm_90a into build/kernels.cubin and embedded in nvfp4 (and the
# tests) as build/kernels_cubin.h with -DNVFP4_GPU; without ptxas the binary has no GPU path.
# `make bench-gpu` runs the GEMV benchmark on the GPU (with the test suite).
CC ?= cc
CFLAGS ?= -O2 -g -Wall -Wextra
SANITIZE = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
LDLIBS = -lm -ldl -lpthread
BUILD = build
FUZZ_SECONDS ?= 60
# the commit --version and --bench print: this directory's own, "unknown" unless it is the top of
# a git checkout (not a tree unpacked inside another repository, whose commit is not ours)
COMMIT := $(shell test "$$(git rev-parse --show-toplevel 2>/dev/null)" = "$$(pwd -P)" && git rev-parse --short --verify -q HEAD || echo unknown)
VERSION_FLAGS = -DNVFP4_COMMIT='"$(COMMIT)"'


PTXAS ?= $(shell command -v ptxas || ls /usr/local/cuda/bin/ptxas 2>/dev/null)

ifneq ($(PTXAS),)
GPU_FLAGS = -DNVFP4_GPU -I$(BUILD)
GPU_DEPS = $(BUILD)/kernels_cubin.h
else
$(info ptxas not found (PATH, /usr/local/cuda/bin): building nvfp4 without the GPU path)
endif

nvfp4: nvfp4.c nvfp4.h $(GPU_DEPS)
	$(CC) $(CFLAGS) $(GPU_FLAGS) $(VERSION_FLAGS) -o $@ nvfp4.c $(LDLIBS)

# the kernels: preprocess (nvfp4.h's kernel ABI, the macros), assemble, turn into a C array
$(BUILD)/kernels.cubin: kernels.ptx nvfp4.h | $(BUILD)
	$(CC) -E -P -x c kernels.ptx -o $(BUILD)/kernels.i.ptx
	$(PTXAS) -arch=sm_90a -o $@ $(BUILD)/kernels.i.ptx

$(BUILD)/kernels_cubin.h: $(BUILD)/kernels.cubin
	{ echo 'static const unsigned char kernels_cubin[] __attribute__((aligned(64))) = {'; \
	  od -An -v -tx1 $< | awk '{ for (i = 1; i <= NF; i++) printf "0x%s,", $$i; print "" }'; \
	  echo '};'; } > $@

# test.c includes nvfp4.c (whose command-line functions it does not call); the real DeepSeek
# tokenizer ships gzipped in testdata/
$(BUILD)/test: test.c nvfp4.c nvfp4.h $(GPU_DEPS) | $(BUILD)
	$(CC) $(CFLAGS) $(GPU_FLAGS) -Wno-unused-function -o $@ test.c $(LDLIBS)

$(BUILD)/deepseek-tokenizer.json: testdata/tokenizer.json.gz | $(BUILD)
	gzip -dc $< > $@

$(BUILD):
	mkdir -p $@

test: nvfp4 $(BUILD)/test $(BUILD)/deepseek-tokenizer.json
	./$(BUILD)/test

# the same suite, engine and CLI built with the sanitizers (fatal exits leak by design: no leak check)
test-sanitize: $(BUILD)/deepseek-tokenizer.json $(GPU_DEPS)
	$(CC) $(SANITIZE) $(GPU_FLAGS) $(VERSION_FLAGS) -o $(BUILD)/nvfp4-sanitize nvfp4.c $(LDLIBS)
	$(CC) $(SANITIZE) $(GPU_FLAGS) -DNVFP4_BIN='"$(BUILD)/nvfp4-sanitize"' -o $(BUILD)/test-sanitize test.c $(LDLIBS)
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 ./$(BUILD)/test-sanitize

fuzz: $(BUILD)/deepseek-tokenizer.json
	for target in json safetensors tokenizer; do \
	    clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ=fuzz_$$target -o $(BUILD)/fuzz-$$target test.c $(LDLIBS) && \
	    mkdir -p $(BUILD)/corpus/$$target && \
	    ASAN_OPTIONS=detect_leaks=0 ./$(BUILD)/fuzz-$$target -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	        $(BUILD)/corpus/$$target testdata/fuzz/$$target || exit 1; \
	done

bench-gpu: nvfp4 $(BUILD)/test $(BUILD)/deepseek-tokenizer.json
	NVFP4_GPU_BENCH=1 ./$(BUILD)/test

# on a GPU machine: compute-sanitizer's memcheck, racecheck and initcheck over a fixture run that
# prefills in chunks (tensor-core GEMM) and decodes with the CUDA graph, sampling with every
# filter (repeat penalty, top-k, min-p, top-p), and memcheck over a
# small benchmark run (V4-Flash's shapes) whose --gpu-mem leaves about half the routed experts
# in host memory; each must report no error
gpu-sanitize: nvfp4
	for tool in memcheck racecheck initcheck; do \
	    compute-sanitizer --tool $$tool --error-exitcode 1 ./nvfp4 --gpu testdata/tiny-d "$$(cat testdata/tiny-d/prompt.txt)" \
	        -n 24 --temp 0.8 --top-k 5 --min-p 0.05 --repeat-penalty 1.3 --seed 1 --chunk 64 > $(BUILD)/sanitize-$$tool.txt || exit 1; \
	done
	compute-sanitizer --tool memcheck --error-exitcode 1 ./nvfp4 --bench --layers 3 --position 300 --gpu-mem 6 > $(BUILD)/sanitize-bench.txt

clean:
	rm -rf nvfp4 $(BUILD)

.PHONY: test test-sanitize gpu-sanitize fuzz bench-gpu clean
