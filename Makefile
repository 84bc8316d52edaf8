# nvfp4: `make` builds the engine; `make test` builds and runs the test suite (offline, CPU only);
# `make test-sanitize` runs it again under AddressSanitizer + UndefinedBehaviorSanitizer;
# `make fuzz` runs each libFuzzer target (clang) for FUZZ_SECONDS.
CC ?= cc
CFLAGS ?= -O2 -g -Wall -Wextra
SANITIZE = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
LDLIBS = -lm -ldl
BUILD = build
FUZZ_SECONDS ?= 60
# the commit --version prints ("unknown" outside a git checkout)
COMMIT := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
VERSION_FLAGS = -DNVFP4_COMMIT='"$(COMMIT)"'

nvfp4: nvfp4.c nvfp4.h
	$(CC) $(CFLAGS) $(VERSION_FLAGS) -o $@ nvfp4.c $(LDLIBS)

# test.c includes nvfp4.c (whose command-line functions it does not call); the real DeepSeek
# tokenizer ships gzipped in testdata/
$(BUILD)/test: test.c nvfp4.c nvfp4.h | $(BUILD)
	$(CC) $(CFLAGS) -Wno-unused-function -o $@ test.c $(LDLIBS)

$(BUILD)/deepseek-tokenizer.json: testdata/tokenizer.json.gz | $(BUILD)
	gzip -dc $< > $@

$(BUILD):
	mkdir -p $@

test: nvfp4 $(BUILD)/test $(BUILD)/deepseek-tokenizer.json
	./$(BUILD)/test

# the same suite, engine and CLI built with the sanitizers (fatal exits leak by design: no leak check)
test-sanitize: $(BUILD)/deepseek-tokenizer.json
	$(CC) $(SANITIZE) $(VERSION_FLAGS) -o $(BUILD)/nvfp4-sanitize nvfp4.c $(LDLIBS)
	$(CC) $(SANITIZE) -DNVFP4_BIN='"$(BUILD)/nvfp4-sanitize"' -o $(BUILD)/test-sanitize test.c $(LDLIBS)
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 ./$(BUILD)/test-sanitize

fuzz: $(BUILD)/deepseek-tokenizer.json
	for target in json safetensors tokenizer; do \
	    clang -g -O1 -fsanitize=fuzzer,address,undefined -DFUZZ=fuzz_$$target -o $(BUILD)/fuzz-$$target test.c $(LDLIBS) && \
	    mkdir -p $(BUILD)/corpus/$$target && \
	    ASAN_OPTIONS=detect_leaks=0 ./$(BUILD)/fuzz-$$target -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	        $(BUILD)/corpus/$$target testdata/fuzz/$$target || exit 1; \
	done

clean:
	rm -rf nvfp4 $(BUILD)

.PHONY: test test-sanitize fuzz clean
