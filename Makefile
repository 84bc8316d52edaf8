# nvfp4: `make` builds the engine, `make test` builds and runs the test suite (offline, CPU only).
CC ?= cc
CFLAGS ?= -O2 -g -Wall -Wextra -Wno-unused-function
LDLIBS = -lm -ldl
BUILD = build

nvfp4: nvfp4.c nvfp4.h
	$(CC) $(CFLAGS) -o $@ nvfp4.c $(LDLIBS)

# test.c includes nvfp4.c; the real DeepSeek tokenizer ships gzipped in testdata/
$(BUILD)/test: test.c nvfp4.c nvfp4.h | $(BUILD)
	$(CC) $(CFLAGS) -o $@ test.c $(LDLIBS)

$(BUILD)/deepseek-tokenizer.json: testdata/tokenizer.json.gz | $(BUILD)
	gzip -dc $< > $@

$(BUILD):
	mkdir -p $@

test: nvfp4 $(BUILD)/test $(BUILD)/deepseek-tokenizer.json
	./$(BUILD)/test

clean:
	rm -rf nvfp4 $(BUILD)

.PHONY: test clean
