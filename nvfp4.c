/* nvfp4.c: a minimal DeepSeek V4 inference engine in one C file.
 *
 *   ./nvfp4 MODEL_DIR "prompt" [options]        (./nvfp4 -h lists the options)
 *
 * Reading order, as in llama2.c's run.c the model first: errors and small helpers (UTF-8,
 * hashing); number formats; the parsers' declarations; weights; decoding state; the CPU forward
 * pass (the reference every GPU kernel is checked against); sampler; the GPU path (driver API,
 * kernels, forward pass: kernels.ptx holds the kernels themselves); generation; benchmark; then
 * the parsers: JSON, safetensors, config.json, tokenizer; the command line; the generated
 * Unicode table. test.c includes this file with TESTING defined to reach every static function.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nvfp4.h"

#define NVFP4_VERSION "0.1"
#ifndef NVFP4_COMMIT
#define NVFP4_COMMIT "unknown"   /* the Makefile passes the git commit */
#endif

/* =========================================================================== errors, helpers */

static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* Write "nvfp4: " `kind` and the message to stderr as one line, in one write when it is short.
   Every message passes here, and most quote what a file or the command line holds (a shard
   name, a regex, a key, a path), so each control character in the message is written as an
   escape: \n, \r and \t, \xHH for the other C0 controls and DEL, \u00HH for the C1 controls
   (U+0080..U+009F, which terminals obey too), and \xHH for each byte of invalid UTF-8 (a C1
   control to a Latin-1 terminal). A crafted file can then neither break the line nor send the
   terminal an escape sequence. */
static void vmessage(const char *kind, const char *fmt, va_list ap) {
    char small[1024], *text = small, out[4096];
    va_list again;
    va_copy(again, ap);
    int length = vsnprintf(small, sizeof small, fmt, ap);
    if (length < 0) length = 0;
    if ((size_t)length >= sizeof small) {   /* a long one: whole when memory allows, else cut */
        text = malloc((size_t)length + 1);
        if (text) vsnprintf(text, (size_t)length + 1, fmt, again);
        else text = small, length = (int)sizeof small - 1;
    }
    va_end(again);
    size_t used = (size_t)snprintf(out, sizeof out, "nvfp4: %s", kind);
    for (size_t i = 0; i < (size_t)length;) {
        if (used > sizeof out - 16) {
            fwrite(out, 1, used, stderr);
            used = 0;
        }
        uint32_t cp;
        size_t n = utf8_decode((const unsigned char *)text + i, (size_t)length - i, &cp);
        const char *named = cp == '\n' ? "\\n" : cp == '\r' ? "\\r" : cp == '\t' ? "\\t" : NULL;
        if (named) used += (size_t)sprintf(out + used, "%s", named);
        else if (cp < 0x20 || cp == 0x7f || cp > 0x10FFFF) used += (size_t)sprintf(out + used, "\\x%02x", (unsigned char)text[i]);
        else if (cp >= 0x80 && cp < 0xa0) used += (size_t)sprintf(out + used, "\\u%04x", (unsigned)cp);
        else memcpy(out + used, text + i, n), used += n;
        i += n;
    }
    out[used++] = '\n';
    fwrite(out, 1, used, stderr);
    if (text != small) free(text);
}

/* -q: notes, progress bars and the stats line are not printed; warnings and errors are. */
static int quiet;

/* Print "nvfp4: ..." on stderr (a note: what the run does, what it replaced), unless -q. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    if (quiet) return;
    va_list ap;
    va_start(ap, fmt);
    vmessage("", fmt, ap);
    va_end(ap);
}

/* Print "nvfp4: warning: ..." on stderr: something the run goes on without, but that the user
   most likely did not mean. */
static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vmessage("warning: ", fmt, ap);
    va_end(ap);
}

/* Print "nvfp4: error: ..." and exit with status 1. Every bad input ends here, with a message
   that names what is wrong and where. */
static void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fatal(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    va_start(ap, fmt);
    vmessage("error: ", fmt, ap);
    va_end(ap);
    exit(1);
}

/* calloc that never returns NULL: zeroed memory for `count` items of `size` bytes, or fatal
   with the size asked for (the product is checked for overflow). */
static void *xcalloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) fatal("allocation of %zu x %zu bytes overflows", count, size);
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) fatal("out of memory allocating %zu bytes", count * size);
    return p;
}

/* A copy of s in new memory (never NULL). */
static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(xcalloc(n, 1), s, n);
}

/* "dir/name" in a new string. */
static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = xcalloc(n, 1);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

#define MAX_TEXT_FILE ((size_t)1 << 30)   /* config, tokenizer and index files are far smaller */
/* A prompt, a --perplexity text or a line of -i holds at most 16 MiB (about 4M tokens, more than
   V4's 1M context), refused as it is read: an endless input must not fill the memory. */
#define MAX_PROMPT_MIB 16
#define MAX_PROMPT_BYTES ((size_t)MAX_PROMPT_MIB << 20)

/* Read a whole regular file (at most MAX_TEXT_FILE bytes) into a NUL-terminated buffer; *size
   gets its length. Returns NULL with errno set when it cannot be opened or read, is not a
   regular file (EINVAL: a FIFO or device would block or never end) or is too large (EFBIG). */
static char *read_file(const char *path, size_t *size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return NULL;
    struct stat st;
    int error = fstat(fd, &st) ? errno : !S_ISREG(st.st_mode) ? EINVAL : (size_t)st.st_size > MAX_TEXT_FILE ? EFBIG : 0;
    if (error) {
        close(fd);
        errno = error;
        return NULL;
    }
    size_t len = (size_t)st.st_size, got = 0;
    char *buf = xcalloc(len + 1, 1);
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n <= 0) {
            int error = n < 0 ? errno : EIO;
            close(fd);
            free(buf);
            errno = error;
            return NULL;
        }
        got += (size_t)n;
    }
    close(fd);
    *size = len;
    return buf;
}

/* qsort order of floats, ascending. */
static int compare_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Monotonic time in seconds, for the stats. */
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------------ UTF-8, hashing */
/* The one UTF-8 decoder and the one encoder of the engine (JSON strings, the tokenizer, prompt
   checks, streamed output), and the one hash of its tables. */

/* "Code point" given to each byte of an invalid UTF-8 sequence: beyond Unicode, so of no class. */
#define INVALID_CHAR 0x110000u

/* Decodes the character at s[0..n) (n >= 1) into *cp and returns its length in bytes. A byte
   that does not start a valid, complete character (overlong forms, surrogates, beyond
   U+10FFFF, truncated) is returned alone as INVALID_CHAR with length 1. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char b = s[0];
    *cp = INVALID_CHAR;
    if (b < 0x80) { *cp = b; return 1; }
    size_t length;
    uint32_t value, min;
    if (b >= 0xC2 && b <= 0xDF) { length = 2; value = b & 0x1F; min = 0x80; }
    else if (b >= 0xE0 && b <= 0xEF) { length = 3; value = b & 0x0F; min = 0x800; }
    else if (b >= 0xF0 && b <= 0xF4) { length = 4; value = b & 0x07; min = 0x10000; }
    else return 1;
    if (n < length) return 1;
    for (size_t i = 1; i < length; i++) {
        if ((s[i] & 0xC0) != 0x80) return 1;
        value = (value << 6) | (s[i] & 0x3F);
    }
    if (value < min || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return 1;
    *cp = value;
    return length;
}

/* Whether s[0..n) (1 <= n <= 4) is a whole valid character or the start of one: completed with
   the lowest (0x80) or the highest (0xBF) continuation bytes, one of the two must decode as a
   single character at least n bytes long (the second byte's narrower ranges after E0, ED, F0
   and F4 are met by one end or the other). */
static int utf8_prefix(const unsigned char *s, size_t n) {
    for (int fill = 0x80; fill <= 0xBF; fill += 0x3F) {
        unsigned char padded[4];
        for (size_t i = 0; i < 4; i++) padded[i] = i < n ? s[i] : (unsigned char)fill;
        uint32_t cp;
        size_t length = utf8_decode(padded, 4, &cp);
        if (cp != INVALID_CHAR && length >= n) return 1;
    }
    return 0;
}

/* Writes code point `cp` (at most 0x10FFFF) as UTF-8 to `out`; returns the byte count (1-4). */
static size_t utf8_encode(char *out, uint32_t cp) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decoded tokens can end in the middle of a character. A Utf8Stream holds back an incomplete
   character until its last byte arrives, so output only ever contains whole characters; bytes
   that can never become part of a valid character are written as U+FFFD, one for each maximal
   ill-formed subsequence (a lead byte and the continuation bytes that fitted it, or a lone bad
   byte), as HF tokenizers' decode (Rust's from_utf8_lossy, Python's errors='replace') does. */

static const char replacement_char[] = "\xef\xbf\xbd";   /* U+FFFD */

/* Feeds n bytes into the stream and writes to `out` everything that is now settled: whole
   characters, and U+FFFD for bytes that cannot become one. `out` needs room for 3 * (n + 3)
   bytes. Returns the number of bytes written. */
static size_t utf8_stream_push(Utf8Stream *s, const char *bytes, size_t n, char *out) {
    size_t written = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)bytes[i];
        if (s->npending > 0) {
            s->pending[s->npending] = b;
            if (utf8_prefix(s->pending, (size_t)s->npending + 1)) {
                uint32_t cp;
                s->npending++;
                if (utf8_decode(s->pending, (size_t)s->npending, &cp) == (size_t)s->npending) {
                    memcpy(out + written, s->pending, (size_t)s->npending);   /* a whole character */
                    written += (size_t)s->npending;
                    s->npending = 0;
                }
                continue;
            }
            /* The held-back bytes will never complete: one U+FFFD for them, and b starts afresh. */
            memcpy(out + written, replacement_char, 3);
            written += 3;
            s->npending = 0;
        }
        if (b < 0x80) out[written++] = (char)b;
        else if (utf8_prefix(&b, 1)) s->pending[s->npending++] = b;   /* a lead byte */
        else {   /* a byte no character starts with */
            memcpy(out + written, replacement_char, 3);
            written += 3;
        }
    }
    return written;
}

/* Writes U+FFFD for the held-back bytes of an unfinished character, if any, to `out` (room for 3
   bytes) and empties the stream. Returns the number of bytes written. */
static size_t utf8_stream_flush(Utf8Stream *s, char *out) {
    if (!s->npending) return 0;
    s->npending = 0;
    memcpy(out, replacement_char, 3);
    return 3;
}

/* 64-bit FNV-1a hash of n bytes: tensor names, vocabulary spellings, merge pairs. */
static uint64_t hash_bytes(const void *data, size_t n) {
    const unsigned char *s = data;
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
    return h;
}

/* =========================================================================== number formats */
/* Every quantized weight is decoded to float here. The formats:
     BF16      the top 16 bits of an IEEE float32
     F8 E4M3   sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff = NaN
     F8 E8M0   a power of two: 2^(byte - 127)             (block scale of FP8 and MXFP4)
     E2M1      4 bits: sign (bit 3) and one of 0, .5, 1, 1.5, 2, 3, 4, 6 (two per byte, low
               nibble = even column)                         (MXFP4 and NVFP4 weights)     */
static const float e2m1_values[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};

/* A float from its IEEE bits. */
static float float_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* BF16 -> float: the 16 bits are the top half of a float32. */
static float bf16_to_float(uint16_t bits) { return float_from_bits((uint32_t)bits << 16); }

/* F8 E4M3 (the "fn" variant: no infinities, S.1111.111 is NaN) -> float. A normal value
   moves its exponent from bias 7 to float's bias 127 and its 3 mantissa bits to the top of
   float's 23; a subnormal is m/8 * 2^-6 = m * 2^-9. */
static float e4m3_to_float(uint8_t byte) {
    uint32_t exponent = (byte >> 3) & 15, mantissa = byte & 7;
    float magnitude = exponent == 15 && mantissa == 7 ? NAN
                      : exponent == 0                 ? (float)mantissa * (1.0f / 512)
                                                      : float_from_bits((exponent + 120) << 23 | mantissa << 20);
    return byte >> 7 ? -magnitude : magnitude;
}

/* F8 E8M0 -> float: 2^(byte - 127), the byte being float's exponent field (0 is the
   subnormal 2^-127, whose bits are 1 << 22); 255 is NaN. */
static float e8m0_to_float(uint8_t byte) {
    return byte == 255 ? NAN : float_from_bits(byte ? (uint32_t)byte << 23 : 1u << 22);
}

/* Element i of a mapped array. safetensors promises no alignment, so every multi-byte value
   is read with memcpy (which compiles to a plain load where the CPU allows it). */
static uint16_t load_u16(const void *p, size_t i) { uint16_t v; memcpy(&v, (const uint8_t *)p + 2 * i, 2); return v; }
static float load_f32(const void *p, size_t i) { float v; memcpy(&v, (const uint8_t *)p + 4 * i, 4); return v; }
static int64_t load_i64(const void *p, size_t i) { int64_t v; memcpy(&v, (const uint8_t *)p + 8 * i, 8); return v; }

static const char *dtype_names[DT_COUNT] = {"BF16", "F32", "F8_E4M3", "F8_E8M0", "U8", "I8", "I64", "F16"};
static const size_t dtype_sizes[DT_COUNT] = {2, 4, 1, 1, 1, 1, 8, 2};   /* bytes per element */
static const char *const format_names[] = {"BF16", "F32", "FP8", "MXFP4", "NVFP4"};   /* by WeightFormat */

/* Element i of a small BF16 or F32 tensor (norm weights, biases, hc parameters) as float. */
static float tensor_float(const Tensor *t, size_t i) {
    return t->dtype == DT_F32 ? load_f32(t->data, i) : bf16_to_float(load_u16(t->data, i));
}

/* Decode row r of W into out[cols] (float32, exact: every format's values are exact in it). */
static void linear_row(const Linear *w, int r, float *out) {
    size_t cols = (size_t)w->cols, base = (size_t)r * cols;
    switch (w->format) {
    case FMT_F32:
        memcpy(out, (const uint8_t *)w->weight + 4 * base, cols * sizeof(float));
        break;
    case FMT_BF16:
        for (size_t c = 0; c < cols; c++) out[c] = bf16_to_float(load_u16(w->weight, base + c));
        break;
    case FMT_FP8: {
        const uint8_t *q = (const uint8_t *)w->weight + base;
        size_t scale_cols = (cols + 127) / 128, srow = (size_t)(r / 128) * scale_cols;
        for (size_t c0 = 0; c0 < cols; c0 += 128) {   /* one scale per 128 columns */
            float s = w->scale_is_f32 ? load_f32(w->scale, srow + c0 / 128)
                                      : e8m0_to_float(((const uint8_t *)w->scale)[srow + c0 / 128]);
            for (size_t c = c0; c < cols && c < c0 + 128; c++) out[c] = e4m3_to_float(q[c]) * s;
        }
        break;
    }
    case FMT_MXFP4:
    case FMT_NVFP4: {
        const uint8_t *q = (const uint8_t *)w->weight + base / 2;
        int group = w->format == FMT_MXFP4 ? 32 : 16;
        const uint8_t *scales = (const uint8_t *)w->scale + (size_t)r * (cols / group);
        for (size_t c0 = 0; c0 < cols; c0 += group) {   /* one scale per group (cols % group == 0) */
            float s = w->format == FMT_MXFP4 ? e8m0_to_float(scales[c0 / group])
                                             : e4m3_to_float(scales[c0 / group]) * w->global_scale;
            for (size_t c = c0; c < c0 + group; c++) out[c] = e2m1_values[(q[c / 2] >> (4 * (c & 1))) & 15] * s;
        }
        break;
    }
    }
}

/* ====================================================================== the parsers, declared */
/* The model comes first in this file; the parsers it reads its files with (JSON, safetensors,
   config.json, tokenizer.json) come after the generation and benchmark sections. These are the
   parser functions used before their definitions. */
static Json *load_json_file(const char *path);
static const Json *json_get(const Json *obj, const char *key);
static void json_free(Json *root);
static const char *safetensors_parse(const uint8_t *map, size_t size, int file, Tensor **tensors, size_t *count,
                                     size_t *cap, char *err, size_t errlen);
static void index_tensors(Model *m);
static const Tensor *find_tensor(const Model *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void expect_shape(const Model *m, const Tensor *t, int ndim, const int64_t *shape);
static void expect_dtype(const Model *m, const Tensor *t, int n_allowed, const DType *allowed);
static void parse_config(Config *c, const Json *root, const char *path);
static void warn_misspelled_keys(const Json *obj, const char *where, const char *const *known, const char *const *ignored);
static int tokenizer_load_file(Tokenizer *t, const char *path, char *err, size_t errlen);
static int tokenizer_encode(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids);
static int tokenizer_encode_plain(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids);
static int tokenizer_find(const Tokenizer *t, const char *token);
static const char *tokenizer_token_bytes(const Tokenizer *t, int id, size_t *len);

/* ================================================================================== weights */

/* The BF16 or F32 tensor `name` of the given shape (n = ndim, then the sizes), or fatal. */
static const Tensor *float_tensor(const Model *m, const char *name, int ndim, const int64_t *shape) {
    const Tensor *t = find_tensor(m, "%s", name);
    if (!t) fatal("tensor %s is missing from the checkpoint", name);
    static const DType floats[] = {DT_BF16, DT_F32};
    expect_dtype(m, t, 2, floats);
    expect_shape(m, t, ndim, shape);
    return t;
}

/* Keep `p` (a copy made at load) until free_model; returns p. */
static void *model_keep(Model *m, void *p) {
    if (m->n_owned == m->owned_capacity) {
        m->owned_capacity = m->owned_capacity ? 2 * m->owned_capacity : 64;
        void **grown = realloc(m->owned, m->owned_capacity * sizeof *grown);
        if (!grown) fatal("out of memory");
        m->owned = grown;
    }
    return m->owned[m->n_owned++] = p;
}

/* The small BF16 or F32 tensor `name` of the given shape, converted to a float32 array that
   the model owns (norms, biases, sinks, ape, mHC parameters). */
static float *small_tensor(Model *m, const char *name, int ndim, const int64_t *shape) {
    const Tensor *t = float_tensor(m, name, ndim, shape);
    size_t n = t->nbytes / (t->dtype == DT_F32 ? 4 : 2);
    float *out = model_keep(m, xcalloc(n ? n : 1, sizeof(float)));
    for (size_t i = 0; i < n; i++) out[i] = tensor_float(t, i);
    return out;
}

/* Fatal when the linear layer `base` has the companion tensor base.<name>, which its `format`
   weight does not use: the file could be read as another format. */
static void refuse_companion(const Model *m, const char *base, const char *format, const char *name) {
    const Tensor *t = find_tensor(m, "%s.%s", base, name);
    if (t) fatal("%s: %s tensor %s.weight comes with %s.%s, a scale of another format", m->files[t->file].path, format,
                 base, base, name);
}

/* The linear layer `base` ("layers.3.attn.wq_a") of shape [rows, cols]. Its format follows from
   the dtype of base.weight and its companions, exactly one format's:
     BF16 / F32 weight                                  plain
     F8_E4M3 weight + scale (E8M0 or F32) or weight_scale_inv (F32), per 128x128 block   FP8
     U8 / I8 weight [rows, cols/2] + weight_scale (F8_E4M3 per 16) + weight_scale_2     NVFP4
     U8 / I8 weight [rows, cols/2] + scale (F8_E8M0 per 32)                             MXFP4
   An input_scale (the activations' static scale, unused: nvfp4 keeps activations in float)
   may come with any of them and must be one F32 value. */
static Linear load_linear(const Model *m, const char *base, int rows, int cols) {
    Linear w = {0};
    w.rows = rows;
    w.cols = cols;
    const Tensor *t = find_tensor(m, "%s.weight", base);
    if (!t) fatal("tensor %s.weight is missing from the checkpoint", base);
    const char *path = m->files[t->file].path;
    const Tensor *input = find_tensor(m, "%s.input_scale", base);
    if (input && (input->dtype != DT_F32 || input->ndim > 1 || (input->ndim == 1 && input->shape[0] != 1)))
        fatal("%s: tensor %s.input_scale must be one F32 value", m->files[input->file].path, base);
    w.weight = t->data;
    if (t->dtype == DT_BF16 || t->dtype == DT_F32) {
        w.format = t->dtype == DT_BF16 ? FMT_BF16 : FMT_F32;
        expect_shape(m, t, 2, (int64_t[]){rows, cols});
        static const char *scales[] = {"scale", "weight_scale_inv", "weight_scale", "weight_scale_2"};
        for (int i = 0; i < 4; i++) refuse_companion(m, base, dtype_names[t->dtype], scales[i]);
    } else if (t->dtype == DT_F8_E4M3) {
        w.format = FMT_FP8;
        expect_shape(m, t, 2, (int64_t[]){rows, cols});
        const Tensor *s = find_tensor(m, "%s.scale", base), *inv = find_tensor(m, "%s.weight_scale_inv", base);
        if (s && inv) fatal("%s: FP8 tensor %s.weight has two scales, %s.scale and %s.weight_scale_inv", path, base, base, base);
        if (!s) s = inv;
        if (!s) fatal("%s: FP8 tensor %s.weight has no %s.scale or %s.weight_scale_inv", path, base, base, base);
        refuse_companion(m, base, "FP8", "weight_scale");
        refuse_companion(m, base, "FP8", "weight_scale_2");
        static const DType scale_types[] = {DT_F8_E8M0, DT_F32};
        expect_dtype(m, s, 2, scale_types);
        expect_shape(m, s, 2, (int64_t[]){(rows + 127) / 128, (cols + 127) / 128});
        w.scale = s->data;
        w.scale_is_f32 = s->dtype == DT_F32;
    } else if (t->dtype == DT_U8 || t->dtype == DT_I8) {
        if (cols % 32) fatal("%s: 4-bit tensor %s.weight has %d columns, not a multiple of 32", path, base, cols);
        expect_shape(m, t, 2, (int64_t[]){rows, cols / 2});
        const Tensor *nv = find_tensor(m, "%s.weight_scale", base), *global = find_tensor(m, "%s.weight_scale_2", base);
        const Tensor *mx = find_tensor(m, "%s.scale", base);
        if ((nv || global) && mx)
            fatal("%s: 4-bit tensor %s.weight has both NVFP4 (%s.%s) and MXFP4 (%s.scale) scales", path, base, base,
                  nv ? "weight_scale" : "weight_scale_2", base);
        refuse_companion(m, base, "4-bit", "weight_scale_inv");
        if (nv || global) {
            w.format = FMT_NVFP4;
            static const DType e4m3[] = {DT_F8_E4M3}, f32[] = {DT_F32};
            if (!nv) fatal("%s: NVFP4 tensor %s.weight has no %s.weight_scale", path, base, base);
            expect_dtype(m, nv, 1, e4m3);
            expect_shape(m, nv, 2, (int64_t[]){rows, cols / 16});
            if (!global) fatal("%s: NVFP4 tensor %s.weight has no %s.weight_scale_2", path, base, base);
            expect_dtype(m, global, 1, f32);
            expect_shape(m, global, 0, NULL);
            w.scale = nv->data;
            memcpy(&w.global_scale, global->data, 4);
        } else if (mx) {
            w.format = FMT_MXFP4;
            static const DType e8m0[] = {DT_F8_E8M0};
            expect_dtype(m, mx, 1, e8m0);
            expect_shape(m, mx, 2, (int64_t[]){rows, cols / 32});
            w.scale = mx->data;
        } else {
            fatal("%s: 4-bit tensor %s.weight has neither %s.weight_scale (NVFP4) nor %s.scale (MXFP4)", path, base,
                  base, base);
        }
    } else {
        fatal("%s: tensor %s.weight has dtype %s, not a supported weight format", path, base, dtype_names[t->dtype]);
    }
    return w;
}

/* Layers that pick their experts by token id (tid2eid) instead of by router scores. */
static int is_hash_layer(const Config *c, int l) { return l < c->n_hash_layers; }

/* The checkpoint files mapped now (a prefix of one model's files array, never reallocated), for
   the SIGBUS handler to name the file a fault lies in: a file truncated under the run. */
static const SafeFile *mapped_files;
static volatile sig_atomic_t n_mapped;

/* Map one safetensors file read-only and append its tensors to the model. */
static void open_safetensors(Model *m, const char *path, size_t *cap) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);   /* O_NONBLOCK: a FIFO must not hang the load */
    if (fd < 0) fatal("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) fatal("%s is not a regular file", path);
    if (st.st_size == 0) fatal("%s is empty", path);
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) fatal("cannot map %s: %s", path, strerror(errno));
    SafeFile *f = &m->files[m->n_files];
    f->path = xstrdup(path);
    f->map = map;
    f->size = (size_t)st.st_size;
    mapped_files = m->files;
    atomic_signal_fence(memory_order_release);   /* the entry is complete before the handler sees it */
    n_mapped = m->n_files + 1;                   /* from here on, before the parser first reads the map */
    char err[512];
    if (safetensors_parse(map, f->size, m->n_files, &m->tensors, &m->n_tensors, cap, err, sizeof err))
        fatal("%s: %s", path, err);
    m->n_files++;
}

/* Open every safetensors file of the model directory: model.safetensors, or the shards named by
   model.safetensors.index.json (each tensor it lists must be in the shard it names). */
static void open_checkpoint(Model *m, const char *dir) {
    char *index_path = path_join(dir, "model.safetensors.index.json");
    size_t cap = 0;
    if (access(index_path, F_OK) == 0) {
        Json *index = load_json_file(index_path);
        const Json *map = json_get(index, "weight_map");
        if (!map || map->type != JSON_OBJECT || map->length == 0)
            fatal("%s: needs a non-empty \"weight_map\" object", index_path);
        const char **shards = xcalloc(map->length, sizeof *shards);
        int n_shards = 0;
        size_t mask = 15;   /* the distinct shard names by hash (shard index + 1, 0 = empty): linear time */
        while (mask / 2 < map->length) mask = mask * 2 + 1;
        int *slots = xcalloc(mask + 1, sizeof *slots);
        for (size_t i = 0; i < map->length; i++) {
            const Json *v = &map->items[i];
            if (v->type != JSON_STRING)
                fatal("%s: weight_map[\"%s\"] must be a file name in the model directory", index_path, map->keys[i]);
            if (!v->length || strchr(v->string, '/') || !strcmp(v->string, ".") || !strcmp(v->string, ".."))
                fatal("%s: weight_map[\"%s\"] names shard \"%s\", which is not a file name in the model directory",
                      index_path, map->keys[i], v->string);
            size_t s = hash_bytes(v->string, v->length) & mask;
            while (slots[s] && strcmp(shards[slots[s] - 1], v->string)) s = (s + 1) & mask;
            if (!slots[s]) {
                shards[n_shards++] = v->string;
                slots[s] = n_shards;
            }
        }
        free(slots);
        m->files = xcalloc((size_t)n_shards, sizeof(SafeFile));
        for (int s = 0; s < n_shards; s++) {
            char *path = path_join(dir, shards[s]);
            if (access(path, F_OK)) fatal("%s names shard %s, which is not in %s", index_path, shards[s], dir);
            open_safetensors(m, path, &cap);
            free(path);
        }
        index_tensors(m);
        for (size_t i = 0; i < map->length; i++) {
            const Tensor *t = find_tensor(m, "%s", map->keys[i]);
            if (!t || strcmp(m->files[t->file].path + strlen(dir) + 1, map->items[i].string))
                fatal("%s: tensor %s is listed in shard %s but %s", index_path, map->keys[i], map->items[i].string,
                      t ? "found in another file" : "absent from it");
        }
        free(shards);
        json_free(index);
    } else {
        char *path = path_join(dir, "model.safetensors");
        if (access(path, F_OK)) fatal("%s has neither model.safetensors nor model.safetensors.index.json", dir);
        m->files = xcalloc(1, sizeof(SafeFile));
        open_safetensors(m, path, &cap);
        free(path);
        index_tensors(m);
    }
    free(index_path);
    for (size_t i = 0; i < m->n_tensors; i++) m->weight_bytes += m->tensors[i].nbytes;
}

/* Bind a compressor (prefix.wkv, .wgate, .ape, .norm) of parts*dim channels and `ratio` tokens
   per entry. */
static void load_compressor(Model *m, Compressor *c, const char *prefix, int parts, int dim, int ratio) {
    const Config *cfg = &m->config;
    char name[256];
    snprintf(name, sizeof name, "%s.wkv", prefix);
    c->wkv = load_linear(m, name, parts * dim, cfg->hidden_size);
    snprintf(name, sizeof name, "%s.wgate", prefix);
    c->wgate = load_linear(m, name, parts * dim, cfg->hidden_size);
    snprintf(name, sizeof name, "%s.ape", prefix);
    c->ape = small_tensor(m, name, 2, (int64_t[]){ratio, (int64_t)parts * dim});
    snprintf(name, sizeof name, "%s.norm.weight", prefix);
    c->norm = small_tensor(m, name, 1, (int64_t[]){dim});
}

/* Bind the mHC parameters prefix_fn [rows, HC*E], prefix_base [rows], prefix_scale [n_scales]. */
static HcParams load_hc(Model *m, const char *prefix, int rows, int n_scales) {
    char name[256];
    HcParams p;
    snprintf(name, sizeof name, "%s_fn", prefix);
    p.fn = small_tensor(m, name, 2, (int64_t[]){rows, (int64_t)HC * m->config.hidden_size});
    snprintf(name, sizeof name, "%s_base", prefix);
    p.base = small_tensor(m, name, 1, (int64_t[]){rows});
    snprintf(name, sizeof name, "%s_scale", prefix);
    p.scale = small_tensor(m, name, 1, (int64_t[]){n_scales});
    return p;
}

/* Expert e's matrix of a stack, as a Linear view. */
static Linear expert_matrix(const ExpertStack *w, int e) {
    return (Linear){.format = w->format, .rows = w->rows, .cols = w->cols, .weight = w->weight[e],
                    .scale = w->scale[e], .scale_is_f32 = w->scale_is_f32, .global_scale = w->global_scale[e]};
}

/* Bind matrix `which` ("w1", "w2", "w3") of layer l's X experts, [rows, cols] each, into one
   stack; every expert must share the first one's format. */
static ExpertStack load_experts(Model *m, int l, const char *which, int rows, int cols) {
    int X = m->config.n_experts;
    ExpertStack w = {.rows = rows, .cols = cols};
    w.weight = model_keep(m, xcalloc((size_t)X, sizeof(void *)));
    w.scale = model_keep(m, xcalloc((size_t)X, sizeof(void *)));
    w.global_scale = model_keep(m, xcalloc((size_t)X, sizeof(float)));
    for (int e = 0; e < X; e++) {
        char name[256];
        snprintf(name, sizeof name, "layers.%d.ffn.experts.%d.%s", l, e, which);
        Linear one = load_linear(m, name, rows, cols);
        if (e == 0) {
            w.format = one.format;
            w.scale_is_f32 = one.scale_is_f32;
        } else if (one.format != w.format || one.scale_is_f32 != w.scale_is_f32) {
            fatal("layer %d: expert %d's %s is %s but expert 0's is %s; the experts of a layer must share one format", l,
                  e, which, format_names[one.format], format_names[w.format]);
        }
        w.weight[e] = one.weight;
        w.scale[e] = one.scale;
        w.global_scale[e] = one.global_scale;
    }
    return w;
}

/* Layer l's tid2eid [V, topk] (hash routing), checked and converted to int32. */
static int32_t *load_tid2eid(Model *m, int l) {
    const Config *c = &m->config;
    const Tensor *t = find_tensor(m, "layers.%d.ffn.gate.tid2eid", l);
    if (!t) fatal("tensor layers.%d.ffn.gate.tid2eid is missing (layer %d is hash-routed)", l, l);
    static const DType ints[] = {DT_I64};
    expect_dtype(m, t, 1, ints);
    expect_shape(m, t, 2, (int64_t[]){c->vocab_size, c->topk});
    size_t n = (size_t)c->vocab_size * c->topk;
    int32_t *out = model_keep(m, xcalloc(n, sizeof(int32_t)));
    for (size_t i = 0; i < n; i++) {
        int64_t id = load_i64(t->data, i);
        if (id < 0 || id >= c->n_experts)
            fatal("%s: tensor %s holds expert id %lld, outside 0..%d", m->files[t->file].path, t->name, (long long)id,
                  c->n_experts - 1);
        out[i] = (int32_t)id;
    }
    return out;
}

/* A progress bar on stderr (loading, --perplexity), drawn only when stderr is a terminal; erased
   once done == total. */
static void progress(const char *what, int done, int total) {
    if (!isatty(2) || quiet) return;
    int width = 40, filled = total ? done * width / total : width;
    fprintf(stderr, "\r%s [%.*s%*s] %d/%d", what, filled, "########################################", width - filled, "",
            done, total);
    if (done == total) fputs("\r\033[K", stderr);
}

/* Bind every weight of the model to its tensor, checking each dtype and shape against config. */
static void bind_weights(Model *m) {
    const Config *c = &m->config;
    int E = c->hidden_size, mix = (2 + HC) * HC, HD = c->n_heads * c->head_dim, Q = c->q_lora_rank, I = c->moe_inter;
    char name[256];
    m->embed = *float_tensor(m, "embed.weight", 2, (int64_t[]){c->vocab_size, E});
    m->head = load_linear(m, "head", c->vocab_size, E);
    m->norm = small_tensor(m, "norm.weight", 1, (int64_t[]){E});
    m->hc_head = load_hc(m, "hc_head", HC, 1);
    m->layers = xcalloc((size_t)c->n_layers, sizeof(Layer));
    for (int l = 0; l < c->n_layers; l++) {
        Layer *L = &m->layers[l];
#define NAME(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
        L->attn_norm = small_tensor(m, NAME("layers.%d.attn_norm.weight", l), 1, (int64_t[]){E});
        L->ffn_norm = small_tensor(m, NAME("layers.%d.ffn_norm.weight", l), 1, (int64_t[]){E});
        L->hc_attn = load_hc(m, NAME("layers.%d.hc_attn", l), mix, 3);
        L->hc_ffn = load_hc(m, NAME("layers.%d.hc_ffn", l), mix, 3);
        L->wq_a = load_linear(m, NAME("layers.%d.attn.wq_a", l), Q, E);
        L->q_norm = small_tensor(m, NAME("layers.%d.attn.q_norm.weight", l), 1, (int64_t[]){Q});
        L->wq_b = load_linear(m, NAME("layers.%d.attn.wq_b", l), HD, Q);
        L->wkv = load_linear(m, NAME("layers.%d.attn.wkv", l), c->head_dim, E);
        L->kv_norm = small_tensor(m, NAME("layers.%d.attn.kv_norm.weight", l), 1, (int64_t[]){c->head_dim});
        L->wo_a = load_linear(m, NAME("layers.%d.attn.wo_a", l), c->o_groups * c->o_lora_rank, HD / c->o_groups);
        L->wo_b = load_linear(m, NAME("layers.%d.attn.wo_b", l), E, c->o_groups * c->o_lora_rank);
        L->attn_sink = small_tensor(m, NAME("layers.%d.attn.attn_sink", l), 1, (int64_t[]){c->n_heads});
        int ratio = c->compress_ratio[l];
        if (c->attn_kind[l] != ATTN_SLIDING) {
            int channels = c->attn_kind[l] == ATTN_CSA ? 2 : 1;
            load_compressor(m, &L->compressor, NAME("layers.%d.attn.compressor", l), channels, c->head_dim, ratio);
        }
        if (c->attn_kind[l] == ATTN_CSA) {
            L->index_wq_b = load_linear(m, NAME("layers.%d.attn.indexer.wq_b", l), c->index_heads * c->index_dim, Q);
            L->index_weights_proj = load_linear(m, NAME("layers.%d.attn.indexer.weights_proj", l), c->index_heads, E);
            load_compressor(m, &L->index_compressor, NAME("layers.%d.attn.indexer.compressor", l), 2, c->index_dim, ratio);
        }
        L->gate = load_linear(m, NAME("layers.%d.ffn.gate", l), c->n_experts, E);
        if (is_hash_layer(c, l)) L->tid2eid = load_tid2eid(m, l);
        else L->gate_bias = small_tensor(m, NAME("layers.%d.ffn.gate.bias", l), 1, (int64_t[]){c->n_experts});
        L->w1 = load_experts(m, l, "w1", I, E);
        L->w2 = load_experts(m, l, "w2", E, I);
        L->w3 = load_experts(m, l, "w3", I, E);
        L->shared_w1 = load_linear(m, NAME("layers.%d.ffn.shared_experts.w1", l), I, E);
        L->shared_w2 = load_linear(m, NAME("layers.%d.ffn.shared_experts.w2", l), E, I);
        L->shared_w3 = load_linear(m, NAME("layers.%d.ffn.shared_experts.w3", l), I, E);
#undef NAME
        progress("loading layers", l + 1, c->n_layers);
    }
}

/* Read config.json from dir (fatal on anything wrong). */
static void load_config(Config *c, const char *dir) {
    char *path = path_join(dir, "config.json");
    Json *root = load_json_file(path);
    parse_config(c, root, path);
    json_free(root);
    free(path);
}

/* Load a model directory: config.json, then the checkpoint by mmap, every tensor validated. */
static void load_model(Model *m, const char *dir) {
    memset(m, 0, sizeof *m);
    load_config(&m->config, dir);
    open_checkpoint(m, dir);
    bind_weights(m);
}

/* Unmap the checkpoint and free everything load_model allocated. */
static void free_model(Model *m) {
    n_mapped = 0;
    for (int i = 0; i < m->n_files; i++) {
        munmap(m->files[i].map, m->files[i].size);
        free(m->files[i].path);
    }
    for (size_t i = 0; i < m->n_tensors; i++) free((char *)m->tensors[i].name);
    for (size_t i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    free(m->files);
    free(m->tensors);
    free(m->index);
    memset(m, 0, sizeof *m);
}

/* ============================================================================== CPU threads */
/* The CPU forward pass splits its two heavy loops across a pool of threads made once
   (pool_start): the rows of each linear layer (linear) and the routed experts of a chunk (moe).
   parallel_for(count, fn, arg) cuts [0, count) into one contiguous block per thread, runs
   fn(arg, thread, begin, end) on each (block 0 on the calling thread) and returns when all are
   done. A block only ever holds whole output elements (rows, experts), each computed by one
   thread in the order one thread would use, never a dot product split: the results are
   bit-identical for any number of threads. A parallel_for called from inside a block (a linear
   inside an expert) runs its whole range on the calling thread. */
typedef void (*BlockFn)(void *arg, int thread, int begin, int end);

static struct {
    int n;                      /* threads, the caller included (1: no workers) */
    pthread_t *workers;         /* [n - 1]: worker i runs block i + 1 */
    pthread_mutex_t lock;
    pthread_cond_t wake, done;  /* workers wait on wake for a job; the caller on done for its end */
    BlockFn fn;                 /* the job: fn over [0, count) */
    void *arg;
    int count;
    unsigned job;               /* jobs started: a worker tells a new job from a spurious wake-up */
    int running;                /* workers still in the job */
    int quit;
} pool = {1, NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, 0, 0, 0};
static _Thread_local int pool_thread = -1;   /* the block this thread runs now, -1 outside a job */

/* Run block `thread` of the current job. */
static void pool_block(int thread, BlockFn fn, void *arg, int count) {
    int n = pool.n;
    pool_thread = thread;
    fn(arg, thread, (int)((long long)count * thread / n), (int)((long long)count * (thread + 1) / n));
    pool_thread = -1;
}

static void *pool_worker(void *arg) {
    int thread = (int)(intptr_t)arg;
    unsigned seen = 0;   /* pool_start makes the workers before job 1 */
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.job == seen && !pool.quit) pthread_cond_wait(&pool.wake, &pool.lock);
        if (pool.quit) break;
        seen = pool.job;
        BlockFn fn = pool.fn;
        void *job_arg = pool.arg;
        int count = pool.count;
        pthread_mutex_unlock(&pool.lock);
        pool_block(thread, fn, job_arg, count);
        pthread_mutex_lock(&pool.lock);
        if (--pool.running == 0) pthread_cond_signal(&pool.done);
    }
    pthread_mutex_unlock(&pool.lock);
    return NULL;
}

/* fn over [0, count), in one block per thread (see above). */
static void parallel_for(int count, BlockFn fn, void *arg) {
    if (pool.n == 1 || pool_thread >= 0) {   /* no workers, or inside a block: all here */
        fn(arg, pool_thread >= 0 ? pool_thread : 0, 0, count);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    pool.fn = fn;
    pool.arg = arg;
    pool.count = count;
    pool.running = pool.n - 1;
    pool.job++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    pool_block(0, fn, arg, count);
    pthread_mutex_lock(&pool.lock);
    while (pool.running) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
}

/* End the workers: one thread (the caller) from now on. */
static void pool_stop(void) {
    pthread_mutex_lock(&pool.lock);
    pool.quit = 1;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 0; i < pool.n - 1; i++) pthread_join(pool.workers[i], NULL);
    free(pool.workers);
    pool.workers = NULL;
    pool.n = 1;
    pool.quit = 0;
    pool.job = 0;
}

/* Run the CPU forward pass on n threads, the caller included (ends any earlier workers). A state
   must be allocated after this call: its scratch has a weight row per thread. The workers take
   no asynchronous signal (SIGINT and the others reach the main thread, whose handlers expect
   them); the synchronous ones (SIGBUS of a shrunk checkpoint) stay with the thread that faults. */
static void pool_start(int n) {
    pool_stop();
    if (n <= 1) return;
    pool.workers = xcalloc((size_t)n - 1, sizeof *pool.workers);
    sigset_t all, old;
    sigfillset(&all);
    int synchronous[] = {SIGBUS, SIGSEGV, SIGFPE, SIGILL};
    for (int i = 0; i < 4; i++) sigdelset(&all, synchronous[i]);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < n - 1; i++, pool.n++) {
        int err = pthread_create(&pool.workers[i], NULL, pool_worker, (void *)(intptr_t)(i + 1));
        if (err) fatal("cannot start thread %d of %d: %s", i + 2, n, strerror(err));
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* The cores this process may run on (its affinity mask; the online cores when that is unknown). */
static int usable_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* =========================================================================== decoding state */
/* Everything the forward pass writes lives in one arena, laid out by plan_state from the chunk
   size T (max_tokens), the context C (max_ctx) and whether every row's logits are kept:
     the cache (persists between chunks): per layer a ring of W + T keys, and per compressor the
       window being filled, the CSA overlap and the C / ratio entries; the RoPE frequencies;
     the scratch of one chunk: activations, attention and MoE routing buffers, logits.
   Only `pos` (tokens already in the state) says how far the cache is filled; the rest follows:
     key of position p                 ring row p % (W + T) (a chunk's keys are written before
                                       attention, so a query's window never wraps onto itself)
     a query at p sees the window      positions max(0, p - W + 1) .. p
     compressor slot of position p     p % ratio; the window closes (an entry is emitted) when
                                       the slot is ratio - 1, as entry number p / ratio
     entries a query at p sees         (p + 1) / ratio (the entry just closed included)
     CSA overlap present               once an entry has been emitted before (p / ratio > 0)
   The GPU path lays the same plan over one device allocation. */

#define STATE_ALIGN 256   /* every buffer starts on a 256-byte boundary (vector and GPU friendly) */

typedef struct {
    size_t total;   /* bytes so far; SIZE_MAX once the sizes overflow */
    char *base;     /* the arena, or NULL to count only */
} StatePlan;

/* `bytes` rounded up to STATE_ALIGN: what one reservation of them takes in a plan. */
static size_t state_aligned(size_t bytes) { return (bytes + STATE_ALIGN - 1) / STATE_ALIGN * STATE_ALIGN; }

/* Reserve `count` items of `size` bytes in the plan; returns their address in the arena, or
   NULL when only counting. */
static void *reserve(StatePlan *p, size_t count, size_t size) {
    size_t bytes = count * size, start = p->total;
    if ((size && count > SIZE_MAX / size) || bytes > SIZE_MAX - STATE_ALIGN - start) {
        p->total = SIZE_MAX;
        return NULL;
    }
    p->total = state_aligned(start + bytes);
    return p->base ? p->base + start : NULL;
}

/* The cache of one compressor: `parts` [ratio, d] halves per token (2 for CSA, 1 for HCA). */
static void plan_compressor(StatePlan *p, CompressorCache *s, int parts, int d, int ratio, int C) {
    s->pending_kv = reserve(p, (size_t)ratio * parts * d, sizeof(float));
    s->pending_gate = reserve(p, (size_t)ratio * parts * d, sizeof(float));
    if (parts == 2) {
        s->prev_kv = reserve(p, (size_t)ratio * d, sizeof(float));
        s->prev_gate = reserve(p, (size_t)ratio * d, sizeof(float));
    }
    s->entries = reserve(p, (size_t)(C / ratio) * d, sizeof(float));
}

/* Rows of each layer's key ring: the window plus one chunk. */
static int ring_rows(const State *s, const Config *c) { return c->sliding_window + s->max_tokens; }

/* Lay the state for chunks of up to T tokens and a context of C tokens over `arena` (NULL:
   count only). s->layers must hold n_layers entries when laying out (it is left alone when
   counting). The scratch has a weight row for each of the pool's threads (pool_start comes
   first). Returns the arena's size in bytes (SIZE_MAX when that overflows). */
static size_t plan_state(State *s, const Config *c, int T, int C, int all_logits, char *arena) {
    StatePlan p = {0, arena};
    size_t E = c->hidden_size, H = c->n_heads, D = c->head_dim, DI = c->index_dim, NI = c->index_heads;
    size_t W = c->sliding_window, n = (size_t)T, K = c->topk, X = c->n_experts, I = c->moe_inter;
    size_t widest_entry = D > DI ? D : DI, G_O = (size_t)c->o_groups * c->o_lora_rank;
    s->max_tokens = T;
    s->max_ctx = C;
    s->all_logits = all_logits;
    s->threads = pool.n;
    s->arena = arena;

    /* the cache */
    s->rope_main = (Rope){reserve(&p, (size_t)c->rope_dim / 2, sizeof(float)), 1.0f};
    s->rope_compress = (Rope){reserve(&p, (size_t)c->rope_dim / 2, sizeof(float)), c->rope_scale};
    for (int l = 0; l < c->n_layers; l++) {
        LayerCache counted, *ls = arena ? &s->layers[l] : &counted;
        memset(ls, 0, sizeof *ls);
        ls->keys = reserve(&p, (W + n) * D, sizeof(float));
        int ratio = c->compress_ratio[l];
        if (ratio) plan_compressor(&p, &ls->comp, c->attn_kind[l] == ATTN_CSA ? 2 : 1, (int)D, ratio, C);
        if (c->attn_kind[l] == ATTN_CSA) plan_compressor(&p, &ls->index_comp, 2, (int)DI, ratio, C);
    }
    s->cache_bytes = p.total;

    /* the scratch of one chunk */
    size_t max_cols = E;   /* the widest input of any linear layer */
    size_t cols[] = {(size_t)c->q_lora_rank, H * D / c->o_groups, G_O, I};
    for (int i = 0; i < 4; i++) max_cols = cols[i] > max_cols ? cols[i] : max_cols;
    Scratch *w = &s->scratch;
    w->h = reserve(&p, n * HC * E, sizeof(float));
    w->x = reserve(&p, n * E, sizeof(float));
    w->post = reserve(&p, n * HC, sizeof(float));
    w->comb = reserve(&p, n * HC * HC, sizeof(float));
    w->block_out = reserve(&p, n * E, sizeof(float));
    w->qr = reserve(&p, n * c->q_lora_rank, sizeof(float));
    w->q = reserve(&p, n * H * D, sizeof(float));
    w->kv = reserve(&p, n * D, sizeof(float));
    w->attn = reserve(&p, n * H * D, sizeof(float));
    w->grouped = reserve(&p, n * G_O, sizeof(float));
    w->comp_kv = reserve(&p, n * 2 * widest_entry, sizeof(float));
    w->comp_gate = reserve(&p, n * 2 * widest_entry, sizeof(float));
    w->index_q = reserve(&p, n * NI * DI, sizeof(float));
    w->index_w = reserve(&p, n * NI, sizeof(float));
    w->scores = reserve(&p, W + (size_t)C, sizeof(float));
    w->values = reserve(&p, D, sizeof(double));
    w->weight_row = reserve(&p, (size_t)s->threads * max_cols, sizeof(float));
    w->weight_row_floats = max_cols;
    w->selected = reserve(&p, (size_t)C, sizeof(int));
    w->entry = reserve(&p, widest_entry, sizeof(float));
    w->router = reserve(&p, n * X, sizeof(float));
    w->biased = reserve(&p, X, sizeof(float));
    w->chosen = reserve(&p, n * K, sizeof(int));
    w->route_weight = reserve(&p, n * K, sizeof(float));
    w->expert_start = reserve(&p, X + 1, sizeof(int));
    w->slot_order = reserve(&p, n * K, sizeof(int));
    w->slot_row = reserve(&p, n * K, sizeof(int));
    w->expert_x = reserve(&p, n * K * E, sizeof(float));
    w->expert_gate = reserve(&p, n * K * I, sizeof(float));
    w->expert_up = reserve(&p, n * K * I, sizeof(float));
    w->expert_out = reserve(&p, n * K * E, sizeof(float));
    w->logits = reserve(&p, (all_logits ? n : 1) * c->vocab_size, sizeof(float));
    s->arena_bytes = p.total;
    return p.total;
}

/* Bytes of the state for (T, C, all_logits), or SIZE_MAX; allocates nothing. */
static size_t state_bytes(const Config *c, int T, int C, int all_logits) {
    State counted = {0};
    return plan_state(&counted, c, T, C, all_logits, NULL);
}

/* The R/2 inverse frequencies of the "main" rope (theta, plain) or of the "compress" rope
   (compress_rope_theta with YaRN), computed in float32 exactly as transformers does. */
static void rope_frequencies(const Config *c, int compress, float *inv_freq) {
    int dim = c->rope_dim;
    float base = compress ? c->compress_rope_theta : c->rope_theta;
    double low = 0, high = 0;
    if (compress && c->yarn) {   /* YaRN: blend interpolated and original frequencies over a ramp */
        double two_pi = 2 * M_PI, lb = log(base);
        low = floor(dim * log(c->yarn_original_max / (c->yarn_beta_fast * two_pi)) / (2 * lb));
        high = ceil(dim * log(c->yarn_original_max / (c->yarn_beta_slow * two_pi)) / (2 * lb));
        if (low < 0) low = 0;
        if (high > dim - 1) high = dim - 1;
        if (low == high) high += 0.001;
    }
    for (int i = 0; i < dim / 2; i++) {
        float pos_freq = powf(base, (float)(2 * i) / (float)dim);
        float extrapolation = 1.0f / pos_freq;
        if (!(compress && c->yarn)) { inv_freq[i] = extrapolation; continue; }
        float interpolation = 1.0f / (c->yarn_factor * pos_freq);
        float ramp = (float)(((float)i - low) / (high - low));
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float keep = 1.0f - ramp;   /* share of the original (extrapolated) frequency */
        inv_freq[i] = interpolation * (1.0f - keep) + extrapolation * keep;
    }
}

/* Allocate the state (zeroed: position 0) for chunks of up to T tokens and a context of C. */
static void alloc_state(State *s, const Config *c, int T, int C, int all_logits) {
    memset(s, 0, sizeof *s);
    size_t bytes = state_bytes(c, T, C, all_logits);
    if (bytes == SIZE_MAX) fatal("the state for --ctx %d and --chunk %d is too large to address", C, T);
    s->layers = xcalloc((size_t)c->n_layers, sizeof(LayerCache));
    plan_state(s, c, T, C, all_logits, xcalloc(1, bytes));
    rope_frequencies(c, 0, s->rope_main.inv_freq);
    rope_frequencies(c, 1, s->rope_compress.inv_freq);
}

/* Empty the state: position 0, as alloc_state leaves it, on either path. Nothing else is
   cleared, nor needs to be: every read of the cache is bounded by `pos` (the plan above), so
   what earlier tokens left there is never seen again. */
static void reset_state(State *s) { s->pos = 0; }

/* Free what alloc_state allocated. */
static void free_state(State *s) {
    free(s->arena);
    free(s->layers);
    memset(s, 0, sizeof *s);
}

/* ========================================================================= CPU forward pass */
/* Plain C, float32 activations with double accumulators: the reference for every GPU kernel
   and the engine's own CPU path. It computes what transformers' DeepseekV4ForCausalLM computes
   (docs/model.md, "What nvfp4 computes"), one chunk of T consecutive tokens at a time. */

/* y[t, r] = sum_c W[row0 + r, c] * x[t, c] for r < nrows, t < T; x rows are x_stride floats
   apart, y rows y_stride. `row` is scratch for one decoded weight row: each row of W is decoded
   once for all T inputs, and four inputs share each load of it (four independent sums, each
   still added in column order, so the result does not depend on T). */
static void linear_rows(const Linear *w, int row0, int nrows, const float *x, size_t x_stride, float *y,
                        size_t y_stride, int T, float *row) {
    for (int r = 0; r < nrows; r++) {
        linear_row(w, row0 + r, row);
        int t = 0;
        for (; t + 4 <= T; t += 4) {
            const float *x0 = x + (size_t)t * x_stride, *x1 = x0 + x_stride, *x2 = x1 + x_stride, *x3 = x2 + x_stride;
            double acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
            for (int c = 0; c < w->cols; c++) {
                double wc = row[c];
                acc0 += wc * x0[c];
                acc1 += wc * x1[c];
                acc2 += wc * x2[c];
                acc3 += wc * x3[c];
            }
            y[(size_t)t * y_stride + r] = (float)acc0;
            y[(size_t)(t + 1) * y_stride + r] = (float)acc1;
            y[(size_t)(t + 2) * y_stride + r] = (float)acc2;
            y[(size_t)(t + 3) * y_stride + r] = (float)acc3;
        }
        for (; t < T; t++) {
            const float *xt = x + (size_t)t * x_stride;
            double acc = 0;
            for (int c = 0; c < w->cols; c++) acc += (double)row[c] * xt[c];
            y[(size_t)t * y_stride + r] = (float)acc;
        }
    }
}

/* linear_rows with the rows split across the pool's threads, each decoding into its own row of
   the scratch's weight_row. */
typedef struct {
    const Linear *w;
    int row0;
    const float *x;
    size_t x_stride;
    float *y;
    size_t y_stride;
    int T;
    const Scratch *scratch;
} LinearJob;

static void linear_block(void *arg, int thread, int begin, int end) {
    const LinearJob *j = arg;
    float *row = j->scratch->weight_row + (size_t)thread * j->scratch->weight_row_floats;
    linear_rows(j->w, j->row0 + begin, end - begin, j->x, j->x_stride, j->y + begin, j->y_stride, j->T, row);
}

static void parallel_linear_rows(const Linear *w, int row0, int nrows, const float *x, size_t x_stride, float *y,
                                 size_t y_stride, int T, const Scratch *scratch) {
    LinearJob job = {w, row0, x, x_stride, y, y_stride, T, scratch};
    parallel_for(nrows, linear_block, &job);
}

/* y[T, rows] = x[T, cols] W^T, the rows split across the pool's threads. */
static void linear(const Linear *w, const float *x, float *y, int T, const Scratch *scratch) {
    parallel_linear_rows(w, 0, w->rows, x, (size_t)w->cols, y, (size_t)w->rows, T, scratch);
}

/* out[n] = x * rsqrt(mean(x^2) + eps) * weight (weight NULL: unweighted). out may be x. */
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * (weight ? weight[i] : 1.0f);
}

/* Rotate the interleaved pairs (x[2i], x[2i+1]) of x[R] by angle sign * pos * inv_freq[i]
   (cos and sin both scaled by r->scale, YaRN's attention factor, 1 for V4). The angle is
   formed in double, so it stays exact at a million positions (float would be off by up to
   0.03 rad there). */
static void rope(float *x, int R, int pos, const Rope *r, float sign) {
    for (int i = 0; i < R / 2; i++) {
        double angle = (double)pos * r->inv_freq[i];
        float cs = (float)cos(angle) * r->scale, sn = sign * (float)sin(angle) * r->scale;
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cs - b * sn;
        x[2 * i + 1] = b * cs + a * sn;
    }
}

/* 1 / (1 + e^-x) */
static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ------------------------------------------------------------------------------------ mHC */
/* The mHC mixing logits of one token: mix[rows] = (fn [rows, HC*E] . h) / rms(h), the streams
   h[HC, E] flattened and RMS-normalized (no weight). */
static void hc_mix(const Config *c, const float *h, const float *fn, int rows, float *mix) {
    int n = HC * c->hidden_size;
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)h[i] * h[i];
    double inv_rms = 1.0 / sqrt(ss / n + c->rms_eps);
    for (int k = 0; k < rows; k++) {
        double acc = 0;
        for (int i = 0; i < n; i++) acc += (double)fn[(size_t)k * n + i] * h[i];
        mix[k] = (float)(acc * inv_rms);
    }
}

/* x[E] = sum_i pre[i] * h[i]: the HC streams collapsed into a block's input. */
static void hc_collapse(const Config *c, const float *h, const float *pre, float *x) {
    for (int e = 0; e < c->hidden_size; e++) {
        float acc = 0;
        for (int i = 0; i < HC; i++) acc += pre[i] * h[(size_t)i * c->hidden_size + e];
        x[e] = acc;
    }
}

/* comb[HC, HC] <- Sinkhorn projection of the logits in comb: a softmax over each row, then
   `iters` rounds of dividing columns (and, after the first round, rows first) by their sums. */
static void sinkhorn(const Config *c, float *comb) {
    for (int i = 0; i < HC; i++) {
        float *row = comb + i * HC, mx = -INFINITY, sum = 0;
        for (int j = 0; j < HC; j++) mx = fmaxf(mx, row[j]);
        for (int j = 0; j < HC; j++) sum += row[j] = expf(row[j] - mx);
        for (int j = 0; j < HC; j++) row[j] = row[j] / sum + c->hc_eps;
    }
    for (int iter = 0; iter < c->sinkhorn_iters; iter++) {
        if (iter > 0)
            for (int i = 0; i < HC; i++) {
                float sum = 0;
                for (int j = 0; j < HC; j++) sum += comb[i * HC + j];
                for (int j = 0; j < HC; j++) comb[i * HC + j] /= sum + c->hc_eps;
            }
        for (int j = 0; j < HC; j++) {
            float sum = 0;
            for (int i = 0; i < HC; i++) sum += comb[i * HC + j];
            for (int i = 0; i < HC; i++) comb[i * HC + j] /= sum + c->hc_eps;
        }
    }
}

/* mHC input side for one token. h[HC, E] are the residual streams, p a block's parameters.
   Writes x[E] = sum_i pre[i] h[i], post[HC] and the Sinkhorn-projected comb[HC, HC]
   (comb[i][j] = how much of stream i flows into stream j). */
static void hc_pre(const Config *c, const float *h, const HcParams *p, float *x, float *post, float *comb) {
    float mix[(2 + HC) * HC], pre[HC];
    hc_mix(c, h, p->fn, (2 + HC) * HC, mix);
    for (int i = 0; i < HC; i++) {
        pre[i] = sigmoid(mix[i] * p->scale[0] + p->base[i]) + c->hc_eps;
        post[i] = 2 * sigmoid(mix[HC + i] * p->scale[1] + p->base[HC + i]);
    }
    for (int k = 0; k < HC * HC; k++) comb[k] = mix[2 * HC + k] * p->scale[2] + p->base[2 * HC + k];
    sinkhorn(c, comb);
    hc_collapse(c, h, pre, x);
}

/* mHC output side: h[j] <- post[j] * out + sum_i comb[i][j] * h[i], for the HC streams h[HC, E]. */
static void hc_post(const Config *c, float *h, const float *out, const float *post, const float *comb) {
    for (int e = 0; e < c->hidden_size; e++) {
        float old[HC];
        for (int i = 0; i < HC; i++) old[i] = h[(size_t)i * c->hidden_size + e];
        for (int j = 0; j < HC; j++) {
            float acc = post[j] * out[e];
            for (int i = 0; i < HC; i++) acc += comb[i * HC + j] * old[i];
            h[(size_t)j * c->hidden_size + e] = acc;
        }
    }
}

/* Final collapse of the HC streams h[HC, E] into x[E] (hc_head: the pre part of mHC only). */
static void hc_head(const Model *m, const float *h, float *x) {
    const Config *c = &m->config;
    const HcParams *p = &m->hc_head;
    float mix[HC], pre[HC];
    hc_mix(c, h, p->fn, HC, mix);
    for (int k = 0; k < HC; k++) pre[k] = sigmoid(mix[k] * p->scale[0] + p->base[k]) + c->hc_eps;
    hc_collapse(c, h, pre, x);
}

/* ----------------------------------------------------------------------------- compressor */
/* A compressor turns every `ratio` tokens into one entry. Each token projects kv and gate of
   `parts` * d channels (CSA: 2 parts, the first for the NEXT window's entry, the second for
   its own; HCA: 1). An entry is, per channel, a softmax over its window's slots of
   (gate + ape[slot]) weighting the kv values; a CSA entry also spans the previous window's
   first-part channels (the overlap). Then RMSNorm and the compress RoPE at the window's first
   position. */

/* Emit entry number `index` from the closed window in s (slots 0..ratio-1): pool, keep the
   overlap for the next entry (CSA), normalize and rotate into s->entries[index]. */
static void compressor_emit(const Config *c, const Compressor *w, CompressorCache *s, int parts, int d, int ratio,
                            int index, const Rope *rope_compress, float *entry) {
    int width = parts * d, own_part = parts == 2 ? d : 0;   /* channel offset of this window's part */
    int overlap = parts == 2 && index > 0;                  /* a previous window exists */
    for (int j = 0; j < d; j++) {
        double slot_gate[2 * ratio], slot_kv[2 * ratio], mx = -INFINITY, sum = 0, acc = 0;
        int n = 0;
        for (int k = 0; overlap && k < ratio; k++, n++) {
            slot_gate[n] = s->prev_gate[(size_t)k * d + j];
            slot_kv[n] = s->prev_kv[(size_t)k * d + j];
        }
        for (int k = 0; k < ratio; k++, n++) {
            size_t at = (size_t)k * width + own_part + j;
            slot_gate[n] = s->pending_gate[at] + w->ape[at];
            slot_kv[n] = s->pending_kv[at];
        }
        for (int k = 0; k < n; k++) mx = fmax(mx, slot_gate[k]);
        for (int k = 0; k < n; k++) {
            double p = exp(slot_gate[k] - mx);
            sum += p;
            acc += p * slot_kv[k];
        }
        entry[j] = (float)(acc / sum);
    }
    if (parts == 2)   /* this window's first part is the next entry's overlap */
        for (int k = 0; k < ratio; k++)
            for (int j = 0; j < d; j++) {
                size_t at = (size_t)k * width + j;
                s->prev_kv[(size_t)k * d + j] = s->pending_kv[at];
                s->prev_gate[(size_t)k * d + j] = s->pending_gate[at] + w->ape[at];
            }
    float *out = s->entries + (size_t)index * d;
    rmsnorm(out, entry, w->norm, d, c->rms_eps);
    rope(out + d - c->rope_dim, c->rope_dim, index * ratio, rope_compress, 1);
}

/* Feed the projections kv[T, parts*d] and gate[T, parts*d] of positions pos0.. into the
   compressor cache s, emitting an entry each time a window closes. */
static void compressor_feed(const Config *c, const Compressor *w, CompressorCache *s, int parts, int d, int ratio,
                            const float *kv, const float *gate, int T, int pos0, const Rope *rope_compress, float *entry) {
    size_t width = (size_t)parts * d;
    for (int t = 0; t < T; t++) {
        int pos = pos0 + t, slot = pos % ratio;
        memcpy(s->pending_kv + slot * width, kv + t * width, width * sizeof(float));
        memcpy(s->pending_gate + slot * width, gate + t * width, width * sizeof(float));
        if (slot == ratio - 1) compressor_emit(c, w, s, parts, d, ratio, pos / ratio, rope_compress, entry);
    }
}

/* ------------------------------------------------------------------------------ attention */
/* Indices of the k largest of score[0..n) into out[k] (k <= n); ties go to the lower index. */
static void top_k(const float *score, int n, int k, int *out) {
    for (int i = 0; i < k; i++) out[i] = -1;
    for (int i = 0; i < n; i++) {
        int at = k;
        while (at > 0 && (out[at - 1] < 0 || score[i] > score[out[at - 1]])) at--;
        if (at == k) continue;
        memmove(out + at + 1, out + at, (size_t)(k - at - 1) * sizeof(int));
        out[at] = i;
    }
}

/* The keys (= values) one query attends to: n_window positions from `first` in a layer's ring
   of ring_rows rows, then n_selected compressed entries, by index into `entries`. */
typedef struct {
    const float *ring;
    int ring_rows, first, n_window;
    const float *entries;
    const int *selected;
    int n_selected;
} KeySet;

/* Key number k of the set, [D]. */
static const float *key_at(const KeySet *keys, int k, int D) {
    if (k < keys->n_window) return keys->ring + (size_t)((keys->first + k) % keys->ring_rows) * D;
    return keys->entries + (size_t)keys->selected[k - keys->n_window] * D;
}

/* The compressed entries query t (at pos) of layer l attends to, into s->scratch.selected;
   returns how many. Only entries e < (pos + 1) / ratio are visible (their window has closed).
   HCA: all of them. CSA: the lightning indexer's top index_topk by
   score[e] = sum_h relu(qI[t,h] . kI[e]) / sqrt(DI) * w[t,h] / sqrt(NI). */
static int select_entries(const Config *c, State *s, int l, int t, int pos) {
    Scratch *w = &s->scratch;
    int ratio = c->compress_ratio[l], visible = ratio ? (pos + 1) / ratio : 0;
    if (c->attn_kind[l] == ATTN_HCA) {
        for (int e = 0; e < visible; e++) w->selected[e] = e;
        return visible;
    }
    if (c->attn_kind[l] != ATTN_CSA) return 0;
    int NI = c->index_heads, DI = c->index_dim;
    for (int e = 0; e < visible; e++) {
        const float *key = s->layers[l].index_comp.entries + (size_t)e * DI;
        double score = 0;
        for (int h = 0; h < NI; h++) {
            const float *q = w->index_q + ((size_t)t * NI + h) * DI;
            double dot = 0;
            for (int i = 0; i < DI; i++) dot += (double)q[i] * key[i];
            if (dot > 0) score += dot / sqrt((double)DI) * (w->index_w[(size_t)t * NI + h] / sqrt((double)NI));
        }
        w->scores[e] = (float)score;
    }
    int n = visible < c->index_topk ? visible : c->index_topk;
    top_k(w->scores, visible, n, w->selected);
    return n;
}

/* One head of one query at pos: o[D] = softmax(q . keys / sqrt(D), with the sink) . keys, then
   the inverse RoPE at pos on o's rope dims. scores [n keys] and values [D] are scratch. */
static void attend(const Config *c, const float *q, float sink, const KeySet *keys, int pos, const Rope *rope_l,
                   float *scores, double *values, float *o) {
    int D = c->head_dim, R = c->rope_dim, n = keys->n_window + keys->n_selected;
    float mx = sink;
    for (int k = 0; k < n; k++) {
        const float *key = key_at(keys, k, D);
        double dot = 0;
        for (int i = 0; i < D; i++) dot += (double)q[i] * key[i];
        scores[k] = (float)(dot / sqrt((double)D));
        mx = fmaxf(mx, scores[k]);
    }
    double denom = exp((double)sink - mx);   /* the sink takes probability, gives no value */
    for (int i = 0; i < D; i++) values[i] = 0;
    for (int k = 0; k < n; k++) {
        const float *value = key_at(keys, k, D);   /* K = V */
        double p = expf(scores[k] - mx);
        denom += p;
        for (int i = 0; i < D; i++) values[i] += p * value[i];
    }
    for (int i = 0; i < D; i++) o[i] = (float)(values[i] / denom);
    rope(o + D - R, R, pos, rope_l, -1);   /* undo the values' rotation: relative positions */
}

/* Queries q[T, H, D] (normed, rotated) and the shared latent kv[T, D] of the chunk. */
static void attention_projections(const Config *c, const Layer *L, Scratch *w, int T, int pos0, const Rope *rope_l) {
    int H = c->n_heads, D = c->head_dim, R = c->rope_dim, Q = c->q_lora_rank;
    linear(&L->wq_a, w->x, w->qr, T, w);
    for (int t = 0; t < T; t++) rmsnorm(w->qr + (size_t)t * Q, w->qr + (size_t)t * Q, L->q_norm, Q, c->rms_eps);
    linear(&L->wq_b, w->qr, w->q, T, w);
    linear(&L->wkv, w->x, w->kv, T, w);
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) {
            float *q = w->q + ((size_t)t * H + h) * D;
            rmsnorm(q, q, NULL, D, c->rms_eps);
            rope(q + D - R, R, pos0 + t, rope_l, 1);
        }
        float *kv = w->kv + (size_t)t * D;
        rmsnorm(kv, kv, L->kv_norm, D, c->rms_eps);
        rope(kv + D - R, R, pos0 + t, rope_l, 1);
    }
}

/* CSA / HCA layers: feed the compressor (and for CSA the indexer's compressor); CSA: the
   indexer's queries index_q[T, NI, DI] (rotated) and head weights index_w[T, NI]. */
static void compress_and_index(const Config *c, const Layer *L, State *s, int l, int T, int pos0) {
    Scratch *w = &s->scratch;
    LayerCache *ls = &s->layers[l];
    int ratio = c->compress_ratio[l], csa = c->attn_kind[l] == ATTN_CSA;
    linear(&L->compressor.wkv, w->x, w->comp_kv, T, w);
    linear(&L->compressor.wgate, w->x, w->comp_gate, T, w);
    compressor_feed(c, &L->compressor, &ls->comp, csa ? 2 : 1, c->head_dim, ratio, w->comp_kv, w->comp_gate, T, pos0,
                    &s->rope_compress, w->entry);
    if (!csa) return;
    int NI = c->index_heads, DI = c->index_dim, R = c->rope_dim;
    linear(&L->index_compressor.wkv, w->x, w->comp_kv, T, w);
    linear(&L->index_compressor.wgate, w->x, w->comp_gate, T, w);
    compressor_feed(c, &L->index_compressor, &ls->index_comp, 2, DI, ratio, w->comp_kv, w->comp_gate, T, pos0,
                    &s->rope_compress, w->entry);
    linear(&L->index_wq_b, w->qr, w->index_q, T, w);
    linear(&L->index_weights_proj, w->x, w->index_w, T, w);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < NI; h++) rope(w->index_q + ((size_t)t * NI + h) * DI + DI - R, R, pos0 + t, &s->rope_compress, 1);
}

/* Attention sub-block of layer l for the chunk: x[T, E] (normed) -> block_out[T, E]. */
static void attention(const Model *m, State *s, int l, int T, int pos0) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    Scratch *w = &s->scratch;
    LayerCache *ls = &s->layers[l];
    int H = c->n_heads, D = c->head_dim, W = c->sliding_window, rows = ring_rows(s, c);
    const Rope *rope_l = c->attn_kind[l] == ATTN_SLIDING ? &s->rope_main : &s->rope_compress;

    attention_projections(c, L, w, T, pos0, rope_l);
    if (c->compress_ratio[l]) compress_and_index(c, L, s, l, T, pos0);
    for (int t = 0; t < T; t++)   /* the chunk's keys join the ring before any query reads it */
        memcpy(ls->keys + (size_t)((pos0 + t) % rows) * D, w->kv + (size_t)t * D, D * sizeof(float));

    /* each query: the sliding window of the last W positions plus its compressed entries */
    for (int t = 0; t < T; t++) {
        int pos = pos0 + t, first = pos - W + 1 > 0 ? pos - W + 1 : 0;
        KeySet keys = {ls->keys, rows, first, pos - first + 1, ls->comp.entries, w->selected, 0};
        keys.n_selected = select_entries(c, s, l, t, pos);
        for (int h = 0; h < H; h++)
            attend(c, w->q + ((size_t)t * H + h) * D, L->attn_sink[h], &keys, pos, rope_l, w->scores, w->values,
                   w->attn + ((size_t)t * H + h) * D);
    }

    /* grouped output projection: group g's heads -> O dims each, then wo_b mixes the groups */
    int G = c->o_groups, O = c->o_lora_rank, group_in = H * D / G;
    for (int g = 0; g < G; g++)
        parallel_linear_rows(&L->wo_a, g * O, O, w->attn + (size_t)g * group_in, (size_t)H * D,
                             w->grouped + (size_t)g * O, (size_t)G * O, T, w);
    linear(&L->wo_b, w->grouped, w->block_out, T, w);
}

/* ------------------------------------------------------------------------------------ MoE */
/* The MoE runs by slot: slot t*K + k is token t's k-th chosen expert. The router fills
   chosen[T, K] and route_weight[T, K]; the slots are grouped by expert (counts, then offsets);
   each chosen expert runs once over all its slots' rows, decoding each weight row once per
   chunk; the combine adds every slot's output, weighted, to its token's row. The GPU kernels
   have this shape. */

/* Router of layer l for the chunk: scores sqrt(softplus(x . gate)) [T, X]; experts by
   tid2eid (hash layers) or the top-K of score + bias; weights = chosen scores normalized to
   sum 1, times routed_scaling_factor. */
static void route(const Model *m, State *s, int l, const int *tokens, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    Scratch *w = &s->scratch;
    int X = c->n_experts, K = c->topk;
    linear(&L->gate, w->x, w->router, T, w);
    for (int t = 0; t < T; t++) {
        float *score = w->router + (size_t)t * X;
        int *chosen = w->chosen + (size_t)t * K;
        for (int e = 0; e < X; e++) {
            float z = score[e];
            score[e] = sqrtf(z > 20 ? z : log1pf(expf(z)));
            if (!is_hash_layer(c, l)) w->biased[e] = score[e] + L->gate_bias[e];
        }
        if (is_hash_layer(c, l))
            for (int k = 0; k < K; k++) chosen[k] = L->tid2eid[(size_t)tokens[t] * K + k];
        else
            top_k(w->biased, X, K, chosen);
        double total = 0;
        for (int k = 0; k < K; k++) total += score[chosen[k]];
        for (int k = 0; k < K; k++)
            w->route_weight[(size_t)t * K + k] = (float)(score[chosen[k]] / (total + 1e-20)) * c->routed_scaling;
    }
}

/* Group the n_slots slots by expert (counting sort, stable): expert_start[X + 1], slot_order
   and its inverse slot_row. */
static void group_slots(Scratch *w, int X, int n_slots) {
    memset(w->expert_start, 0, (size_t)(X + 1) * sizeof(int));
    for (int i = 0; i < n_slots; i++) w->expert_start[w->chosen[i] + 1]++;       /* counts */
    for (int e = 0; e < X; e++) w->expert_start[e + 1] += w->expert_start[e];   /* offsets */
    for (int i = 0; i < n_slots; i++) {   /* place in slot order; expert_start[e] advances to e's end */
        int row = w->expert_start[w->chosen[i]]++;
        w->slot_order[row] = i;
        w->slot_row[i] = row;
    }
    for (int e = X; e > 0; e--) w->expert_start[e] = w->expert_start[e - 1];   /* each moved one expert on */
    w->expert_start[0] = 0;
}

/* One expert (or the shared expert) on n rows: out[n, E] = w2(silu(min(w1 x, limit)) *
   clamp(w3 x, -limit, limit)) for x[n, E]; gate and up [n, I] hold w1's and w3's outputs. */
static void expert_ffn(const Config *c, const Scratch *w, const Linear *w1, const Linear *w2, const Linear *w3,
                       const float *x, int n, float *gate, float *up, float *out) {
    int I = c->moe_inter;
    float limit = c->swiglu_limit;
    linear(w1, x, gate, n, w);
    linear(w3, x, up, n, w);
    for (size_t i = 0; i < (size_t)n * I; i++) {
        float g = fminf(gate[i], limit), u = fmaxf(fminf(up[i], limit), -limit);
        gate[i] = g / (1.0f + expf(-g)) * u;
    }
    linear(w2, gate, out, n, w);
}

/* The routed experts of layer l whose first slot (expert_start[e]) lies in [begin, end): a
   block of slots, so that threads share the rows to compute rather than the experts. Each
   expert works in its own rows of expert_gate and expert_up. */
typedef struct {
    const Model *m;
    const Scratch *w;
    int l;
} ExpertsJob;

static void experts_block(void *arg, int thread, int begin, int end) {
    (void)thread;
    const ExpertsJob *j = arg;
    const Config *c = &j->m->config;
    const Layer *L = &j->m->layers[j->l];
    const Scratch *w = j->w;
    size_t E = c->hidden_size, I = c->moe_inter;
    for (int e = 0; e < c->n_experts; e++) {
        int start = w->expert_start[e], n = w->expert_start[e + 1] - start;
        if (!n || start < begin || start >= end) continue;
        Linear w1 = expert_matrix(&L->w1, e), w2 = expert_matrix(&L->w2, e), w3 = expert_matrix(&L->w3, e);
        expert_ffn(c, w, &w1, &w2, &w3, w->expert_x + start * E, n, w->expert_gate + start * I, w->expert_up + start * I,
                   w->expert_out + start * E);
    }
}

/* MoE sub-block of layer l for the chunk: x[T, E] (normed) -> block_out[T, E]. */
static void moe(const Model *m, State *s, int l, const int *tokens, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    Scratch *w = &s->scratch;
    int E = c->hidden_size, X = c->n_experts, K = c->topk, n_slots = T * K;
    route(m, s, l, tokens, T);
    group_slots(w, X, n_slots);
    for (int row = 0; row < n_slots; row++)   /* gather each slot's input row, in expert order */
        memcpy(w->expert_x + (size_t)row * E, w->x + (size_t)(w->slot_order[row] / K) * E, E * sizeof(float));
    ExpertsJob job = {m, w, l};
    parallel_for(n_slots, experts_block, &job);   /* the routed experts, split across the threads */
    expert_ffn(c, w, &L->shared_w1, &L->shared_w2, &L->shared_w3, w->x, T, w->expert_gate, w->expert_up, w->block_out);
    for (int t = 0; t < T; t++) {   /* combine: the shared expert's output plus each slot, weighted */
        float *out = w->block_out + (size_t)t * E;
        for (int k = 0; k < K; k++) {
            int slot = t * K + k;
            const float *y = w->expert_out + (size_t)w->slot_row[slot] * E;
            for (int e = 0; e < E; e++) out[e] += w->route_weight[slot] * y[e];
        }
    }
}

/* ------------------------------------------------------------------------------- forward */
/* Run T tokens (positions s->pos ...) through the model, advancing the state. Writes logits
   into s->scratch.logits: every row [T, V] when all_logits (the state must have been laid out
   for it), else only the last token's [1, V]. Refuses a chunk larger than the state's
   max_tokens or one that would pass its max_ctx. */
static void forward(const Model *m, State *s, const int *tokens, int T, int all_logits) {
    const Config *c = &m->config;
    Scratch *w = &s->scratch;
    int E = c->hidden_size, pos0 = s->pos;
    if (T < 1 || T > s->max_tokens) fatal("forward: a chunk of %d tokens (the state holds 1 to %d)", T, s->max_tokens);
    if (T > s->max_ctx - pos0) fatal("forward: positions %d..%d pass the context of %d", pos0, pos0 + T - 1, s->max_ctx);
    if (all_logits && !s->all_logits) fatal("forward: every row's logits asked of a state laid out for the last row only");
    if (pool.n > s->threads) fatal("forward: %d threads run, the state was laid out for %d (pool_start comes first)", pool.n, s->threads);
    for (int t = 0; t < T; t++) {   /* embedding, copied into the HC residual streams */
        for (int e = 0; e < E; e++) {
            float v = tensor_float(&m->embed, (size_t)tokens[t] * E + e);
            for (int i = 0; i < HC; i++) w->h[((size_t)t * HC + i) * E + e] = v;
        }
    }
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        for (int block = 0; block < 2; block++) {   /* 0: attention, 1: MoE */
            for (int t = 0; t < T; t++) {
                float *x = w->x + (size_t)t * E;
                hc_pre(c, w->h + (size_t)t * HC * E, block ? &L->hc_ffn : &L->hc_attn, x, w->post + (size_t)t * HC,
                       w->comb + (size_t)t * HC * HC);
                rmsnorm(x, x, block ? L->ffn_norm : L->attn_norm, E, c->rms_eps);
            }
            if (block == 0) attention(m, s, l, T, pos0);
            else moe(m, s, l, tokens, T);
            for (int t = 0; t < T; t++)
                hc_post(c, w->h + (size_t)t * HC * E, w->block_out + (size_t)t * E, w->post + (size_t)t * HC,
                        w->comb + (size_t)t * HC * HC);
        }
    }
    int first = all_logits ? 0 : T - 1;
    for (int t = first; t < T; t++) {
        float *x = w->x + (size_t)(t - first) * E;
        hc_head(m, w->h + (size_t)t * HC * E, x);
        rmsnorm(x, x, m->norm, E, c->rms_eps);
    }
    linear(&m->head, w->x, w->logits, T - first, w);
    s->pos += T;
}

/* ================================================================================= sampler */

/* xorshift64*: a small, seedable random source (state must not be 0). */
static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

/* Uniform in [0, 1) with 24 random bits. */
static float random_float(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

/* Index of the largest of x[n] (the first of equals). */
static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static const float *sort_probs;   /* probabilities that compare_prob_desc orders by */
static int compare_prob_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    float x = sort_probs[i], y = sort_probs[j];
    return x < y ? 1 : x > y ? -1 : (i > j) - (i < j);   /* equal probabilities: the lower id first */
}

/* Remember the tokens ids[0..n) as fed to the model (the prompt, then each sampled token), for
   the repeat penalty. */
static void sampler_feed(Sampler *s, const int *ids, int n) {
    for (int i = 0; s->repeat_last_n && i < n; i++, s->n_fed++) s->recent[s->n_fed % s->repeat_last_n] = ids[i];
}

/* The distribution sample() draws from, for logits[V] (left as they are: --dump-logits writes
   them after). In order (llama.cpp's, but for top-p, see docs/usage.md):
   1. repeat penalty: each distinct token among the last repeat_last_n fed has its logit divided
      by repeat_penalty (multiplied, when the logit is negative);
   2. greedy when temperature is 0: the largest (penalized) logit;
   3. top-k: only the top_k largest logits stay (ties: the lower id);
   4. min-p: only the logits within log(min_p) of the largest stay (probability at least min_p
      times the most likely token's, at temperature 1);
   5. softmax(logits / temperature) over those, then top-p: the smallest set of most likely
      tokens whose probability reaches top_p.
   Returns n, the tokens kept: s->order[0..n) (most likely first, the lower id first among
   equals), their probabilities in s->probs[id], the sum of those in *kept; or 0 when there is
   nothing to draw: *token is then the choice (greedy, or no token reaching top-p's cutoff). */
static int sample_kept(Sampler *s, const float *logits_in, int V, int *token, double *kept) {
    int penalize = s->repeat_penalty != 1 && s->repeat_last_n && s->n_fed;
    int masked = (s->top_k > 0 && s->top_k < V) || s->min_p > 0;
    float *logits = s->probs;
    if (penalize || (masked && s->temperature > 0)) {
        memcpy(logits, logits_in, (size_t)V * sizeof(float));
        int n_recent = s->n_fed < s->repeat_last_n ? s->n_fed : s->repeat_last_n;
        for (int i = 0; penalize && i < n_recent; i++) {   /* from the unpenalized logit: a repeat rewrites the same value */
            int id = s->recent[i];
            if (id >= 0 && id < V)
                logits[id] = logits_in[id] > 0 ? logits_in[id] / s->repeat_penalty : logits_in[id] * s->repeat_penalty;
        }
        logits_in = logits;
    }
    *token = argmax(logits_in, V);
    if (s->temperature <= 0) return 0;
    float mx = logits_in[*token];
    if (s->top_k > 0 && s->top_k < V) {
        for (int i = 0; i < V; i++) s->order[i] = i;
        sort_probs = logits;   /* the logits, largest first, the lower id first among equals */
        qsort(s->order, (size_t)V, sizeof(int), compare_prob_desc);
        for (int i = s->top_k; i < V; i++) logits[s->order[i]] = -INFINITY;
    }
    float floor = s->min_p > 0 ? mx + logf(s->min_p) : -INFINITY;
    for (int i = 0; s->min_p > 0 && i < V; i++)
        if (logits[i] < floor) logits[i] = -INFINITY;
    double sum = 0;
    for (int i = 0; i < V; i++) sum += logits[i] = expf((logits_in[i] - mx) / s->temperature);
    for (int i = 0; i < V; i++) logits[i] = (float)(logits[i] / sum);
    int n = 0;
    float cutoff = s->top_p < 1 ? (1 - s->top_p) / (V > 1 ? V - 1 : 1) : 0;   /* can never be in the set */
    for (int i = 0; i < V; i++)
        if (logits[i] >= cutoff && logits[i] > 0) s->order[n++] = i;   /* masked tokens have 0 */
    if (n == 0) {   /* a flat distribution under a tiny top_p */
        *token = argmax(logits, V);
        return 0;
    }
    sort_probs = logits;
    qsort(s->order, (size_t)n, sizeof(int), compare_prob_desc);
    *kept = 0;
    for (int i = 0; i < n; i++) {
        *kept += logits[s->order[i]];
        if (*kept >= s->top_p) return i + 1;
    }
    return n;
}

/* Pick the next token from logits[V]: a draw from sample_kept's distribution (r uniform in the
   kept mass, the tokens walked most likely first). */
static int sample(Sampler *s, const float *logits, int V) {
    int token, n;
    double kept = 0;
    if (!(n = sample_kept(s, logits, V, &token, &kept))) return token;
    double r = random_float(&s->rng) * kept, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += s->probs[s->order[i]];
        if (r < acc) return s->order[i];
    }
    return s->order[n - 1];
}

/* ========================================================================= GPU: driver API */
/* The GPU path drives hand-written PTX kernels (kernels.ptx) through the CUDA driver API.
   libcuda.so.1 is opened with dlopen at run time, so the same binary starts, and runs the CPU
   path, where no driver or no GPU exists. `make` assembles kernels.ptx with ptxas for sm_90a
   and embeds the cubin (build/kernels_cubin.h, compiled in with -DNVFP4_GPU); a binary built
   where ptxas was missing has no kernels and says so. Each GPU: its primary context, one
   non-default stream; several GPUs sum their parts through peer memory or NCCL (libnccl.so.2,
   dlopen too: see "NCCL"). Every driver call goes through CU_CHECK, which names the call,
   file:line and the driver's error. The types below are the driver's (cuda.h of CUDA 13.0),
   declared here so that the build needs no CUDA headers. */
#include <dlfcn.h>

typedef int CUresult;                        /* 0 = CUDA_SUCCESS */
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;      /* a device address */
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUgraph_st *CUgraph;
typedef struct {               /* CUlaunchAttribute: an attribute id and its 64-byte value */
    int id;
    char pad[4];
    union { char bytes[64]; int value; } value;
} CUlaunchAttribute;
typedef struct {               /* CUlaunchConfig */
    unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_bytes;
    CUstream stream;
    CUlaunchAttribute *attributes;
    unsigned n_attributes;
} CUlaunchConfig;
typedef struct CUgraphExec_st *CUgraphExec;

enum {   /* the few enum values of cuda.h that nvfp4 passes */
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CU_JIT_INFO_LOG_BUFFER = 3,
    CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES = 4,
    CU_JIT_ERROR_LOG_BUFFER = 5,
    CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6,
    CU_STREAM_NON_BLOCKING = 1,
    CU_EVENT_DEFAULT = 0,
    CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1,
    CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6,
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    CU_MEMHOSTALLOC_PORTABLE = 1,    /* page-locked for every context */
    CU_MEMHOSTALLOC_DEVICEMAP = 2,   /* and mapped into the GPU's address space */
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704,
};

/* The driver entry points nvfp4 uses, filled by dlsym. Where cuda.h maps a name to a
   versioned symbol (cuMemAlloc -> cuMemAlloc_v2, ...), the table below looks up that symbol:
   the unversioned ones are the old 32-bit-size ABI. */
static struct {
    CUresult (*cuGetErrorName)(CUresult error, const char **name);
    CUresult (*cuInit)(unsigned flags);
    CUresult (*cuDriverGetVersion)(int *version);
    CUresult (*cuDeviceGetCount)(int *count);
    CUresult (*cuDeviceGet)(CUdevice *device, int ordinal);
    CUresult (*cuDeviceGetName)(char *name, int len, CUdevice device);
    CUresult (*cuDeviceGetAttribute)(int *value, int attribute, CUdevice device);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *ctx, CUdevice device);
    CUresult (*cuDevicePrimaryCtxRelease)(CUdevice device);
    CUresult (*cuCtxSetCurrent)(CUcontext ctx);
    CUresult (*cuDeviceCanAccessPeer)(int *can, CUdevice device, CUdevice peer);
    CUresult (*cuCtxEnablePeerAccess)(CUcontext peer, unsigned flags);
    CUresult (*cuStreamCreate)(CUstream *stream, unsigned flags);
    CUresult (*cuStreamDestroy)(CUstream stream);
    CUresult (*cuStreamSynchronize)(CUstream stream);
    CUresult (*cuStreamQuery)(CUstream stream);
    CUresult (*cuModuleLoadDataEx)(CUmodule *module, const void *image, unsigned n, int *options, void **values);
    CUresult (*cuModuleUnload)(CUmodule module);
    CUresult (*cuModuleGetFunction)(CUfunction *f, CUmodule module, const char *name);
    CUresult (*cuFuncSetAttribute)(CUfunction f, int attribute, int value);
    CUresult (*cuOccupancyMaxActiveBlocksPerMultiprocessor)(int *blocks, CUfunction f, int block_size, size_t smem);
    CUresult (*cuMemGetInfo)(size_t *free_bytes, size_t *total_bytes);
    CUresult (*cuMemAlloc)(CUdeviceptr *p, size_t bytes);
    CUresult (*cuMemFree)(CUdeviceptr p);
    CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr dst, const void *src, size_t bytes, CUstream stream);
    CUresult (*cuMemcpyDtoHAsync)(void *dst, CUdeviceptr src, size_t bytes, CUstream stream);
    CUresult (*cuStreamWriteValue32)(CUstream stream, CUdeviceptr address, uint32_t value, unsigned flags);
    CUresult (*cuMemsetD8Async)(CUdeviceptr dst, unsigned char value, size_t count, CUstream stream);
    CUresult (*cuMemHostAlloc)(void **p, size_t bytes, unsigned flags);
    CUresult (*cuMemFreeHost)(void *p);
    CUresult (*cuMemHostGetDevicePointer)(CUdeviceptr *d, void *p, unsigned flags);
    CUresult (*cuLaunchKernelEx)(const CUlaunchConfig *config, CUfunction f, void **params, void **extra);
    CUresult (*cuEventCreate)(CUevent *event, unsigned flags);
    CUresult (*cuEventDestroy)(CUevent event);
    CUresult (*cuEventRecord)(CUevent event, CUstream stream);
    CUresult (*cuEventSynchronize)(CUevent event);
    CUresult (*cuEventElapsedTime)(float *ms, CUevent start, CUevent end);
    CUresult (*cuStreamBeginCapture)(CUstream stream, int mode);
    CUresult (*cuStreamEndCapture)(CUstream stream, CUgraph *graph);
    CUresult (*cuGraphInstantiate)(CUgraphExec *exec, CUgraph graph, unsigned long long flags);
    CUresult (*cuGraphLaunch)(CUgraphExec exec, CUstream stream);
    CUresult (*cuGraphExecDestroy)(CUgraphExec exec);
    CUresult (*cuGraphDestroy)(CUgraph graph);
} cu;

static const struct { const char *symbol; size_t offset; } cu_symbols[] = {
#define CU_SYMBOL(field, symbol) {symbol, offsetof(__typeof__(cu), field)}
    CU_SYMBOL(cuGetErrorName, "cuGetErrorName"),
    CU_SYMBOL(cuInit, "cuInit"),
    CU_SYMBOL(cuDriverGetVersion, "cuDriverGetVersion"),
    CU_SYMBOL(cuDeviceGetCount, "cuDeviceGetCount"),
    CU_SYMBOL(cuDeviceGet, "cuDeviceGet"),
    CU_SYMBOL(cuDeviceGetName, "cuDeviceGetName"),
    CU_SYMBOL(cuDeviceGetAttribute, "cuDeviceGetAttribute"),
    CU_SYMBOL(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"),
    CU_SYMBOL(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2"),
    CU_SYMBOL(cuCtxSetCurrent, "cuCtxSetCurrent"),
    CU_SYMBOL(cuDeviceCanAccessPeer, "cuDeviceCanAccessPeer"),
    CU_SYMBOL(cuCtxEnablePeerAccess, "cuCtxEnablePeerAccess"),
    CU_SYMBOL(cuStreamCreate, "cuStreamCreate"),
    CU_SYMBOL(cuStreamDestroy, "cuStreamDestroy_v2"),
    CU_SYMBOL(cuStreamSynchronize, "cuStreamSynchronize"),
    CU_SYMBOL(cuStreamQuery, "cuStreamQuery"),
    CU_SYMBOL(cuModuleLoadDataEx, "cuModuleLoadDataEx"),
    CU_SYMBOL(cuModuleUnload, "cuModuleUnload"),
    CU_SYMBOL(cuModuleGetFunction, "cuModuleGetFunction"),
    CU_SYMBOL(cuFuncSetAttribute, "cuFuncSetAttribute"),
    CU_SYMBOL(cuOccupancyMaxActiveBlocksPerMultiprocessor, "cuOccupancyMaxActiveBlocksPerMultiprocessor"),
    CU_SYMBOL(cuMemGetInfo, "cuMemGetInfo_v2"),
    CU_SYMBOL(cuMemAlloc, "cuMemAlloc_v2"),
    CU_SYMBOL(cuMemFree, "cuMemFree_v2"),
    CU_SYMBOL(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2"),
    CU_SYMBOL(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2"),
    CU_SYMBOL(cuStreamWriteValue32, "cuStreamWriteValue32_v2"),
    CU_SYMBOL(cuMemsetD8Async, "cuMemsetD8Async"),
    CU_SYMBOL(cuMemHostAlloc, "cuMemHostAlloc"),
    CU_SYMBOL(cuMemFreeHost, "cuMemFreeHost"),
    CU_SYMBOL(cuMemHostGetDevicePointer, "cuMemHostGetDevicePointer_v2"),
    CU_SYMBOL(cuLaunchKernelEx, "cuLaunchKernelEx"),
    CU_SYMBOL(cuEventCreate, "cuEventCreate"),
    CU_SYMBOL(cuEventDestroy, "cuEventDestroy_v2"),
    CU_SYMBOL(cuEventRecord, "cuEventRecord"),
    CU_SYMBOL(cuEventSynchronize, "cuEventSynchronize"),
    CU_SYMBOL(cuEventElapsedTime, "cuEventElapsedTime_v2"),
    CU_SYMBOL(cuStreamBeginCapture, "cuStreamBeginCapture_v2"),
    CU_SYMBOL(cuStreamEndCapture, "cuStreamEndCapture"),
    CU_SYMBOL(cuGraphInstantiate, "cuGraphInstantiateWithFlags"),
    CU_SYMBOL(cuGraphLaunch, "cuGraphLaunch"),
    CU_SYMBOL(cuGraphExecDestroy, "cuGraphExecDestroy"),
    CU_SYMBOL(cuGraphDestroy, "cuGraphDestroy"),
#undef CU_SYMBOL
};

/* The kernels of kernels.ptx: the name of their .entry and the size of their one parameter,
   the argument struct of nvfp4.h ("the kernel ABI"). */
typedef enum {
    K_STREAM_READ, K_GEMV, K_GEMV_STREAMED, K_GEMV_RANKED, K_GEMM, K_EMBED, K_HC_MIX, K_HC_POST_MIX,
    K_RANK_PARTIAL, K_RANK_SUM, K_RANK_PUBLISH, K_RANK_GATHER, K_HC_FINISH,
    K_ROW_NORM_ROPE, K_COMPRESSOR, K_INDEXER_SCORES, K_TOP_K, K_ATTENTION, K_ROUTE, K_GATHER, K_SWIGLU,
    K_SAMPLE, K_FILL, K_COUNT
} Kernel;
static const struct { const char *name; size_t args_bytes; } kernel_info[K_COUNT] = {
    [K_STREAM_READ] = {"stream_read", sizeof(StreamReadArgs)},
    [K_GEMV] = {"gemv", sizeof(GemvArgs)},
    [K_GEMV_STREAMED] = {"gemv_streamed", sizeof(GemvArgs)},   /* the same GEMV, waiting for streamed experts */
    [K_GEMV_RANKED] = {"gemv_ranked", sizeof(GemvArgs)},       /* the same GEMV, skipping other ranks' experts */
    [K_GEMM] = {"gemm_prefill", sizeof(GemmPrefillArgs)},
    [K_EMBED] = {"embed_streams", sizeof(EmbedStreamsArgs)},
    [K_HC_MIX] = {"hc_mix_partial", sizeof(HcMixPartialArgs)},
    [K_HC_POST_MIX] = {"hc_post_mix", sizeof(HcPostMixArgs)},
    [K_RANK_PARTIAL] = {"rank_partial", sizeof(RankPartialArgs)},
    [K_RANK_SUM] = {"rank_sum", sizeof(RankSumArgs)},
    [K_RANK_PUBLISH] = {"rank_publish", sizeof(RankPublishArgs)},
    [K_RANK_GATHER] = {"rank_gather", sizeof(RankGatherArgs)},
    [K_HC_FINISH] = {"hc_finish", sizeof(HcFinishArgs)},
    [K_ROW_NORM_ROPE] = {"row_norm_rope", sizeof(RowNormRopeArgs)},
    [K_COMPRESSOR] = {"compressor_update", sizeof(CompressorUpdateArgs)},
    [K_INDEXER_SCORES] = {"indexer_scores", sizeof(IndexerScoresArgs)},
    [K_TOP_K] = {"top_k_select", sizeof(TopKSelectArgs)},
    [K_ATTENTION] = {"attention_decode", sizeof(AttentionDecodeArgs)},
    [K_ROUTE] = {"route_tokens", sizeof(RouteTokensArgs)},
    [K_GATHER] = {"gather_rows", sizeof(GatherRowsArgs)},
    [K_SWIGLU] = {"swiglu", sizeof(SwigluArgs)},
    [K_SAMPLE] = {"sample_token", sizeof(SampleTokenArgs)},
    [K_FILL] = {"fill_random", sizeof(FillRandomArgs)},
};

/* The kernel ABI checked at compile time: every field of every argument struct (nvfp4.h) lies
   at the byte offset kernels.ptx reads it from, and every struct has the size its .param
   declares. */
#define ABI_SIZE(type, bytes) _Static_assert(sizeof(type) == (bytes), #type " must be " #bytes " bytes")
#define ABI_AT(type, field, offset) _Static_assert(offsetof(type, field) == (offset), #type "." #field " must be at " #offset)
ABI_SIZE(GemvSeg, SEG_BYTES);
ABI_AT(GemvSeg, w, SEG_W);
ABI_AT(GemvSeg, s, SEG_S);
ABI_AT(GemvSeg, x, SEG_X);
ABI_AT(GemvSeg, y, SEG_Y);
ABI_AT(GemvSeg, expert, SEG_EXPERT);
ABI_AT(GemvSeg, stride_w, SEG_STRIDE_W);
ABI_AT(GemvSeg, stride_s, SEG_STRIDE_S);
ABI_AT(GemvSeg, gscales62, SEG_GSCALES);
ABI_AT(GemvSeg, up_offset, SEG_UP_OFFSET);
ABI_AT(GemvSeg, norm_weight, SEG_NORM_W);
ABI_AT(GemvSeg, format, SEG_FORMAT);
ABI_AT(GemvSeg, rows, SEG_ROWS);
ABI_AT(GemvSeg, cols, SEG_COLS);
ABI_AT(GemvSeg, row_bytes, SEG_ROW_BYTES);
ABI_AT(GemvSeg, x_stride, SEG_X_STRIDE);
ABI_AT(GemvSeg, y_stride, SEG_Y_STRIDE);
ABI_AT(GemvSeg, list_len, SEG_LIST_LEN);
ABI_AT(GemvSeg, list_offset, SEG_LIST_OFFSET);
ABI_AT(GemvSeg, gscale62, SEG_GSCALE);
ABI_AT(GemvSeg, limit, SEG_LIMIT);
ABI_AT(GemvSeg, eps, SEG_EPS);
ABI_AT(GemvSeg, first_item, SEG_FIRST_ITEM);
ABI_AT(GemvSeg, first_slot, SEG_FIRST_SLOT);
ABI_AT(GemvSeg, x_group, SEG_X_GROUP);
ABI_AT(GemvSeg, row_blocks, SEG_ROW_BLOCKS);
ABI_AT(GemvSeg, x_hc, SEG_X_HC);
ABI_AT(GemvSeg, table, SEG_TABLE);
ABI_AT(GemvSeg, split, SEG_SPLIT);
ABI_SIZE(GemvHc, HC_BYTES);
ABI_AT(GemvHc, post, HC_POST);
ABI_AT(GemvHc, comb, HC_COMB);
ABI_AT(GemvHc, h, HC_H);
ABI_AT(GemvHc, partial, HC_PARTIAL);
ABI_AT(GemvHc, partial_ss, HC_PARTIAL_SS);
ABI_AT(GemvHc, base, HC_BASE);
ABI_AT(GemvHc, scale, HC_SCALE);
ABI_AT(GemvHc, norm, HC_NORM);
ABI_AT(GemvHc, rows, HC_ROWS);
ABI_AT(GemvHc, slices, HC_SLICES);
ABI_AT(GemvHc, iters, HC_ITERS);
ABI_AT(GemvHc, hc_eps, HC_EPS);
ABI_AT(GemvHc, rms_eps, HC_RMS_EPS);
ABI_SIZE(GemvRoute, RT_BYTES);
ABI_AT(GemvRoute, router, RT_ROUTER);
ABI_AT(GemvRoute, bias, RT_BIAS);
ABI_AT(GemvRoute, tid2eid, RT_TID2EID);
ABI_AT(GemvRoute, tokens, RT_TOKENS);
ABI_AT(GemvRoute, chosen, RT_CHOSEN);
ABI_AT(GemvRoute, route_weight, RT_WEIGHT);
ABI_AT(GemvRoute, expert_start, RT_START);
ABI_AT(GemvRoute, slot_order, RT_ORDER);
ABI_AT(GemvRoute, slot_row, RT_ROW);
ABI_AT(GemvRoute, active_experts, RT_ACTIVE);
ABI_AT(GemvRoute, active_count, RT_ACTIVE_COUNT);
ABI_AT(GemvRoute, X, RT_X);
ABI_AT(GemvRoute, K, RT_K);
ABI_AT(GemvRoute, routed_scaling, RT_SCALING);
ABI_AT(GemvRoute, hits, RT_HITS);
ABI_SIZE(CompressorArgs, CA_BYTES);
ABI_AT(CompressorArgs, kv, CA_KV_IN);
ABI_AT(CompressorArgs, gate, CA_GATE_IN);
ABI_AT(CompressorArgs, ape, CA_APE);
ABI_AT(CompressorArgs, norm, CA_NORM);
ABI_AT(CompressorArgs, pending_kv, CA_PENDING_KV);
ABI_AT(CompressorArgs, pending_gate, CA_PENDING_GATE);
ABI_AT(CompressorArgs, prev_kv, CA_PREV_KV);
ABI_AT(CompressorArgs, prev_gate, CA_PREV_GATE);
ABI_AT(CompressorArgs, entries, CA_ENTRIES);
ABI_AT(CompressorArgs, parts, CA_PARTS);
ABI_AT(CompressorArgs, d, CA_D);
ABI_SIZE(StreamReadArgs, STREAM_READ_BYTES);
ABI_AT(StreamReadArgs, buf, STREAM_READ_BUF);
ABI_AT(StreamReadArgs, n16, STREAM_READ_N16);
ABI_AT(StreamReadArgs, out, STREAM_READ_OUT);
ABI_SIZE(GemvArgs, GEMV_BYTES);
ABI_AT(GemvArgs, segs, GEMV_SEGS);
ABI_AT(GemvArgs, items, GEMV_ITEMS);
ABI_AT(GemvArgs, slots, GEMV_SLOTS);
ABI_AT(GemvArgs, contiguous, GEMV_CONTIGUOUS);
ABI_AT(GemvArgs, list_ready, GEMV_LIST_READY);
ABI_AT(GemvArgs, xs_bytes, GEMV_XS_BYTES);
ABI_AT(GemvArgs, hc, GEMV_HC);
ABI_AT(GemvArgs, route, GEMV_ROUTE);
ABI_AT(GemvArgs, stream, GEMV_STREAM);
ABI_SIZE(GemvStream, GS_BYTES);
ABI_AT(GemvStream, staging, GS_STAGING);
ABI_AT(GemvStream, control, GS_CONTROL);
ABI_AT(GemvStream, mail, GS_MAIL);
ABI_AT(GemvStream, slot_bytes, GS_SLOT_BYTES);
ABI_AT(GemvStream, part, GS_PART);
ABI_AT(GemvStream, layer, GS_LAYER);
ABI_AT(GemvStream, layers, GS_LAYERS);
ABI_SIZE(StreamMail, SM_BYTES);
ABI_AT(StreamMail, tag, SM_TAG);
ABI_AT(StreamMail, timed_out, SM_TIMED_OUT);
ABI_AT(StreamMail, expert, SM_EXPERT);
ABI_SIZE(RowNormRopeArgs, ROW_NORM_ROPE_BYTES);
ABI_AT(RowNormRopeArgs, x, ROW_NORM_ROPE_X);
ABI_AT(RowNormRopeArgs, n_heads, ROW_NORM_ROPE_N_HEADS);
ABI_AT(RowNormRopeArgs, dim, ROW_NORM_ROPE_DIM);
ABI_AT(RowNormRopeArgs, do_norm, ROW_NORM_ROPE_DO_NORM);
ABI_AT(RowNormRopeArgs, weight, ROW_NORM_ROPE_WEIGHT);
ABI_AT(RowNormRopeArgs, eps, ROW_NORM_ROPE_EPS);
ABI_AT(RowNormRopeArgs, rope_dim, ROW_NORM_ROPE_ROPE_DIM);
ABI_AT(RowNormRopeArgs, inv_freq, ROW_NORM_ROPE_INV_FREQ);
ABI_AT(RowNormRopeArgs, rope_scale, ROW_NORM_ROPE_ROPE_SCALE);
ABI_AT(RowNormRopeArgs, pos0_ptr, ROW_NORM_ROPE_POS0_PTR);
ABI_AT(RowNormRopeArgs, ring, ROW_NORM_ROPE_RING);
ABI_AT(RowNormRopeArgs, ring_rows, ROW_NORM_ROPE_RING_ROWS);
ABI_SIZE(CompressorUpdateArgs, COMPRESSOR_UPDATE_BYTES);
ABI_AT(CompressorUpdateArgs, comp, COMPRESSOR_UPDATE_COMP);
ABI_AT(CompressorUpdateArgs, T, COMPRESSOR_UPDATE_T);
ABI_AT(CompressorUpdateArgs, ratio, COMPRESSOR_UPDATE_RATIO);
ABI_AT(CompressorUpdateArgs, eps, COMPRESSOR_UPDATE_EPS);
ABI_AT(CompressorUpdateArgs, rope_dim, COMPRESSOR_UPDATE_ROPE_DIM);
ABI_AT(CompressorUpdateArgs, inv_freq, COMPRESSOR_UPDATE_INV_FREQ);
ABI_AT(CompressorUpdateArgs, rope_scale, COMPRESSOR_UPDATE_ROPE_SCALE);
ABI_AT(CompressorUpdateArgs, pos0_ptr, COMPRESSOR_UPDATE_POS0_PTR);
ABI_SIZE(IndexerScoresArgs, INDEXER_SCORES_BYTES);
ABI_AT(IndexerScoresArgs, scores, INDEXER_SCORES_SCORES);
ABI_AT(IndexerScoresArgs, score_stride, INDEXER_SCORES_SCORE_STRIDE);
ABI_AT(IndexerScoresArgs, index_q, INDEXER_SCORES_INDEX_Q);
ABI_AT(IndexerScoresArgs, index_w, INDEXER_SCORES_INDEX_W);
ABI_AT(IndexerScoresArgs, index_keys, INDEXER_SCORES_INDEX_KEYS);
ABI_AT(IndexerScoresArgs, NI, INDEXER_SCORES_NI);
ABI_AT(IndexerScoresArgs, DI, INDEXER_SCORES_DI);
ABI_AT(IndexerScoresArgs, ratio, INDEXER_SCORES_RATIO);
ABI_AT(IndexerScoresArgs, pos0_ptr, INDEXER_SCORES_POS0_PTR);
ABI_AT(IndexerScoresArgs, rope_dim, INDEXER_SCORES_ROPE_DIM);
ABI_AT(IndexerScoresArgs, inv_freq, INDEXER_SCORES_INV_FREQ);
ABI_AT(IndexerScoresArgs, rope_scale, INDEXER_SCORES_ROPE_SCALE);
ABI_SIZE(TopKSelectArgs, TOP_K_SELECT_BYTES);
ABI_AT(TopKSelectArgs, scores, TOP_K_SELECT_SCORES);
ABI_AT(TopKSelectArgs, score_stride, TOP_K_SELECT_SCORE_STRIDE);
ABI_AT(TopKSelectArgs, selected, TOP_K_SELECT_SELECTED);
ABI_AT(TopKSelectArgs, sel_stride, TOP_K_SELECT_SEL_STRIDE);
ABI_AT(TopKSelectArgs, n_selected, TOP_K_SELECT_N_SELECTED);
ABI_AT(TopKSelectArgs, k, TOP_K_SELECT_K);
ABI_AT(TopKSelectArgs, ratio, TOP_K_SELECT_RATIO);
ABI_AT(TopKSelectArgs, pos0_ptr, TOP_K_SELECT_POS0_PTR);
ABI_SIZE(AttentionDecodeArgs, ATTENTION_DECODE_BYTES);
ABI_AT(AttentionDecodeArgs, q, ATTENTION_DECODE_Q);
ABI_AT(AttentionDecodeArgs, attn, ATTENTION_DECODE_ATTN);
ABI_AT(AttentionDecodeArgs, H, ATTENTION_DECODE_H);
ABI_AT(AttentionDecodeArgs, D, ATTENTION_DECODE_D);
ABI_AT(AttentionDecodeArgs, sink, ATTENTION_DECODE_SINK);
ABI_AT(AttentionDecodeArgs, ring, ATTENTION_DECODE_RING);
ABI_AT(AttentionDecodeArgs, ring_rows, ATTENTION_DECODE_RING_ROWS);
ABI_AT(AttentionDecodeArgs, window, ATTENTION_DECODE_WINDOW);
ABI_AT(AttentionDecodeArgs, entries, ATTENTION_DECODE_ENTRIES);
ABI_AT(AttentionDecodeArgs, comp_mode, ATTENTION_DECODE_COMP_MODE);
ABI_AT(AttentionDecodeArgs, selected, ATTENTION_DECODE_SELECTED);
ABI_AT(AttentionDecodeArgs, n_selected, ATTENTION_DECODE_N_SELECTED);
ABI_AT(AttentionDecodeArgs, sel_stride, ATTENTION_DECODE_SEL_STRIDE);
ABI_AT(AttentionDecodeArgs, ratio, ATTENTION_DECODE_RATIO);
ABI_AT(AttentionDecodeArgs, rope_dim, ATTENTION_DECODE_ROPE_DIM);
ABI_AT(AttentionDecodeArgs, inv_freq, ATTENTION_DECODE_INV_FREQ);
ABI_AT(AttentionDecodeArgs, rope_scale, ATTENTION_DECODE_ROPE_SCALE);
ABI_AT(AttentionDecodeArgs, pos0_ptr, ATTENTION_DECODE_POS0_PTR);
ABI_AT(AttentionDecodeArgs, eps, ATTENTION_DECODE_EPS);
ABI_AT(AttentionDecodeArgs, kv, ATTENTION_DECODE_KV);
ABI_AT(AttentionDecodeArgs, kv_norm, ATTENTION_DECODE_KV_NORM);
ABI_AT(AttentionDecodeArgs, partial, ATTENTION_DECODE_PARTIAL);
ABI_AT(AttentionDecodeArgs, counter, ATTENTION_DECODE_COUNTER);
ABI_SIZE(EmbedStreamsArgs, EMBED_STREAMS_BYTES);
ABI_AT(EmbedStreamsArgs, h, EMBED_STREAMS_H);
ABI_AT(EmbedStreamsArgs, embed, EMBED_STREAMS_EMBED);
ABI_AT(EmbedStreamsArgs, tokens, EMBED_STREAMS_TOKENS);
ABI_AT(EmbedStreamsArgs, E, EMBED_STREAMS_E);
ABI_AT(EmbedStreamsArgs, step, EMBED_STREAMS_STEP);
ABI_SIZE(SwigluArgs, SWIGLU_BYTES);
ABI_AT(SwigluArgs, gate, SWIGLU_GATE);
ABI_AT(SwigluArgs, up, SWIGLU_UP);
ABI_AT(SwigluArgs, n, SWIGLU_N);
ABI_AT(SwigluArgs, limit, SWIGLU_LIMIT);
ABI_SIZE(HcMixPartialArgs, HC_MIX_PARTIAL_BYTES);
ABI_AT(HcMixPartialArgs, partial, HC_MIX_PARTIAL_PARTIAL);
ABI_AT(HcMixPartialArgs, partial_ss, HC_MIX_PARTIAL_PARTIAL_SS);
ABI_AT(HcMixPartialArgs, h, HC_MIX_PARTIAL_H);
ABI_AT(HcMixPartialArgs, fn, HC_MIX_PARTIAL_FN);
ABI_AT(HcMixPartialArgs, E, HC_MIX_PARTIAL_E);
ABI_AT(HcMixPartialArgs, rows, HC_MIX_PARTIAL_ROWS);
ABI_AT(HcMixPartialArgs, slice, HC_MIX_PARTIAL_SLICE);
ABI_SIZE(HcPostMixArgs, HC_POST_MIX_BYTES);
ABI_AT(HcPostMixArgs, partial, HC_POST_MIX_PARTIAL);
ABI_AT(HcPostMixArgs, partial_ss, HC_POST_MIX_PARTIAL_SS);
ABI_AT(HcPostMixArgs, h, HC_POST_MIX_H);
ABI_AT(HcPostMixArgs, fn, HC_POST_MIX_FN);
ABI_AT(HcPostMixArgs, E, HC_POST_MIX_E);
ABI_AT(HcPostMixArgs, rows, HC_POST_MIX_ROWS);
ABI_AT(HcPostMixArgs, slice, HC_POST_MIX_SLICE);
ABI_AT(HcPostMixArgs, block_out, HC_POST_MIX_BLOCK_OUT);
ABI_AT(HcPostMixArgs, post, HC_POST_MIX_POST);
ABI_AT(HcPostMixArgs, comb, HC_POST_MIX_COMB);
ABI_AT(HcPostMixArgs, expert_out, HC_POST_MIX_EXPERT_OUT);
ABI_AT(HcPostMixArgs, route_weight, HC_POST_MIX_ROUTE_WEIGHT);
ABI_AT(HcPostMixArgs, slot_row, HC_POST_MIX_SLOT_ROW);
ABI_AT(HcPostMixArgs, K, HC_POST_MIX_K);
ABI_SIZE(RankPartialArgs, RANK_PARTIAL_BYTES);
ABI_AT(RankPartialArgs, partial, RANK_PARTIAL_PARTIAL);
ABI_AT(RankPartialArgs, block_out, RANK_PARTIAL_BLOCK_OUT);
ABI_AT(RankPartialArgs, expert_out, RANK_PARTIAL_EXPERT_OUT);
ABI_AT(RankPartialArgs, route_weight, RANK_PARTIAL_ROUTE_WEIGHT);
ABI_AT(RankPartialArgs, slot_row, RANK_PARTIAL_SLOT_ROW);
ABI_AT(RankPartialArgs, chosen, RANK_PARTIAL_CHOSEN);
ABI_AT(RankPartialArgs, published, RANK_PARTIAL_PUBLISHED);
ABI_AT(RankPartialArgs, E, RANK_PARTIAL_E);
ABI_AT(RankPartialArgs, K, RANK_PARTIAL_K);
ABI_AT(RankPartialArgs, first, RANK_PARTIAL_FIRST);
ABI_AT(RankPartialArgs, end, RANK_PARTIAL_END);
ABI_AT(RankPartialArgs, shared, RANK_PARTIAL_SHARED);
ABI_SIZE(RankSumArgs, RANK_SUM_BYTES);
ABI_AT(RankSumArgs, out, RANK_SUM_OUT);
ABI_AT(RankSumArgs, partials, RANK_SUM_PARTIALS);
ABI_AT(RankSumArgs, published, RANK_SUM_PUBLISHED);
ABI_AT(RankSumArgs, ranks, RANK_SUM_RANKS);
ABI_AT(RankSumArgs, rank, RANK_SUM_RANK);
ABI_AT(RankSumArgs, n, RANK_SUM_N);
ABI_SIZE(RankPublishArgs, RANK_PUBLISH_BYTES);
ABI_AT(RankPublishArgs, published, RANK_PUBLISH_PUBLISHED);
ABI_SIZE(RankGatherArgs, RANK_GATHER_BYTES);
ABI_AT(RankGatherArgs, out, RANK_GATHER_OUT);
ABI_AT(RankGatherArgs, sources, RANK_GATHER_SOURCES);
ABI_AT(RankGatherArgs, published, RANK_GATHER_PUBLISHED);
ABI_AT(RankGatherArgs, bounds, RANK_GATHER_BOUNDS);
ABI_AT(RankGatherArgs, ranks, RANK_GATHER_RANKS);
ABI_AT(RankGatherArgs, rank, RANK_GATHER_RANK);
ABI_AT(RankGatherArgs, V, RANK_GATHER_V);
ABI_AT(RankGatherArgs, T, RANK_GATHER_T);
ABI_SIZE(HcFinishArgs, HC_FINISH_BYTES);
ABI_AT(HcFinishArgs, x, HC_FINISH_X);
ABI_AT(HcFinishArgs, post_out, HC_FINISH_POST_OUT);
ABI_AT(HcFinishArgs, comb_out, HC_FINISH_COMB_OUT);
ABI_AT(HcFinishArgs, h, HC_FINISH_H);
ABI_AT(HcFinishArgs, partial, HC_FINISH_PARTIAL);
ABI_AT(HcFinishArgs, partial_ss, HC_FINISH_PARTIAL_SS);
ABI_AT(HcFinishArgs, base, HC_FINISH_BASE);
ABI_AT(HcFinishArgs, scale, HC_FINISH_SCALE);
ABI_AT(HcFinishArgs, norm_weight, HC_FINISH_NORM_WEIGHT);
ABI_AT(HcFinishArgs, E, HC_FINISH_E);
ABI_AT(HcFinishArgs, rows, HC_FINISH_ROWS);
ABI_AT(HcFinishArgs, S, HC_FINISH_S);
ABI_AT(HcFinishArgs, t0, HC_FINISH_T0);
ABI_AT(HcFinishArgs, hc_eps, HC_FINISH_HC_EPS);
ABI_AT(HcFinishArgs, rms_eps, HC_FINISH_RMS_EPS);
ABI_AT(HcFinishArgs, sinkhorn_iters, HC_FINISH_SINKHORN_ITERS);
ABI_SIZE(RouteTokensArgs, ROUTE_TOKENS_BYTES);
ABI_AT(RouteTokensArgs, router, ROUTE_TOKENS_ROUTER);
ABI_AT(RouteTokensArgs, bias, ROUTE_TOKENS_BIAS);
ABI_AT(RouteTokensArgs, tid2eid, ROUTE_TOKENS_TID2EID);
ABI_AT(RouteTokensArgs, tokens, ROUTE_TOKENS_TOKENS);
ABI_AT(RouteTokensArgs, chosen, ROUTE_TOKENS_CHOSEN);
ABI_AT(RouteTokensArgs, route_weight, ROUTE_TOKENS_ROUTE_WEIGHT);
ABI_AT(RouteTokensArgs, expert_start, ROUTE_TOKENS_EXPERT_START);
ABI_AT(RouteTokensArgs, slot_order, ROUTE_TOKENS_SLOT_ORDER);
ABI_AT(RouteTokensArgs, slot_row, ROUTE_TOKENS_SLOT_ROW);
ABI_AT(RouteTokensArgs, active_experts, ROUTE_TOKENS_ACTIVE_EXPERTS);
ABI_AT(RouteTokensArgs, active_count, ROUTE_TOKENS_ACTIVE_COUNT);
ABI_AT(RouteTokensArgs, T, ROUTE_TOKENS_T);
ABI_AT(RouteTokensArgs, X, ROUTE_TOKENS_X);
ABI_AT(RouteTokensArgs, K, ROUTE_TOKENS_K);
ABI_AT(RouteTokensArgs, routed_scaling, ROUTE_TOKENS_ROUTED_SCALING);
ABI_SIZE(SampleTokenArgs, SAMPLE_TOKEN_BYTES);
ABI_AT(SampleTokenArgs, logits, SAMPLE_TOKEN_LOGITS);
ABI_AT(SampleTokenArgs, probs, SAMPLE_TOKEN_PROBS);
ABI_AT(SampleTokenArgs, V, SAMPLE_TOKEN_V);
ABI_AT(SampleTokenArgs, temperature, SAMPLE_TOKEN_TEMPERATURE);
ABI_AT(SampleTokenArgs, top_p, SAMPLE_TOKEN_TOP_P);
ABI_AT(SampleTokenArgs, rng, SAMPLE_TOKEN_RNG);
ABI_AT(SampleTokenArgs, out_token, SAMPLE_TOKEN_OUT_TOKEN);
ABI_AT(SampleTokenArgs, tokens, SAMPLE_TOKEN_TOKENS);
ABI_AT(SampleTokenArgs, pos0_ptr, SAMPLE_TOKEN_POS0_PTR);
ABI_AT(SampleTokenArgs, advance, SAMPLE_TOKEN_ADVANCE);
ABI_AT(SampleTokenArgs, top_k, SAMPLE_TOKEN_TOP_K);
ABI_AT(SampleTokenArgs, log_min_p, SAMPLE_TOKEN_LOG_MIN_P);
ABI_AT(SampleTokenArgs, penalty, SAMPLE_TOKEN_PENALTY);
ABI_AT(SampleTokenArgs, recent, SAMPLE_TOKEN_RECENT);
ABI_AT(SampleTokenArgs, n_fed, SAMPLE_TOKEN_N_FED);
ABI_AT(SampleTokenArgs, last_n, SAMPLE_TOKEN_LAST_N);
ABI_SIZE(GemmPrefillArgs, GEMM_PREFILL_BYTES);
ABI_AT(GemmPrefillArgs, y, GEMM_PREFILL_Y);
ABI_AT(GemmPrefillArgs, x, GEMM_PREFILL_X);
ABI_AT(GemmPrefillArgs, weight, GEMM_PREFILL_WEIGHT);
ABI_AT(GemmPrefillArgs, scale, GEMM_PREFILL_SCALE);
ABI_AT(GemmPrefillArgs, global_scale, GEMM_PREFILL_GLOBAL_SCALE);
ABI_AT(GemmPrefillArgs, format, GEMM_PREFILL_FORMAT);
ABI_AT(GemmPrefillArgs, scale_is_f32, GEMM_PREFILL_SCALE_IS_F32);
ABI_AT(GemmPrefillArgs, T, GEMM_PREFILL_T);
ABI_AT(GemmPrefillArgs, cols, GEMM_PREFILL_COLS);
ABI_AT(GemmPrefillArgs, row0, GEMM_PREFILL_ROW0);
ABI_AT(GemmPrefillArgs, nrows, GEMM_PREFILL_NROWS);
ABI_AT(GemmPrefillArgs, x_stride, GEMM_PREFILL_X_STRIDE);
ABI_AT(GemmPrefillArgs, y_stride, GEMM_PREFILL_Y_STRIDE);
ABI_AT(GemmPrefillArgs, accumulate, GEMM_PREFILL_ACCUMULATE);
ABI_AT(GemmPrefillArgs, row_bytes, GEMM_PREFILL_ROW_BYTES);
ABI_SIZE(GatherRowsArgs, GATHER_ROWS_BYTES);
ABI_AT(GatherRowsArgs, dst, GATHER_ROWS_DST);
ABI_AT(GatherRowsArgs, src, GATHER_ROWS_SRC);
ABI_AT(GatherRowsArgs, slot_order, GATHER_ROWS_SLOT_ORDER);
ABI_AT(GatherRowsArgs, K, GATHER_ROWS_K);
ABI_AT(GatherRowsArgs, E, GATHER_ROWS_E);
ABI_SIZE(FillRandomArgs, FILL_RANDOM_BYTES);
ABI_AT(FillRandomArgs, dst, FILL_RANDOM_DST);
ABI_AT(FillRandomArgs, n_words, FILL_RANDOM_N_WORDS);
ABI_AT(FillRandomArgs, seed, FILL_RANDOM_SEED);
ABI_AT(FillRandomArgs, kind, FILL_RANDOM_KIND);
#undef ABI_SIZE
#undef ABI_AT

#define GPU_INDEXER_SMEM (64 * (512 + 4) * 4 + 64 * 4 + 512 * 4)   /* indexer_scores' shared memory at NI 64, DI 512 */
#define GPU_CHUNK 512                       /* bytes of a row one warp reads per 16-byte load */
#define GPU_MAX_CHUNKS 16                   /* chunks a GEMV row: one warp each (registers: 512 threads) */

#define GPU_GEMV_RING (4 * (32768 + 4096))   /* the GEMVs' ring: 4 stages of an item's codes and scales */

/* Dynamic shared memory of a GEMV: x of one padded row (4 bytes a column), then the ring. */
static unsigned gpu_gemv_smem(WeightFormat format, unsigned row_bytes) {
    return row_bytes * (format == FMT_BF16 ? 2 : format == FMT_FP8 ? 4 : 8) + GPU_GEMV_RING;
}

#define GPUS_MAX 8                          /* GPUs of one host nvfp4 drives at most */
#define HOSTS_MAX 8                         /* hosts it joins at most (--hosts) */
#define RANKS_MAX (HOSTS_MAX * GPUS_MAX)    /* a model divided that many ways at most */

/* One GPU nvfp4 drives, once gpu_open (GPU 0) or gpu_open_more (the others) opened it. */
typedef struct {
    CUdevice device;
    CUcontext ctx;
    CUstream stream;             /* every launch and copy for this GPU goes here */
    CUmodule module;             /* the embedded cubin */
    CUfunction kernels[K_COUNT];
    int sm_count, driver_version;
    char name[256];
} GpuDevice;

static void *cuda_lib;                     /* dlopen handle of libcuda.so.1 */
static GpuDevice gpu_devices[GPUS_MAX];    /* [gpu_device_count] */
static int gpu_device_count;               /* GPUs opened */
static int gpu_peer_access = 1;            /* 1: every GPU opened reads every other's memory (rank_sum,
                                              rank_gather); 0: NCCL alone joins them (gpu_open_more) */
static GpuDevice *gpu = &gpu_devices[0];   /* the GPU the functions below work on (gpu_use_rank) */

#ifdef NVFP4_GPU
#include "kernels_cubin.h"       /* kernels_cubin[]: build/kernels.cubin as bytes (make writes it) */
#endif

/* Stop with the failing call's text, its place, the driver's name for the error and (several
   GPUs) the current GPU: the one the call was for; a step that failed on a GPU (a kernel's
   fault, or a wait for another GPU's part that timed out: rank_sum) surfaces at the GPU the
   host waits for when it fails, gpu_wait waiting for the last GPU first. */
#define CU_CHECK(call) cu_check((call), #call, __FILE__, __LINE__)
static void cu_check(CUresult r, const char *call, const char *file, int line) {
    if (r == 0) return;
    const char *name = NULL;
    char which[64] = "";
    if (!cu.cuGetErrorName || cu.cuGetErrorName(r, &name) || !name) name = "unknown error";
    if (gpu_device_count > 1) snprintf(which, sizeof which, " on GPU %d of %d", (int)(gpu - gpu_devices), gpu_device_count);
    fatal("%s:%d: %s failed%s: %s (%d)", file, line, call, which, name, r);
}

/* Make GPU d the one the functions below work on, its context current. */
static void gpu_use_device(int d) {
    gpu = &gpu_devices[d];
    CU_CHECK(cu.cuCtxSetCurrent(gpu->ctx));
}

/* ------------------------------------------------------------------------------------ NCCL */
/* Several GPUs sum their parts (the divided sub-blocks' outputs) either by reading each other's
   memory (rank_sum: peer access) or with NCCL's all-reduce, whichever a load measures faster
   (gpu_choose_sums). libnccl.so.2 is opened with dlopen when several GPUs are, so nvfp4 builds
   and runs without it (and says so); its types are declared here as nccl.h 2.x has them. One
   communicator over the GPUs opened (ncclCommInitAll: one process drives them all, each GPU's
   primary context), NVLink multicast off (NCCL_NVLS_ENABLE=0 unless the environment sets it:
   the multicast objects it would make are not needed for one user's small all-reduces). */

typedef struct ncclComm *NcclComm;
typedef struct { char internal[128]; } NcclUniqueId;   /* ncclUniqueId: the communicator's rendezvous */
enum { NCCL_SUM = 0, NCCL_FLOAT32 = 7 };               /* ncclRedOp_t ncclSum, ncclDataType_t ncclFloat32 */

static struct {
    int (*ncclGetVersion)(int *version);
    int (*ncclCommInitAll)(NcclComm *comms, int count, const int *devices);
    int (*ncclCommDestroy)(NcclComm comm);
    int (*ncclAllReduce)(const void *send, void *recv, size_t count, int type, int op, NcclComm comm, CUstream stream);
    int (*ncclBroadcast)(const void *send, void *recv, size_t count, int type, int root, NcclComm comm, CUstream stream);
    int (*ncclGetUniqueId)(NcclUniqueId *id);
    int (*ncclCommInitRank)(NcclComm *comm, int ranks, NcclUniqueId id, int rank);
    int (*ncclCommGetAsyncError)(NcclComm comm, int *result);
    int (*ncclCommAbort)(NcclComm comm);
    int (*ncclGroupStart)(void);
    int (*ncclGroupEnd)(void);
    const char *(*ncclGetErrorString)(int result);
} nccl;

static const struct { const char *symbol; size_t offset; } nccl_symbols[] = {
#define NCCL_SYMBOL(field) {#field, offsetof(__typeof__(nccl), field)}
    NCCL_SYMBOL(ncclGetVersion), NCCL_SYMBOL(ncclCommInitAll), NCCL_SYMBOL(ncclCommDestroy), NCCL_SYMBOL(ncclAllReduce),
    NCCL_SYMBOL(ncclBroadcast), NCCL_SYMBOL(ncclGetUniqueId), NCCL_SYMBOL(ncclCommInitRank),
    NCCL_SYMBOL(ncclCommGetAsyncError), NCCL_SYMBOL(ncclCommAbort), NCCL_SYMBOL(ncclGroupStart), NCCL_SYMBOL(ncclGroupEnd),
    NCCL_SYMBOL(ncclGetErrorString),
#undef NCCL_SYMBOL
};

static void *nccl_lib;                  /* dlopen handle of libnccl.so.2 */
static NcclComm nccl_comms[GPUS_MAX];   /* GPU d's member of the communicator over all GPUs opened (NULL: none) */
static int nccl_version;                /* NCCL's: 22809 for 2.28.9 */
static char nccl_why[320];              /* why there is no communicator (not found, too old, failed) */
static int sums_by_nccl;                /* 1: the loaded ranks sum their parts by NCCL's all-reduce (gpu_choose_sums) */

/* Stop with the failing NCCL call's text, its place and NCCL's words for the error. */
#define NCCL_CHECK(call) nccl_check((call), #call, __FILE__, __LINE__)
static void nccl_check(int r, const char *call, const char *file, int line) {
    if (r) fatal("%s:%d: %s failed: %s (NCCL error %d)", file, line, call, nccl.ncclGetErrorString(r), r);
}

/* Release the communicator and NCCL (harmless when there is none). */
static void nccl_close(void) {
    for (int d = 0; d < GPUS_MAX; d++)
        if (nccl_comms[d]) NCCL_CHECK(nccl.ncclCommDestroy(nccl_comms[d]));
    if (nccl_lib) dlclose(nccl_lib);
    nccl_lib = NULL;
    memset(nccl_comms, 0, sizeof nccl_comms);
    memset(&nccl, 0, sizeof nccl);
}

/* Load libnccl.so.2: its functions into `nccl`, its version into nccl_version. Returns 1, or 0
   with the reason in nccl_why, nothing kept. Starts nothing on a GPU. */
static int nccl_load(void) {
    int r;
    nccl_close();   /* a communicator made before, over fewer GPUs */
    nccl_lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!nccl_lib) return snprintf(nccl_why, sizeof nccl_why, "no NCCL (%s)", dlerror()), 0;
    for (size_t i = 0; i < sizeof nccl_symbols / sizeof *nccl_symbols; i++) {
        void *f = dlsym(nccl_lib, nccl_symbols[i].symbol);
        if (!f) return snprintf(nccl_why, sizeof nccl_why, "libnccl.so.2 has no %s", nccl_symbols[i].symbol), nccl_close(), 0;
        memcpy((char *)&nccl + nccl_symbols[i].offset, &f, sizeof f);
    }
    if ((r = nccl.ncclGetVersion(&nccl_version)))
        return snprintf(nccl_why, sizeof nccl_why, "ncclGetVersion: %s", nccl.ncclGetErrorString(r)), nccl_close(), 0;
    return 1;
}

/* Load NCCL and make one communicator over the gpu_device_count GPUs opened. Returns 1, or 0
   with the reason in nccl_why, nothing kept (the sums then go through peer memory alone). */
static int nccl_open(void) {
    int r, devices[GPUS_MAX];
    if (!nccl_load()) return 0;
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    for (int d = 0; d < gpu_device_count; d++) devices[d] = d;   /* the runtime's ordinals are the driver's */
    r = nccl.ncclCommInitAll(nccl_comms, gpu_device_count, devices);
    if (r) {
        snprintf(nccl_why, sizeof nccl_why, "ncclCommInitAll over %d GPUs: %s", gpu_device_count, nccl.ncclGetErrorString(r));
        memset(nccl_comms, 0, sizeof nccl_comms);
        nccl_close();
        return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------------------- several hosts */
/* A model too large for one host's GPUs (V4-Pro on H100s) runs on several (--hosts N): one
   nvfp4 process a host, each started with the same command line but its --host index, each
   driving the same number of its own GPUs; rank h * G + d is host h's GPU d, and the model is
   divided over all the ranks as over the GPUs of one host. NCCL alone joins them (the ranks'
   sums, the logits' gather): one communicator over every rank, made with ncclCommInitRank from
   host 0's unique id, handed over in a file on storage every host reads (--nccl-id FILE, NCCL's
   own way without MPI). Host 0 writes it (refused when it exists: an earlier run's would send
   the others to a dead host) with its GPU count, its seed, so that every host samples the same
   tokens, and a hash of its command line and prompt, which every host must share; the others
   wait for it; host 0 removes it once every rank has joined (or at any exit before). A host
   that does not join within RENDEZVOUS_WAIT_S, or stops later (gpu_sync), ends the others with
   an error rather than a hang. Only host 0 prints. */

static struct {
    int count;        /* hosts (1: this one alone) */
    int index;        /* this host's, 0 .. count - 1 */
    int gpus;         /* GPUs every host drives */
} gpu_hosts = {1, 0, 1};

/* What host 0 hands the others. */
typedef struct {
    int hosts, gpus;     /* hosts, GPUs a host */
    uint64_t seed;       /* the sampler's seed */
    uint64_t command;    /* hash of the command line (but --host) and the prompt: the same on every host */
    NcclUniqueId id;     /* the communicator's */
} Rendezvous;

#define RENDEZVOUS_WAIT_S 600                 /* how long a host waits for host 0's file, and for every host to join */
static char rendezvous_path[PATH_MAX + 1];   /* host 0's file while it exists (removed at any exit), else "" */

/* Write r into `path` for the other hosts, whole or not at all: through a temporary file linked
   to its name (refused, naming it, when it exists). */
static void rendezvous_write(const char *path, const Rendezvous *r) {
    char temp[PATH_MAX + 32], hex[2 * sizeof r->id + 1];
    snprintf(temp, sizeof temp, "%s.%ld.tmp", path, (long)getpid());
    for (size_t i = 0; i < sizeof r->id; i++) snprintf(hex + 2 * i, 3, "%02x", (unsigned char)r->id.internal[i]);
    FILE *f = fopen(temp, "wx");
    if (!f) fatal("--nccl-id: cannot write %s: %s", temp, strerror(errno));
    fprintf(f, "nvfp4 rendezvous 1\nhosts %d\ngpus %d\nseed %llu\ncommand %016llx\nid %s\n", r->hosts, r->gpus,
            (unsigned long long)r->seed, (unsigned long long)r->command, hex);
    int failed = fflush(f) || fsync(fileno(f));
    failed |= fclose(f) != 0;
    if (failed) {
        unlink(temp);
        fatal("--nccl-id: cannot write %s: %s", temp, strerror(errno));
    }
    int linked = link(temp, path), error = errno;
    unlink(temp);
    if (linked && error == EEXIST)
        fatal("--nccl-id: %s exists (an earlier run's?): remove it, then start every host again", path);
    if (linked) fatal("--nccl-id: cannot make %s: %s", path, strerror(error));
    snprintf(rendezvous_path, sizeof rendezvous_path, "%s", path);
}

/* Host 0's file at `path` into *r, waiting up to wait_s seconds for it to appear. Refused,
   naming the file, when it does not come or is not one. */
static void rendezvous_read(const char *path, Rendezvous *r, double wait_s) {
    double start = now_seconds();
    FILE *f;
    while (!(f = fopen(path, "r"))) {
        if (errno != ENOENT) fatal("--nccl-id: cannot read %s: %s", path, strerror(errno));
        if (now_seconds() - start > wait_s) fatal("--nccl-id: waited %.0f s for host 0 to write %s", wait_s, path);
        usleep(100000);
    }
    char hex[2 * sizeof r->id + 2] = "";
    unsigned long long seed = 0, command = 0;
    int n = fscanf(f, "nvfp4 rendezvous 1 hosts %d gpus %d seed %llu command %16llx id %257s", &r->hosts, &r->gpus, &seed,
                   &command, hex);
    fclose(f);
    int good = n == 5 && strlen(hex) == 2 * sizeof r->id && r->hosts > 1 && r->gpus > 0;
    for (size_t i = 0; good && i < sizeof r->id; i++) {   /* two lowercase hex digits a byte */
        int digits[2];
        for (int k = 0; k < 2; k++) {
            char ch = hex[2 * i + k];
            digits[k] = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
        }
        good = digits[0] >= 0 && digits[1] >= 0;
        r->id.internal[i] = (char)(digits[0] * 16 + digits[1]);
    }
    if (!good) fatal("--nccl-id: %s is not a file nvfp4's host 0 wrote", path);
    r->seed = seed, r->command = command;
}

static atomic_int hosts_joined;   /* 1 once ncclCommInitRank returned (rendezvous_watchdog) */

/* A thread that ends the process, naming the wait, when the hosts have not all joined NCCL's
   communicator within RENDEZVOUS_WAIT_S (a host that never started, or refused the file). */
static void *rendezvous_watchdog(void *unused) {
    (void)unused;
    for (int i = 0; i < RENDEZVOUS_WAIT_S * 10 && !atomic_load(&hosts_joined); i++) usleep(100000);
    if (!atomic_load(&hosts_joined))
        fatal("--hosts: host %d waited %d s for every host to join (one not started, or refused: see its message)",
              gpu_hosts.index, RENDEZVOUS_WAIT_S);
    return NULL;
}

/* Join the hosts: this host's GPUs (gpu_device_count, one rank each) into one NCCL
   communicator with every other host's, as gpu_hosts says; host 0 writes `path` and removes it
   once all have joined, the others read it and must have the same `command` (command_hash).
   *seed: host 0's, given to every host. */
static void nccl_open_hosts(const char *path, uint64_t command, uint64_t *seed) {
    Rendezvous r = {gpu_hosts.count, gpu_device_count, *seed, command, {{0}}};
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    if (!nccl_load()) fatal("--hosts joins the hosts through NCCL, and there is %s", nccl_why);
    if (gpu_hosts.index == 0) {
        NCCL_CHECK(nccl.ncclGetUniqueId(&r.id));
        rendezvous_write(path, &r);
    } else {
        rendezvous_read(path, &r, RENDEZVOUS_WAIT_S);
        if (r.hosts != gpu_hosts.count || r.gpus != gpu_device_count)
            fatal("--nccl-id: host 0 runs %d hosts of %d GPUs, and this one (host %d) %d hosts of %d GPUs", r.hosts, r.gpus,
                  gpu_hosts.index, gpu_hosts.count, gpu_device_count);
        if (r.command != command)
            fatal("--nccl-id: host %d's command line or prompt differs from host 0's (every host runs the same, but --host)",
                  gpu_hosts.index);
    }
    pthread_t watchdog;
    if (pthread_create(&watchdog, NULL, rendezvous_watchdog, NULL)) fatal("cannot start a thread: %s", strerror(errno));
    int ranks = gpu_hosts.count * gpu_device_count;
    NCCL_CHECK(nccl.ncclGroupStart());
    for (int d = 0; d < gpu_device_count; d++) {   /* each with its GPU's context current: NCCL takes it as the device */
        CU_CHECK(cu.cuCtxSetCurrent(gpu_devices[d].ctx));
        NCCL_CHECK(nccl.ncclCommInitRank(&nccl_comms[d], ranks, r.id, gpu_hosts.index * gpu_device_count + d));
    }
    NCCL_CHECK(nccl.ncclGroupEnd());
    atomic_store(&hosts_joined, 1);
    pthread_join(watchdog, NULL);
    if (gpu_hosts.index == 0 && unlink(path)) warn("--nccl-id: cannot remove %s: %s", path, strerror(errno));
    rendezvous_path[0] = 0;
    gpu_use_device(0);
    gpu_hosts.gpus = gpu_device_count;
    *seed = r.seed;
}

/* Release the GPUs and the driver (harmless when gpu_open failed or never ran). */
static void gpu_close(void) {
    nccl_close();
    for (int d = GPUS_MAX - 1; d >= 0; d--) {
        GpuDevice *g = &gpu_devices[d];
        if (g->ctx) CU_CHECK(cu.cuCtxSetCurrent(g->ctx));
        if (g->module) CU_CHECK(cu.cuModuleUnload(g->module));
        if (g->stream) CU_CHECK(cu.cuStreamDestroy(g->stream));
        if (g->ctx) CU_CHECK(cu.cuDevicePrimaryCtxRelease(g->device));
    }
    if (cuda_lib) dlclose(cuda_lib);
    cuda_lib = NULL;
    memset(gpu_devices, 0, sizeof gpu_devices);
    gpu_device_count = 0;
    gpu_peer_access = 1;
    gpu = &gpu_devices[0];
    memset(&cu, 0, sizeof cu);
}

/* Open GPU `ordinal` into *g, made the current GPU (errors name it): its primary context (the
   one the CUDA runtime, and so NCCL, uses too; made current), a stream and the kernels. Returns 1, or 0 with a one-line reason in why[n] (not sm_90, no
   context, a cubin the driver rejects); what it opened stays in *g for gpu_close. */
static int gpu_open_device(int ordinal, GpuDevice *g, char *why, size_t n) {
#ifndef NVFP4_GPU
    (void)ordinal, (void)g, (void)why, (void)n;
    return 0;
#else
    CUresult r;
    const char *name;
    int major = 0, minor = 0;
    gpu = g;
#define ERROR_NAME(r) (cu.cuGetErrorName(r, &name) || !name ? "unknown error" : name)
    CU_CHECK(cu.cuDeviceGet(&g->device, ordinal));
    CU_CHECK(cu.cuDeviceGetName(g->name, sizeof g->name, g->device));
    CU_CHECK(cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, g->device));
    CU_CHECK(cu.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, g->device));
    CU_CHECK(cu.cuDeviceGetAttribute(&g->sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, g->device));
    CU_CHECK(cu.cuDriverGetVersion(&g->driver_version));
    if (major != 9 || minor != 0) {
        snprintf(why, n, "GPU %d is %s (sm_%d%d); the kernels are built for sm_90 (Hopper: H100, H200)", ordinal, g->name,
                 major, minor);
        return 0;
    }
    if ((r = cu.cuDevicePrimaryCtxRetain(&g->ctx, g->device)) || (r = cu.cuCtxSetCurrent(g->ctx))) {
        snprintf(why, n, "cannot create a context on GPU %d (%s): %s", ordinal, g->name, ERROR_NAME(r));
        return 0;
    }
    CU_CHECK(cu.cuStreamCreate(&g->stream, CU_STREAM_NON_BLOCKING));
    char info[4096] = "", error[4096] = "";
    int options[] = {CU_JIT_INFO_LOG_BUFFER, CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES, CU_JIT_ERROR_LOG_BUFFER,
                     CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void *values[] = {info, (void *)(uintptr_t)sizeof info, error, (void *)(uintptr_t)sizeof error};
    if ((r = cu.cuModuleLoadDataEx(&g->module, kernels_cubin, 4, options, values))) {
        snprintf(why, n, "the driver rejects the embedded kernels: %s %s%s", ERROR_NAME(r), error, info);
        return 0;
    }
    for (int k = 0; k < K_COUNT; k++) {
        CU_CHECK(cu.cuModuleGetFunction(&g->kernels[k], g->module, kernel_info[k].name));
        if (k == K_GEMV || k == K_GEMV_STREAMED || k == K_GEMV_RANKED)   /* room for x of the widest row (FP4: 8 columns a byte) */
            CU_CHECK(cu.cuFuncSetAttribute(g->kernels[k], CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           (int)gpu_gemv_smem(FMT_NVFP4, GPU_MAX_CHUNKS * GPU_CHUNK)));
        if (k == K_INDEXER_SCORES)   /* the queries of one token: NI x (DI + 4) floats, and NI weights */
            CU_CHECK(cu.cuFuncSetAttribute(g->kernels[k], CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, GPU_INDEXER_SMEM));
    }
    return 1;
#undef ERROR_NAME
#endif
}

/* Open the driver and GPU 0 (gpu_open_device). Returns 1 when the GPU path is usable;
   otherwise 0 with a one-line reason in why[n] (no kernels in this build, no driver, no GPU,
   gpu_open_device's), everything released. */
static int gpu_open(char *why, size_t n) {
#ifndef NVFP4_GPU
    (void)cu_symbols;   /* only a build with kernels opens the driver */
    snprintf(why, n, "this nvfp4 was built without GPU kernels (ptxas was not found at build time)");
    return 0;
#else
    CUresult r;
    const char *name;
#define GPU_FAIL(...) do { snprintf(why, n, __VA_ARGS__); gpu_close(); return 0; } while (0)
#define ERROR_NAME(r) (cu.cuGetErrorName(r, &name) || !name ? "unknown error" : name)
    cuda_lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cuda_lib) GPU_FAIL("no NVIDIA driver (%s)", dlerror());
    for (size_t i = 0; i < sizeof cu_symbols / sizeof *cu_symbols; i++) {
        void *f = dlsym(cuda_lib, cu_symbols[i].symbol);
        if (!f) GPU_FAIL("the NVIDIA driver is too old: libcuda.so.1 has no %s", cu_symbols[i].symbol);
        memcpy((char *)&cu + cu_symbols[i].offset, &f, sizeof f);
    }
    if ((r = cu.cuInit(0))) GPU_FAIL("no usable GPU (cuInit: %s)", ERROR_NAME(r));
    int count = 0;
    if ((r = cu.cuDeviceGetCount(&count)) || count == 0) GPU_FAIL("no GPU found");
    if (!gpu_open_device(0, &gpu_devices[0], why, n)) {
        gpu_close();
        return 0;
    }
    gpu_device_count = 1;
    return 1;
#undef GPU_FAIL
#undef ERROR_NAME
#endif
}

/* GPU 0 alone in use again after gpu_open_more failed (what it opened stays for gpu_close). */
static int gpu_more_failed(void) {
    gpu_device_count = 1;
    gpu_peer_access = 1;
    gpu_use_device(0);
    return 0;
}

/* Open GPUs 1 .. count - 1 beside GPU 0 (gpu_open's) and let every one read every other's
   memory (peer access: rank_sum reads the other ranks' parts where they lie), then NCCL over
   them where it is there (nccl_open); GPUs without peer access between some of them are joined
   by NCCL alone (gpu_peer_access 0). Returns 1 with GPU 0 current, or 0 with a one-line reason
   in why[n] naming the GPUs (fewer GPUs than asked, gpu_open_device's, no peer access between
   two of them and no NCCL), GPU 0 current and alone in use. */
static int gpu_open_more(int count, char *why, size_t n) {
    int present = 0;
    CU_CHECK(cu.cuDeviceGetCount(&present));
    if (count > present || count > GPUS_MAX) {
        snprintf(why, n, "%d GPUs asked for, and this machine has %d (at most %d are used)", count, present, GPUS_MAX);
        return 0;
    }
    for (int d = gpu_device_count; d < count; d++) {
        gpu_device_count = d + 1;   /* counted before it opens: its errors say "GPU d of d + 1" */
        if (!gpu_open_device(d, &gpu_devices[d], why, n)) return gpu_more_failed();
    }
    char pair[160] = "";   /* the first pair without peer access */
    for (int a = 0; a < count; a++)
        for (int b = 0; b < count; b++) {
            int can = 0;
            if (a == b) continue;
            CU_CHECK(cu.cuDeviceCanAccessPeer(&can, gpu_devices[a].device, gpu_devices[b].device));
            if (!can && !pair[0])
                snprintf(pair, sizeof pair, "GPU %d (%s) cannot read GPU %d's memory (no peer access between them)", a,
                         gpu_devices[a].name, b);
            if (!can) continue;
            CU_CHECK(cu.cuCtxSetCurrent(gpu_devices[a].ctx));
            CUresult r = cu.cuCtxEnablePeerAccess(gpu_devices[b].ctx, 0);
            if (r != CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED) CU_CHECK(r);
        }
    gpu_peer_access = !pair[0];
    if (gpu_hosts.count == 1) nccl_open();   /* or not: the sums go through peer memory alone (nccl_why says why) */
    if (!gpu_peer_access && gpu_hosts.count == 1 && !nccl_comms[0]) {
        snprintf(why, n, "%s, and without it only NCCL joins them: %.150s", pair, nccl_why);
        return gpu_more_failed();
    }
    gpu_use_device(0);
    return 1;
}

/* Whether `bytes` more device memory fit: 1, or 0 with "needs X GiB, the GPU has Y GiB free"
   in why[n]. Called before allocating a model, so that one too large for the card is refused
   with that message rather than an out-of-memory failure half way. */
static int gpu_fits(size_t bytes, char *why, size_t n) {
    size_t free_bytes, total_bytes;
    CU_CHECK(cu.cuMemGetInfo(&free_bytes, &total_bytes));
    if (bytes <= free_bytes) return 1;
    snprintf(why, n, "needs %.1f GiB, the GPU has %.1f GiB free (of %.1f GiB)", bytes / 1073741824.0,
             free_bytes / 1073741824.0, total_bytes / 1073741824.0);
    return 0;
}

/* Device memory of `bytes` (fatal, through CU_CHECK, when the GPU has none left). */
static CUdeviceptr gpu_alloc(size_t bytes) {
    CUdeviceptr p;
    CU_CHECK(cu.cuMemAlloc(&p, bytes ? bytes : 1));
    return p;
}

/* Free device memory from gpu_alloc (0: nothing to free). */
static void gpu_free(CUdeviceptr p) {
    if (p) CU_CHECK(cu.cuMemFree(p));
}

/* Wait for the current GPU's stream. Where NCCL sums the parts (sums_by_nccl), a GPU or host
   that stopped would leave its collectives waiting for ever: the wait polls, stops on NCCL's
   error, and gives up after NCCL_STALL_S, aborting the communicator, with an error naming the
   GPU (peer memory's waits trap by themselves: rank_sum). */
#define NCCL_STALL_S 600
static void gpu_sync(void) {
    if (!sums_by_nccl) {
        CU_CHECK(cu.cuStreamSynchronize(gpu->stream));
        return;
    }
    int d = (int)(gpu - gpu_devices), error = 0;
    double start = now_seconds();
    for (;;) {
        CUresult r = cu.cuStreamQuery(gpu->stream);
        if (r != CUDA_ERROR_NOT_READY) {
            CU_CHECK(r);
            return;
        }
        double waited = now_seconds() - start;
        if (waited > 0.02) usleep(100);   /* spin at first: a decode step takes a few ms */
        if (nccl_comms[d] && !nccl.ncclCommGetAsyncError(nccl_comms[d], &error) && error) break;
        if (waited > NCCL_STALL_S) break;
    }
    for (int k = 0; k < GPUS_MAX; k++)
        if (nccl_comms[k]) nccl.ncclCommAbort(nccl_comms[k]), nccl_comms[k] = NULL;
    if (error) fatal("GPU %d of host %d: NCCL failed: %s", d, gpu_hosts.index, nccl.ncclGetErrorString(error));
    fatal("GPU %d of host %d waited %d s for its part of a step: another GPU or host stopped (NCCL)", d, gpu_hosts.index,
          NCCL_STALL_S);
}

/* Copies on the stream, waited for: after return the host buffer may be reused or read. */
static void gpu_upload(CUdeviceptr dst, const void *src, size_t bytes) {
    CU_CHECK(cu.cuMemcpyHtoDAsync(dst, src, bytes, gpu->stream));
    gpu_sync();
}

/* The reverse copy, device to host. */
static void gpu_download(void *dst, CUdeviceptr src, size_t bytes) {
    CU_CHECK(cu.cuMemcpyDtoHAsync(dst, src, bytes, gpu->stream));
    gpu_sync();
}

static long gpu_launches;          /* kernels launched so far (the benchmark counts those of a decode step) */
static double *gpu_kernel_ms;      /* [K_COUNT] when set (the benchmark's breakdown): each launch is
                                      timed, waited for, and its milliseconds added by kernel */

/* Launch kernel k on the stream: a grid of gx x gy x gz blocks of `block` threads, smem bytes
   of dynamic shared memory, its one parameter the argument struct at args (args_bytes, which
   must be its struct's size: LAUNCH passes sizeof). */
static void gpu_launch(Kernel k, unsigned gx, unsigned gy, unsigned gz, unsigned block, unsigned smem, const void *args,
                       size_t args_bytes) {
    if (args_bytes != kernel_info[k].args_bytes)
        fatal("internal error: %s launched with %zu bytes of arguments, not its %zu", kernel_info[k].name, args_bytes,
              kernel_info[k].args_bytes);
    CUevent start = NULL, end = NULL;
    if (gpu_kernel_ms) {
        CU_CHECK(cu.cuEventCreate(&start, CU_EVENT_DEFAULT));
        CU_CHECK(cu.cuEventCreate(&end, CU_EVENT_DEFAULT));
        CU_CHECK(cu.cuEventRecord(start, gpu->stream));
    }
    gpu_launches++;
    /* programmatic dependent launch: the kernel may be scheduled before the previous one ends;
       its griddepcontrol.wait (kernels.ptx) holds it until that one's writes are visible */
    CUlaunchAttribute pdl = {.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, .value.value = 1};
    CUlaunchConfig config = {gx, gy, gz, block, 1, 1, smem, gpu->stream, &pdl, 1};
    void *params[] = {(void *)args};
    CU_CHECK(cu.cuLaunchKernelEx(&config, gpu->kernels[k], params, NULL));
    if (gpu_kernel_ms) {
        float ms;
        CU_CHECK(cu.cuEventRecord(end, gpu->stream));
        CU_CHECK(cu.cuEventSynchronize(end));
        CU_CHECK(cu.cuEventElapsedTime(&ms, start, end));
        gpu_kernel_ms[k] += ms;
        CU_CHECK(cu.cuEventDestroy(start));
        CU_CHECK(cu.cuEventDestroy(end));
    }
}

/* Launch kernel k with `args`, a variable of its argument struct (nvfp4.h). */
#define LAUNCH(k, gx, gy, gz, block, smem, args) gpu_launch(k, gx, gy, gz, block, smem, &(args), sizeof(args))

/* Blocks of `block` threads (and smem bytes of dynamic shared memory) of kernel k that fit on
   one SM at a time (fatal when none does: too many threads for the kernel's registers). */
static int gpu_blocks_per_sm(Kernel k, int block, unsigned smem) {
    int blocks = 0;
    CU_CHECK(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, gpu->kernels[k], block, smem));
    if (blocks < 1) fatal("kernel %s cannot run blocks of %d threads on %s", kernel_info[k].name, block, gpu->name);
    return blocks;
}

/* ============================================================================ GPU: kernels */
/* The C side of kernels.ptx: weights uploaded in the layout the kernels read, and launches.
   The GEMV layout (kernels.ptx explains why): the checkpoint's own row-major bytes, each row
   zero-padded to row_bytes, a multiple of 512 (one 16-byte load per lane of a warp); the scales
     NVFP4  E4M3 [rows, row_bytes / 8]          one per 16 columns, zero-padded like the codes
     MXFP4  E8M0 [rows, row_bytes / 16]         one per 32 columns
     FP8    f32  [ceil(rows/128), row_bytes/128] the block scale (E8M0 or f32) times 2^56
     BF16   none
   The GEMV reads at most 16 chunks of 512 bytes a row (its 16 warps, 128 registers each, fill
   an SM's register file): 16384 columns of FP4, 8192 of FP8, 4096 of BF16 (V4-Flash's widest
   rows). Wider BF16 and FP8 rows, up to twice that (V4-Pro's 7168-column BF16 and 16384-column
   FP8 wo_b), are padded to a multiple of 1024 bytes and read as two halves (split: kernels.ptx,
   "A SEGMENT"). */

#define GPU_STAGING ((size_t)64 << 20)      /* host bytes staged per upload piece */

/* A linear layer on the GPU, uploaded by gpu_upload_linear. */
typedef struct {
    WeightFormat format;
    int rows, cols;
    unsigned row_bytes;      /* padded bytes of one weight row: a multiple of GPU_CHUNK */
    unsigned split;          /* 1: the GEMV reads each row as two halves of row_bytes / 2 (wide rows) */
    CUdeviceptr weight;      /* [rows, row_bytes] */
    CUdeviceptr scale;       /* see the table above; 0 for BF16 */
    float gscale62;          /* NVFP4: global scale * 2^62 (the kernel's fixed-point shift) */
    unsigned grid, block;    /* launch shape */
    size_t bytes;            /* the checkpoint's bytes of this layer (codes + scales): what one GEMV must read */
} GpuLinear;

/* Bytes of one row of codes as the checkpoint stores it. */
static size_t linear_row_bytes(const Linear *w) {
    size_t cols = (size_t)w->cols;
    return w->format == FMT_BF16 ? 2 * cols : w->format == FMT_FP8 ? cols : cols / 2;
}

/* Several GPUs divide matrices by rows and columns into ranges (a rank's share). */
typedef struct { int first, count; } Range;   /* [first, first + count) */
#define SPLIT_BLOCK 128                        /* rows (and columns) divided in blocks of FP8's 128-row scale blocks */

/* Part `r` of `count` items in blocks of `block`, as even as whole blocks allow. */
static Range split_range(int count, int block, int r, int n) {
    int blocks = (count + block - 1) / block;
    int first = (int)((long long)blocks * r / n) * block, end = (int)((long long)blocks * (r + 1) / n) * block;
    if (end > count) end = count;
    if (first > count) first = count;
    return (Range){first, end - first};
}

/* Rows [first, first + count) of W as a Linear of their own, pointing into W's data (first a
   multiple of 128, where FP8's scale blocks start; no data: none). */
static Linear linear_rows_view(const Linear *w, int first, int count) {
    Linear v = *w;
    size_t cols = (size_t)w->cols, at = (size_t)first;
    v.rows = count;
    if (w->weight) v.weight = (const char *)w->weight + at * linear_row_bytes(w);
    if (!w->scale) return v;
    if (w->format == FMT_FP8) v.scale = (const char *)w->scale + at / 128 * ((cols + 127) / 128) * (w->scale_is_f32 ? 4 : 1);
    if (w->format == FMT_MXFP4) v.scale = (const char *)w->scale + at * (cols / 32);
    if (w->format == FMT_NVFP4) v.scale = (const char *)w->scale + at * (cols / 16);
    return v;
}

/* Columns [first, first + count) of W copied into a Linear of their own (first a multiple of
   128, count too unless the columns end at W's last: whole scale blocks of every format); its
   data is allocated (free both pointers), or NULL where W has none (the benchmark's: made on
   the GPU) or where `shape_only` (its bytes counted, nothing copied). F32 is not divided. */
static Linear linear_cols_copy(const Linear *w, int first, int count, int shape_only) {
    Linear v = *w;
    size_t rows = (size_t)w->rows, at = (size_t)first, n = (size_t)count;
    v.cols = count;
    v.weight = v.scale = NULL;
    if (w->format == FMT_F32) fatal("internal error: an F32 linear layer divided by columns");
    if (shape_only) return v;
    size_t code = linear_row_bytes(&v), code_at = at * linear_row_bytes(w) / (size_t)w->cols;
    if (w->weight) {
        uint8_t *q = xcalloc(rows, code);
        for (size_t r = 0; r < rows; r++)
            memcpy(q + r * code, (const uint8_t *)w->weight + r * linear_row_bytes(w) + code_at, code);
        v.weight = q;
    }
    if (!w->scale || w->format == FMT_BF16) return v;
    size_t unit = w->format == FMT_FP8 ? (w->scale_is_f32 ? 4 : 1) : 1;       /* bytes of one scale */
    size_t group = w->format == FMT_FP8 ? 128 : w->format == FMT_MXFP4 ? 32 : 16;   /* columns it covers */
    size_t srows = w->format == FMT_FP8 ? (rows + 127) / 128 : rows;            /* rows of scales */
    size_t old_row = ((size_t)w->cols + group - 1) / group * unit, new_row = (n + group - 1) / group * unit;
    uint8_t *sc = xcalloc(srows, new_row);
    for (size_t r = 0; r < srows; r++)
        memcpy(sc + r * new_row, (const uint8_t *)w->scale + r * old_row + at / group * unit, new_row);
    v.scale = sc;
    return v;
}

/* The rows a division of W by rows must keep together: FP8's 128-row scale blocks, else one. */
static int linear_row_block(const Linear *w) { return w->format == FMT_FP8 ? 128 : 1; }

/* The columns a division of W by columns must keep together: the columns one scale covers. */
static int linear_col_block(const Linear *w) {
    return w->format == FMT_FP8 ? 128 : w->format == FMT_MXFP4 ? 32 : w->format == FMT_NVFP4 ? 16 : 1;
}

/* Layer w's attention cut to its output groups g (a rank's share when attention is divided:
   attention_divisible): wq_b's rows of the groups' heads and those heads' sinks, the groups'
   rows of wo_a, and their columns of wo_b (copied: free its weight and scale, unless
   shape_only, as linear_cols_copy). The rest is w's. Its attention() under a Config of the
   groups' heads (n_heads, o_groups) is the groups' part of w's block output: the parts of all
   the groups add up to the whole. */
static Layer layer_attention_share(const Config *c, const Layer *w, Range g, int shape_only) {
    Layer v = *w;
    int heads = c->n_heads / c->o_groups, rows = heads * c->head_dim, O = c->o_lora_rank;
    v.wq_b = linear_rows_view(&w->wq_b, g.first * rows, g.count * rows);
    v.attn_sink = w->attn_sink ? w->attn_sink + (size_t)g.first * heads : NULL;
    v.wo_a = linear_rows_view(&w->wo_a, g.first * O, g.count * O);
    v.wo_b = linear_cols_copy(&w->wo_b, g.first * O, g.count * O, shape_only);
    return v;
}

/* Bytes of W's scales as the checkpoint stores them. */
static size_t linear_scale_bytes(const Linear *w) {
    size_t rows = (size_t)w->rows, cols = (size_t)w->cols;
    switch (w->format) {
    case FMT_NVFP4: return rows * (cols / 16);
    case FMT_MXFP4: return rows * (cols / 32);
    case FMT_FP8: return ((rows + 127) / 128) * ((cols + 127) / 128) * (w->scale_is_f32 ? 4 : 1);
    default: return 0;
    }
}

/* Bytes of one row of W in the GEMV layout: the checkpoint's row padded to GPU_CHUNK, or to two
   chunks where the GEMV reads it as two halves (wider than GPU_MAX_CHUNKS chunks). */
static size_t gpu_row_bytes(const Linear *w) {
    size_t bytes = linear_row_bytes(w), unit = bytes > GPU_MAX_CHUNKS * GPU_CHUNK ? 2 * GPU_CHUNK : GPU_CHUNK;
    return (bytes + unit - 1) / unit * unit;
}

/* Device bytes of W's codes in the GEMV layout. */
static size_t gpu_linear_code_bytes(const Linear *w) { return (size_t)w->rows * gpu_row_bytes(w); }

/* Device bytes of W's scales in the GEMV layout (0 for BF16). */
static size_t gpu_linear_scale_bytes(const Linear *w) {
    size_t row_bytes = gpu_row_bytes(w), rows = (size_t)w->rows;
    return w->format == FMT_NVFP4 ? rows * (row_bytes / 8)
         : w->format == FMT_MXFP4 ? rows * (row_bytes / 16)
         : w->format == FMT_FP8 ? (rows + 127) / 128 * (row_bytes / 128) * 4 : 0;
}

/* ------------------------------------------------------------------------------ writing */
/* Everything a load writes goes through gm_write and upload_padded. A destination is either
   device memory, reached through two page-locked staging buffers of GPU_STAGING bytes (the host
   fills one, by all the CPU threads, while the copy engine moves the other: the copies are
   asynchronous, and gpu_staging_close waits for the last), or the page-locked host memory of
   what was placed on the host (host_map), written in place with no copy at all. */

static struct {
    uint8_t *buf[2];     /* [GPU_STAGING] each, page-locked */
    CUevent sent[2];     /* recorded after the copy out of buf[i] */
    int next;            /* the buffer to fill next */
} staging;

/* The page-locked, mapped host memory of what was placed on the host (the embedding table and
   the routed experts that do not fit the GPU: gpu_plan_placement): [bytes] at base on the host,
   at dev in the GPU's address space (empty when everything fits the GPU). */
static struct {
    char *base;
    CUdeviceptr dev;
    size_t bytes;
} host_map;

/* The host address of device address d when it lies in host_map, else NULL. */
static void *host_address(CUdeviceptr d) {
    return host_map.bytes && d >= host_map.dev && d - host_map.dev < host_map.bytes ? host_map.base + (d - host_map.dev) : NULL;
}

static void gpu_staging_open(void) {
    for (int i = 0; i < 2; i++) {
        CU_CHECK(cu.cuMemHostAlloc((void **)&staging.buf[i], GPU_STAGING, 0));
        CU_CHECK(cu.cuEventCreate(&staging.sent[i], CU_EVENT_DEFAULT));
    }
    staging.next = 0;
}

/* Wait for the copies in flight and free the staging buffers. */
static void gpu_staging_close(void) {
    CU_CHECK(cu.cuStreamSynchronize(gpu->stream));
    for (int i = 0; i < 2; i++) {
        CU_CHECK(cu.cuMemFreeHost(staging.buf[i]));
        CU_CHECK(cu.cuEventDestroy(staging.sent[i]));
    }
    memset(&staging, 0, sizeof staging);
}

/* The staging buffer to fill next, once the copy out of it has finished. */
static uint8_t *staging_buffer(void) {
    CU_CHECK(cu.cuEventSynchronize(staging.sent[staging.next]));   /* never recorded: returns at once */
    return staging.buf[staging.next];
}

/* Copy the first `bytes` of the buffer staging_buffer gave to device address d (asynchronous). */
static void staging_send(CUdeviceptr d, size_t bytes) {
    CU_CHECK(cu.cuMemcpyHtoDAsync(d, staging.buf[staging.next], bytes, gpu->stream));
    CU_CHECK(cu.cuEventRecord(staging.sent[staging.next], gpu->stream));
    staging.next ^= 1;
}

/* Rows r0 .. r0 + n of src [rows, src_bytes] into dst as rows of dst_bytes, zero-padded. */
typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    size_t dst_bytes, src_bytes, r0;
} PadRows;

static void pad_block(void *arg, int thread, int begin, int end) {
    (void)thread;
    const PadRows *p = arg;
    for (size_t r = (size_t)begin; r < (size_t)end; r++) {
        memcpy(p->dst + r * p->dst_bytes, p->src + (p->r0 + r) * p->src_bytes, p->src_bytes);
        memset(p->dst + r * p->dst_bytes + p->src_bytes, 0, p->dst_bytes - p->src_bytes);
    }
}

/* The same on every CPU thread (the pages of an mmapped checkpoint are read here). */
static void pad_rows(uint8_t *dst, size_t dst_bytes, const uint8_t *src, size_t src_bytes, size_t r0, size_t n) {
    PadRows job = {dst, src, dst_bytes, src_bytes, r0};
    parallel_for((int)n, pad_block, &job);
}

/* Write the byte matrix src [rows, src_bytes] to d (device or host_map) as rows padded to
   dst_bytes: in place on the host, else a staging buffer at a time. */
static void upload_padded(CUdeviceptr d, const void *src, size_t rows, size_t src_bytes, size_t dst_bytes) {
    uint8_t *host = host_address(d);
    if (host) {
        pad_rows(host, dst_bytes, src, src_bytes, 0, rows);
        return;
    }
    size_t per_piece = GPU_STAGING / dst_bytes ? GPU_STAGING / dst_bytes : 1;
    for (size_t r0 = 0; r0 < rows; r0 += per_piece) {
        size_t n = rows - r0 < per_piece ? rows - r0 : per_piece;
        pad_rows(staging_buffer(), dst_bytes, src, src_bytes, r0, n);
        staging_send(d + r0 * dst_bytes, n * dst_bytes);
    }
}

/* Write `bytes` from src to d (device or host_map), in rows of 1 MiB (the CPU threads share them). */
static void gm_write(CUdeviceptr d, const void *src, size_t bytes) {
    size_t row = (size_t)1 << 20, rows = bytes / row, tail = bytes - rows * row;
    if (rows) upload_padded(d, src, rows, row, row);
    if (tail) upload_padded(d + rows * row, (const uint8_t *)src + rows * row, 1, tail, tail);
}

/* What fill_random (kernels.ptx) writes. */
typedef enum { FILL_BYTES, FILL_E4M3, FILL_BF16, FILL_E4M3_SCALE, FILL_E8M0_SCALE } FillKind;

/* bytes (a multiple of 4) of valid random weights of one kind at d, made on the GPU. */
static void gpu_fill_random(CUdeviceptr d, size_t bytes, FillKind kind) {
    static unsigned seed = 1;
    FillRandomArgs args = {.dst = d, .n_words = bytes / 4, .seed = seed++, .kind = kind};
    LAUNCH(K_FILL, (unsigned)gpu->sm_count * 8, 1, 1, 256, 0, args);
}

/* Bytes of one row as the GEMV reads it: the stored row, or half of it where split. */
static unsigned gpu_gemv_row_bytes(const GpuLinear *g) { return g->row_bytes >> g->split; }

/* Choose g's GEMV launch shape: blocks of ~16 warps (ksplit warps a row, nrg groups of 4 rows),
   as many blocks as fit on the GPU at once (a launch uses at most one per item: gpu_gemv_parts).
   That grid asks the driver about the loaded kernel: without one (a placement planned on a
   machine without a GPU: gpu_plan_placement) it stays 0. */
static void gpu_gemv_shape(GpuLinear *g) {
    unsigned ksplit = gpu_gemv_row_bytes(g) / GPU_CHUNK, nrg = ksplit >= 16 ? 1 : 16 / ksplit;
    g->block = 32 * ksplit * nrg;
    /* an item (4 * nrg rows) and its scales fit a stage of the ring (kernels.ptx, "the ring") */
    if (4 * nrg * gpu_gemv_row_bytes(g) > 32768)   /* then its scales fit the 4 KB beside it too */
        fatal("internal error: a GEMV item of %u bytes does not fit the ring's 32 KB stages", 4 * nrg * gpu_gemv_row_bytes(g));
    if (gpu->kernels[K_GEMV])
        g->grid = (unsigned)(gpu->sm_count * gpu_blocks_per_sm(K_GEMV, (int)g->block, gpu_gemv_smem(g->format, g->row_bytes)));
}

/* Upload W in the kernels' layout into the device buffers `weight` [gpu_linear_code_bytes] and
   `scale` [gpu_linear_scale_bytes] (0 for BF16), and choose its launch shape; with weight 0 (a
   plan being counted) only describe it. A W without data (w->weight NULL: the benchmark's
   model) gets random valid weights made on the GPU instead. Fatal when the GPU has no kernel
   for W's format or W is too wide for one (the message names the limit). */
static void gpu_place_linear(GpuLinear *g, const Linear *w, CUdeviceptr weight, CUdeviceptr scale) {
    if (w->format == FMT_F32) fatal("the GPU kernels have no F32 linear layer (%d x %d)", w->rows, w->cols);
    size_t src_bytes = linear_row_bytes(w), rows = (size_t)w->rows;
    size_t row_bytes = gpu_row_bytes(w);
    int halves = w->format == FMT_BF16 || w->format == FMT_FP8 ? 2 : 1;   /* rows the GEMV may split */
    if (row_bytes / GPU_CHUNK > (size_t)halves * GPU_MAX_CHUNKS)
        fatal("a %d x %d linear layer is too wide for the GPU kernels (at most %d bytes a row in this format)", w->rows,
              w->cols, halves * GPU_MAX_CHUNKS * GPU_CHUNK);
    memset(g, 0, sizeof *g);
    g->format = w->format;
    g->rows = w->rows;
    g->cols = w->cols;
    g->row_bytes = (unsigned)row_bytes;
    g->split = row_bytes / GPU_CHUNK > GPU_MAX_CHUNKS;
    g->bytes = rows * src_bytes + linear_scale_bytes(w);
    g->weight = weight;
    g->scale = scale;
    g->gscale62 = w->format == FMT_NVFP4 || w->format == FMT_MXFP4 ? ldexpf(w->global_scale, 62) : 0;
    gpu_gemv_shape(g);
    if (!weight) return;
    if (w->weight) upload_padded(weight, w->weight, rows, src_bytes, row_bytes);
    else gpu_fill_random(weight, rows * row_bytes, w->format == FMT_BF16 ? FILL_BF16 : w->format == FMT_FP8 ? FILL_E4M3 : FILL_BYTES);
    if (w->format == FMT_NVFP4 || w->format == FMT_MXFP4) {
        int group = w->format == FMT_NVFP4 ? 16 : 32;   /* columns per scale; 8 or 16 code bytes */
        if (w->scale) upload_padded(scale, w->scale, rows, (size_t)w->cols / group, row_bytes * 2 / group);
        else gpu_fill_random(scale, rows * (row_bytes * 2 / group), w->format == FMT_NVFP4 ? FILL_E4M3_SCALE : FILL_E8M0_SCALE);
    } else if (w->format == FMT_FP8) {   /* small: [ceil(rows/128), ceil(cols/128)] -> f32 * 2^56 */
        size_t brows = (rows + 127) / 128, bcols = ((size_t)w->cols + 127) / 128, dcols = row_bytes / 128;
        float *s = xcalloc(brows * dcols, sizeof(float));
        for (size_t i = 0; i < brows; i++)
            for (size_t j = 0; j < bcols; j++) {
                float v = !w->scale ? 1.0f / 256   /* the benchmark's stand-in block scale */
                        : w->scale_is_f32 ? load_f32(w->scale, i * bcols + j)
                                          : e8m0_to_float(((const uint8_t *)w->scale)[i * bcols + j]);
                s[i * dcols + j] = ldexpf(v, 56);
            }
        gm_write(scale, s, brows * dcols * sizeof(float));
        free(s);
    }
}

/* What one GEMV computes beyond y = W x (kernels.ptx, "GEMV: y = W x"), zero for
   nothing more:
   - several products of W's shape (count slots; 0 means 1): slot z reads x + z * x_stride
     floats and writes y + z * y_stride floats with matrix m = z (expert 0) or, for experts
     chosen on the GPU (an int32 device array), m = expert[z % list_len] + (z / list_len) *
     list_offset; its codes and scales lie m * stride_w and m * stride_s bytes after W's, or at
     table[2m] and table[2m + 1] (a device array: routed experts), and an NVFP4 stack of matrices
     with global scales of their own gives them (times 2^62) in gscales62;
     expert_ready says the list was written before the previous kernel (the GEMV may then read
     it before its griddepcontrol.wait: kernels.ptx, "the kernel");
   - x staged as SwiGLU(x, up) with up lying up_offset bytes after x (an expert's w2), or as
     rmsnorm(x) * norm_weight (wq_b after q_norm);
   - stream: the routed experts' streaming ("Streaming the host experts"; NULL: none);
   - share: 1 when table holds only a rank's share of the experts (the others' entries 0: the
     launch is gemv_ranked's, which skips them). */
typedef struct {
    int count, x_stride, y_stride;
    CUdeviceptr expert;
    int expert_ready;
    size_t stride_w, stride_s;
    CUdeviceptr table;
    CUdeviceptr gscales62;
    int list_len, list_offset;
    size_t up_offset;
    float limit;
    CUdeviceptr norm_weight;
    float eps;
    const GemvStream *stream;
    int share;
} GemvPlan;


/* The format numbers of kernels.ptx (GemvSeg.format). */
static const uint32_t gemv_format[] = {[FMT_NVFP4] = GEMV_NVFP4, [FMT_MXFP4] = GEMV_MXFP4, [FMT_FP8] = GEMV_FP8,
                                       [FMT_BF16] = GEMV_BF16};

/* One product of a GEMV launch: y = W x for W = *g, extended by *plan (NULL: nothing more);
   x = 0 takes x from the launch's mHC finish (gpu_gemv_parts). */
typedef struct {
    const GpuLinear *g;
    CUdeviceptr x, y;
    const GemvPlan *plan;
} GemvPart;

/* parts[n] on the stream, as few gemv launches as the kernel allows: consecutive parts of one
   block shape, up to GEMV_MAX_SEGS, share a launch (one segment each). Parts with x = 0 read
   the mHC finish `hc` of a site (each block makes it; block 0 writes post and comb, so the
   first part must be such a part when hc has post). With `route` (NULL: none) the parts whose
   expert list is route->chosen get it from the launch itself: every block first routes the
   token from the router's logits (block 0 writes the choice and its weights). No part may read
   another's y. Mirrors linear()
   for T = 1 of each (with expert_ffn's activation, rmsnorm, or hc_pre + rmsnorm before it; and
   route() before the experts' products). */
static void gpu_gemv_launch(const GemvPart *parts, int n, const GemvHc *hc, const GemvRoute *route) {
    unsigned block = parts[0].g->block, nsegs = 1;
    while ((int)nsegs < n && nsegs < GEMV_MAX_SEGS && parts[nsegs].g->block == block) nsegs++;
    GemvArgs args;
    GemvSeg *segs = args.segs;
    unsigned xs_of[GEMV_MAX_SEGS];   /* bytes of each segment's staged x: 4 a padded column */
    memset(&args, 0, sizeof args);
    for (int i = 0; i < GEMV_MAX_SEGS; i++) segs[i].first_item = segs[i].first_slot = UINT32_MAX;
    unsigned items = 0, slots = 0, contiguous = 0, list_ready = 1, xs_bytes = 0, grid = UINT32_MAX;
    int share = 0;   /* a part reads a rank's share of the routed experts */
    for (unsigned i = 0; i < nsegs; i++) {
        const GpuLinear *g = parts[i].g;
        GemvPlan none = {0};
        const GemvPlan *p = parts[i].plan ? parts[i].plan : &none;
        unsigned count = p->count ? (unsigned)p->count : 1, gemv_bytes = gpu_gemv_row_bytes(g);
        unsigned rows = (unsigned)g->rows << g->split, rows_iter = 4 * (block / 32 / (gemv_bytes / GPU_CHUNK));
        segs[i] = (GemvSeg){
            .w = g->weight, .s = g->scale, .x = parts[i].x, .y = parts[i].y, .expert = p->expert,
            .stride_w = p->stride_w, .stride_s = p->stride_s, .table = p->table, .gscales62 = p->gscales62,
            .up_offset = p->up_offset,
            .norm_weight = p->norm_weight, .format = gemv_format[g->format], .rows = rows,
            .cols = (uint32_t)g->cols, .row_bytes = gemv_bytes, .split = g->split, .x_stride = (uint32_t)p->x_stride,
            .y_stride = (uint32_t)p->y_stride, .list_len = p->list_len ? (uint32_t)p->list_len : count,
            .list_offset = (uint32_t)p->list_offset, .gscale62 = g->gscale62, .limit = p->limit, .eps = p->eps,
            .first_item = items, .first_slot = slots, .x_group = i, .row_blocks = (rows + rows_iter - 1) / rows_iter,
            .x_hc = parts[i].x == 0};
        if (!parts[i].x && (!hc || p->x_stride || p->up_offset || p->norm_weight))
            fatal("internal error: a GEMV part without x needs an mHC site to make it, and no other x transform");
        xs_of[i] = gpu_gemv_smem(g->format, g->row_bytes) - GPU_GEMV_RING;
        for (unsigned j = 0; j < i; j++) {   /* the same x staged the same way: one staging for both */
            const GemvSeg *a = &segs[j], *b = &segs[i];
            if (a->x == b->x && a->x_stride == b->x_stride && a->up_offset == b->up_offset && a->limit == b->limit &&
                a->norm_weight == b->norm_weight && a->eps == b->eps && a->cols == b->cols && xs_of[j] == xs_of[i]) {
                segs[i].x_group = a->x_group;
                break;
            }
        }
        items += count * segs[i].row_blocks;
        slots += count;
        contiguous |= p->x_stride != 0;
        if (p->expert && (!p->expert_ready || p->stream)) list_ready = 0;   /* streamed: waits need the tag */
        if (p->stream) args.stream = *p->stream;
        share |= p->share;
        xs_bytes = xs_of[i] > xs_bytes ? xs_of[i] : xs_bytes;
        grid = g->grid < grid ? g->grid : grid;
    }
    if (slots > GEMV_MAX_SLOTS) fatal("a GEMV launch of %u products: the kernels take at most %d", slots, GEMV_MAX_SLOTS);
    if (hc && hc->post && parts[0].x) fatal("internal error: the mHC site's post and comb need an mHC part first");
    GemvHc site = hc ? *hc : (GemvHc){0};
    int own = 0;   /* a part reads this launch's own choice */
    for (unsigned i = 0; i < nsegs; i++) own |= route && segs[i].expert == route->chosen;
    if (own && (list_ready || xs_bytes < 8 * route->X))   /* routed after the wait; xs holds its 2X scratch words */
        fatal("internal error: a GEMV launch that routes needs its list read after the wait and %u bytes of x",
              8 * route->X);
    args.items = items, args.slots = slots, args.contiguous = contiguous, args.list_ready = list_ready;
    args.xs_bytes = xs_bytes, args.hc = site;
    if (own) args.route = *route;
    LAUNCH(args.stream.control ? K_GEMV_STREAMED : share ? K_GEMV_RANKED : K_GEMV, grid < items ? grid : items, 1, 1, block,
           xs_bytes + GPU_GEMV_RING, args);
    if ((int)nsegs < n) {   /* the rest, in launches that leave post and comb alone (written) */
        site.post = site.comb = 0;
        GemvRoute again = route ? *route : (GemvRoute){0};
        if (own) again.hits = 0;   /* this launch counted the token's experts: the next ones route without counting */
        gpu_gemv_launch(parts + nsegs, n - (int)nsegs, hc ? &site : NULL, route ? &again : NULL);
    }
}

/* The same without routing. */
static void gpu_gemv_parts(const GemvPart *parts, int n, const GemvHc *hc) { gpu_gemv_launch(parts, n, hc, NULL); }

/* y = W x, extended by `plan` (NULL: nothing more): one launch. */
static void gpu_gemv_plan(const GpuLinear *g, CUdeviceptr x, CUdeviceptr y, const GemvPlan *plan) {
    GemvPart part = {g, x, y, plan};
    gpu_gemv_parts(&part, 1, NULL);
}

/* y[rows] = W x[cols] on the stream (x, y: device float arrays). Mirrors linear() for T = 1. */
static void gpu_gemv(const GpuLinear *g, CUdeviceptr x, CUdeviceptr y) { gpu_gemv_plan(g, x, y, NULL); }

/* Launch stream_read over buf[bytes] (bytes a multiple of 16), adding its uint32 sum to *out. */
static void gpu_stream_read(CUdeviceptr buf, size_t bytes, CUdeviceptr out) {
    StreamReadArgs args = {.buf = buf, .n16 = bytes / 16, .out = out};
    LAUNCH(K_STREAM_READ, (unsigned)(gpu->sm_count * 4), 1, 1, 256, 0, args);
}

/* ======================================================================= GPU: forward pass */
/* The model on the GPU mirrors the CPU forward pass kernel by kernel (each kernel's comment in
   kernels.ptx names the CPU function it computes). The state is the CPU's plan laid over one
   device allocation: gm->state's pointers are device addresses (the driver's unified virtual
   addressing makes them ordinary 64-bit values), so every buffer has the same shape and meaning
   on both paths. Beside it the GPU keeps a few buffers the CPU does not need: the mHC partial
   sums, the indexer's scores, selection and count for every token of a chunk, the active expert
   list, sampling probabilities, decode attention's split-key partials and their counters, and
   the values a decode step reads and advances in device memory: the position, the token and
   the sampler's RNG state.

   Three paths compute the same model: forward() on the CPU is the reference; gpu_prefill runs
   a chunk of tokens section by section beside it (tensor-core GEMMs, ordinary launches: the
   host may wait between them, e.g. to size the MoE's expert launches); gpu_decode runs one
   token with decode's fusions and is what the CUDA graph captures (gpu_capture_decode):
   replaying it is the whole step, and the host reads back 4 bytes (the token). The stages
   both launch (embedding, indexer, the attention kernel, the output projection, the mHC
   mixing) come first. */

#define DEV(p) ((CUdeviceptr)(uintptr_t)(p))   /* a device address held in a pointer of gm->state */
#define HC_SLICE 64                            /* columns of E per block of the mHC partial sums */

/* One matrix (w1, w2 or w3) of a layer's routed experts on the GPU: expert e's is the GpuLinear
   `one` with its codes and scales wherever the placement put them (device memory, or mapped
   host memory: gpu_upload_experts), at the addresses table[2e] and table[2e + 1]. */
typedef struct {
    GpuLinear one;               /* format, shape and padded row bytes of one expert */
    CUdeviceptr table;           /* u64 [X, 2]: expert e's codes and scales addresses (the GEMV's SEG_TABLE) */
    CUdeviceptr *host_table;     /* [X, 2] the same, for per-expert prefill launches */
    float *host_factors;         /* [X] the GEMM's output factors (gpu_gemm_factor) */
    CUdeviceptr gscales62;       /* [X] f32: NVFP4 global scales times 2^62, for the GEMV */
} GpuExperts;

/* One contiguous piece of a host-placed expert as the copy thread streams it into a slot (the
   matrices of one gpu_upload_experts call: w1 and w3 side by side, or each, then w2). */
typedef struct {
    int part;                   /* 0: read by the w1/w3 launch, 1: by the w2 launch */
    size_t slot_offset, bytes;  /* where it lies in a streaming slot; its bytes (every expert's alike) */
    const CUdeviceptr *source;  /* [X, 2]: expert e's piece starts at source[2e] (its first matrix's codes) */
} StreamPiece;

typedef struct {
    GpuLinear wq_a, wq_b, wkv, wo_a, wo_b, gate, shared_w1, shared_w2, shared_w3;
    GpuLinear comp_wkv, comp_wgate, index_wq_b, index_weights_proj, index_comp_wkv, index_comp_wgate;
    GpuExperts w1, w2, w3;
    CUdeviceptr attn_norm, ffn_norm, q_norm, kv_norm, attn_sink;   /* [E], [E], [Q], [D], [H] (the rank's heads) */
    CUdeviceptr hc_attn_fn, hc_attn_base, hc_attn_scale, hc_ffn_fn, hc_ffn_base, hc_ffn_scale;
    CUdeviceptr comp_ape, comp_norm, index_comp_ape, index_comp_norm;
    CUdeviceptr gate_bias, tid2eid;   /* [X] f32 (routed layers), [V, K] int32 (hash layers) */
    /* pairs uploaded side by side (gm_linear_pair), computed by one launch in decode; their
       NVFP4 global scales (times 2^62) as device arrays of 2 */
    int shared_paired, comp_paired, index_comp_paired;
    CUdeviceptr shared_gscales62, comp_gscales62, index_comp_gscales62;
    int w13_paired;                   /* the routed w1 and w3 stacks side by side (gpu_upload_experts) */
    GpuLinear wq_a_wkv;               /* wq_a's rows then wkv's as one matrix (gm_linear_stack); rows 0: not stacked */
    GpuLinear csa_stack;              /* CSA: comp_wkv, comp_wgate, index_comp_wkv, index_comp_wgate and
                                         index_weights_proj as one matrix; rows 0: not stacked */
    StreamPiece stream[3];            /* a host expert's pieces, as the copy thread streams them */
    int stream_pieces;
} GpuLayer;

/* One GPU's share of the model in a split plan (split_plan, in "several GPUs: the split plan",
   makes them; gpu_load_ranks loads them). */
typedef struct {
    Range experts;       /* routed experts of every layer it holds */
    Range groups;        /* attention's output groups it computes (all of them when attention is whole) */
    Range shared;        /* the shared expert's intermediate rows */
    Range vocab;         /* the head's rows: the logits it computes */
    Range layers;        /* the layers it runs (all but in a pipeline) */
    double read_bytes;   /* weight bytes a decode step reads on it; the routed experts' expected
                            under uniform routing (K of X experts a layer) */
    double held_bytes;   /* weight bytes it holds (the checkpoint's): its share of its layers with
                            all its experts, the embedding table (every GPU; a pipeline's first),
                            its head rows */
} RankShare;

typedef struct {
    double read_bytes_per_us;   /* one GPU's streaming read */
    double allreduce_us;        /* an all-reduce of E floats over the N GPUs */
} SplitCosts;

typedef struct {
    int n;                   /* GPUs */
    int pipeline;            /* 1: divided by layers (no peer access) */
    int attention_split;     /* 1: attention divided by output groups */
    int allreduces;          /* all-reduces of E floats a decode step (the logits' gather aside) */
    double saved_us;         /* dividing attention: read time it saves the busiest rank a step */
    RankShare rank[RANKS_MAX];
} SplitPlan;

/* Everything of one model on the GPU: one rank's share of it (several GPUs: gpu_load_ranks),
   the whole model when one GPU runs it. */
typedef struct {
    int rank, ranks;                       /* this share is rank `rank` of `ranks` (0 or 1: the whole model) */
    int device;                            /* its GPU: gpu_devices[device] */
    Range experts;                         /* the routed experts it holds, of every layer (ranks > 1) */
    Range vocab;                           /* the head's rows it holds: the logits it computes (ranks > 1) */
    Range shared;                          /* the shared expert's intermediate rows it computes (ranks > 1;
                                              none: its part of the MoE has no shared expert) */
    Range groups;                          /* attention's output groups it computes, with their heads
                                              (every group: attention is whole) */
    int attention_split;                   /* 1: the ranks divide attention by output groups */
    CUdeviceptr rank_partial;              /* f32 [3, T, E]: its parts of the divided sub-blocks' outputs,
                                              in turn (rank_part_buffer; ranks > 1) */
    CUdeviceptr rank_published;            /* uint32 [1]: rank_partial's blocks published so far */
    GpuLayer *layers;
    int n_layers;
    GpuLinear head;
    CUdeviceptr embed;                     /* [V, E] bf16; in the host region whenever anything is
                                              (a token reads one row: gpu_lay_out) */
    CUdeviceptr norm, hc_head_fn, hc_head_base, hc_head_scale;
    StatePlan plan;                        /* the layout of everything below in `arena` (gpu_lay_out) */
    CUdeviceptr arena;                     /* the model's one device allocation [arena_bytes] */
    size_t arena_bytes;                    /* the plan's total rounded up to GPU_ALLOC_GRANULE */
    State state;                           /* the CPU's plan over its part of the arena */
    int hc_slices;                         /* ceil(E / HC_SLICE) */
    CUdeviceptr hc_partial, hc_partial_ss; /* f64 [T, 24, hc_slices], [T, hc_slices] */
    int score_stride;                      /* C / (smallest compress ratio): indexer scores per token */
    CUdeviceptr index_scores;              /* [T, score_stride] */
    CUdeviceptr selected, n_selected;      /* int32 [T, index_topk], [T] */
    CUdeviceptr active_experts, active_count; /* int32 [X], [1] */
    CUdeviceptr slot_identity;             /* int32 [K]: slot k's output is row k (decode) */
    CUdeviceptr probs;                     /* [V] sampling scratch */
    int attn_splits;                       /* Z: blocks a head's keys are split over in decode */
    CUdeviceptr attn_partial, attn_counter; /* f32 [H, Z, D + 4] their partials; u32 [H] counts (0);
                                               H: the heads it computes (gm_heads) */
    CUdeviceptr qr_kv;                     /* [Q + D] decode: wq_a_wkv's output, qr then kv */
    CUdeviceptr csa_out;                   /* [4D + 4DI + NI] decode: csa_stack's output, part by part */
    CUdeviceptr shared_act;                /* [2, I] decode: the shared expert's gate, then up */
    CUdeviceptr pos, tokens, rng, out_token; /* int32 [1], int32 [T], u64 [1], int32 [1] */
    CUdeviceptr recent, n_fed;             /* int32 [REPEAT_LAST_N_MAX], uint32 [1]: the sampler's ring
                                              of tokens fed (the repeat penalty's), its write count */
    CUdeviceptr hits;                      /* uint32 [L, X]: decode's expert choices (gemv's routing counts them) */
    uint64_t *prefill_hits;                /* [L, X] prefill's, counted on the host (gpu_moe_prefill) */
    const uint8_t *on_device;              /* [L, X]: 1 where expert e of layer l is in device memory;
                                              NULL: everything is (set: the embedding table is on
                                              the host, perhaps alone: gpu_plan_placement) */
    StatePlan host_plan;                   /* the layout of the host region (host_map): the embedding
                                              table, then the host-placed experts */
    size_t stream_slot_bytes;              /* one expert's w1, w3 and w2 in a streaming slot; 0: no
                                              expert is on the host, nothing is streamed */
    CUdeviceptr stream_staging;            /* [K, stream_slot_bytes]: the streaming slots */
    CUdeviceptr stream_control;            /* [SC_BYTES]: the step counter, error word, ready flags (SC_*) */
    StreamMail *stream_mail;               /* [L] in the host region: each layer's posted choice */
    CUdeviceptr stream_mail_dev;           /* the same, mapped into the GPU's address space */
    CUgraphExec decode_graph;              /* one decode step, captured by gpu_capture_decode */
    float *host_logits;                    /* [T or 1, V] host copy of the logits for --dump-logits, --perplexity */
} GpuModel;

static GpuModel gpu_ranks[GPUS_MAX];   /* rank r's share (several hosts: this host's r-th); one GPU: gpu_ranks[0],
                                          the whole model */
static SplitPlan gpu_split;             /* the plan loaded (gpu_load_ranks): every rank's share */
static GpuModel *gm = &gpu_ranks[0];       /* the rank every GPU function below works on */
static int gpu_rank_count = 1;             /* ranks loaded: gpu_ranks[0 .. gpu_rank_count) */

/* Make rank r the one the GPU functions work on, its GPU's context current. */
static void gpu_use_rank(int r) {
    gm = &gpu_ranks[r];
    if (gpu != &gpu_devices[gm->device]) gpu_use_device(gm->device);
}

/* The GPUs opened, in words: GPU 0's name, "N x" before it when there are several. */
static void gpu_names(char *out, size_t n) {
    if (gpu_device_count > 1) snprintf(out, n, "%d x %s", gpu_device_count, gpu_devices[0].name);
    else snprintf(out, n, "%s", gpu_devices[0].name);
}

/* GPUs `ranks` ranks run on, and the loaded ranks use: rank d (d < this) is the first on GPU d
   (gpu_load_ranks: rank r on GPU r modulo the GPUs opened). */
static int gpu_devices_used_by(int ranks) { return ranks < gpu_device_count ? ranks : gpu_device_count; }
static int gpu_devices_used(void) { return gpu_devices_used_by(gpu_rank_count); }

/* Whether the current rank holds routed expert e (every rank of one holds them all). */
static int gm_holds_expert(int e) {
    return gm->ranks <= 1 || (e >= gm->experts.first && e < gm->experts.first + gm->experts.count);
}

/* The attention heads the current rank computes: its output groups' (all of them when
   attention is whole), and those groups. */
static int gm_heads(const Config *c) { return gm->attention_split ? gm->groups.count * (c->n_heads / c->o_groups) : c->n_heads; }
static int gm_groups(const Config *c) { return gm->attention_split ? gm->groups.count : c->o_groups; }

/* Empty the current rank's model, keeping which share of the model it is. */
static void gm_clear(void) {
    int rank = gm->rank, ranks = gm->ranks, device = gm->device;
    Range experts = gm->experts, vocab = gm->vocab, shared = gm->shared, groups = gm->groups;
    int attention_split = gm->attention_split;
    memset(gm, 0, sizeof *gm);
    gm->rank = rank, gm->ranks = ranks, gm->device = device, gm->experts = experts, gm->vocab = vocab, gm->shared = shared;
    gm->groups = groups, gm->attention_split = attention_split;
}

/* The factor the GEMM multiplies its f32 sums by for W's layout: NVFP4's global scale, 2^-56 for
   FP8 (the GEMV layout keeps FP8 block scales as f32 times 2^56), 1 otherwise. */
static float gpu_gemm_factor(const GpuLinear *w) {
    return w->format == FMT_NVFP4 ? ldexpf(w->gscale62, -62) : w->format == FMT_FP8 ? ldexpf(1, -56) : 1;
}

/* ---------------------------------------------------------------------------------- upload */

/* The model's device memory is one allocation laid out by the planner of the CPU state
   (reserve): gpu_lay_out runs twice over the same code, first counting (gm->plan.base NULL:
   every address is 0 and nothing is uploaded), then, once the total is known to fit and is
   allocated, placing and uploading. So the bytes the fit check names are the bytes allocated. */

#define GPU_ALLOC_GRANULE ((size_t)2 << 20)   /* the driver hands out device memory in 2 MiB pages */
#define GPU_HEADROOM ((size_t)512 << 20)      /* device memory a load leaves free (the decode graph, the
                                                 driver's launch resources) */

/* The next `bytes` of the model's arena: their device address, or 0 while counting. */
static CUdeviceptr gm_reserve(size_t bytes) {
    return DEV(reserve(&gm->plan, bytes, 1));
}

/* The address `bytes` into a region of the arena at `base` (0 while counting). */
static CUdeviceptr gm_offset(CUdeviceptr base, size_t bytes) { return base ? base + bytes : 0; }

/* A device copy of n floats (uploaded when placing). */
static CUdeviceptr gm_floats(const float *host, size_t n) {
    CUdeviceptr d = gm_reserve(n * sizeof(float));
    if (d) gm_write(d, host, n * sizeof(float));
    return d;
}

/* The next `bytes` of the host region (the embedding table, the host-placed experts): their
   device address (in host_map), or 0 while counting. */
static CUdeviceptr gm_reserve_host(size_t bytes) {
    char *p = reserve(&gm->host_plan, bytes, 1);
    return p ? host_map.dev + (CUdeviceptr)(p - host_map.base) : 0;
}

/* Upload stacks[0..n) (n = 1, or 2 for w1 and w3 of one format) of layer l's X experts in the
   GEMV layout, each expert's matrices in device memory or in the host region as gm->on_device
   says, and describe them in g[0..n): one address table for all n * X matrices (stack i's
   expert e is its entry i * X + e, so that one launch can reach both stacks: gpu_moe_decode)
   and one device array of their NVFP4 global scales (times 2^62). A host expert's n matrices
   are one piece of the host region (codes, scales, codes, scales, each reservation aligned);
   when experts are streamed (gm->stream_slot_bytes) its device table entries are the piece's
   offsets in a streaming slot, the piece going to slot_offset (bit 0 of the codes' entry
   marks them: "Streaming the host experts"), and host_table keeps the host addresses (the
   prefill's GEMMs read there). A rank's share leaves the other ranks' experts out: their table
   entries are 0, host_table's too. Returns the piece's bytes. */
static size_t gpu_upload_experts(GpuExperts *g, const ExpertStack *const *stacks, int n, int l, int X, size_t slot_offset) {
    CUdeviceptr *table = xcalloc((size_t)n * X * 2, sizeof(CUdeviceptr));
    CUdeviceptr *device_table = xcalloc((size_t)n * X * 2, sizeof(CUdeviceptr));
    float *gscales62 = xcalloc((size_t)n * X, sizeof(float));
    size_t piece = 0;
    int described = 0;   /* g[i].one made from the first expert uploaded */
    for (int i = 0; i < n; i++) g[i].host_factors = xcalloc((size_t)X, sizeof(float));
    for (int e = 0; e < X; e++) {
        if (!gm_holds_expert(e)) continue;   /* another rank's: its table entries 0 (gemv_ranked skips them) */
        int device = !gm->on_device || gm->on_device[(size_t)l * X + e];
        piece = 0;
        for (int i = 0; i < n; i++) {
            Linear one = expert_matrix(stacks[i], e);
            size_t code = gpu_linear_code_bytes(&one), scale = gpu_linear_scale_bytes(&one);
            CUdeviceptr *at = &table[((size_t)i * X + e) * 2], *dev_at = &device_table[((size_t)i * X + e) * 2];
            at[0] = device ? gm_reserve(code) : gm_reserve_host(code);
            at[1] = !scale ? 0 : device ? gm_reserve(scale) : gm_reserve_host(scale);
            int streamed = !device && gm->stream_slot_bytes;
            dev_at[0] = streamed ? 1 + slot_offset + piece : at[0];
            piece += state_aligned(code);
            dev_at[1] = streamed ? slot_offset + piece : at[1];
            piece += state_aligned(scale);
            GpuLinear placed;
            gpu_place_linear(&placed, &one, at[0], at[1]);
            gscales62[(size_t)i * X + e] = placed.gscale62;
            if (!described) g[i].one = placed;
            g[i].host_factors[e] = gpu_gemm_factor(&placed);
        }
        described = 1;
    }
    CUdeviceptr all_table = gm_reserve((size_t)n * X * 2 * sizeof(CUdeviceptr));
    if (all_table) gm_write(all_table, device_table, (size_t)n * X * 2 * sizeof(CUdeviceptr));
    CUdeviceptr all_gscales = gm_floats(gscales62, (size_t)n * X);
    for (int i = 0; i < n; i++) {
        g[i].table = gm_offset(all_table, (size_t)i * X * 2 * sizeof(CUdeviceptr));
        g[i].host_table = xcalloc((size_t)X * 2, sizeof(CUdeviceptr));
        memcpy(g[i].host_table, &table[(size_t)i * X * 2], (size_t)X * 2 * sizeof(CUdeviceptr));
        g[i].gscales62 = gm_offset(all_gscales, (size_t)i * X * sizeof(float));
    }
    free(table);
    free(device_table);
    free(gscales62);
    return piece;
}

/* A device copy of a linear layer, owned by the model. */
static void gm_linear(GpuLinear *g, const Linear *w) {
    size_t scale_bytes = gpu_linear_scale_bytes(w);
    gpu_place_linear(g, w, gm_reserve(gpu_linear_code_bytes(w)), scale_bytes ? gm_reserve(scale_bytes) : 0);
}

/* Upload in[0..n) (same format and width) into one allocation, each one's codes right after
   the previous one's codes and its scales right after the previous one's scales: the layout
   gm_linear_stack and gm_linear_pair launch as one. */
static void gm_linear_adjacent(GpuLinear *const *out, const Linear *const *in, int n) {
    size_t code = 0, scale = 0;
    for (int i = 0; i < n; i++) code += gpu_linear_code_bytes(in[i]), scale += gpu_linear_scale_bytes(in[i]);
    CUdeviceptr w = gm_reserve(code), sc = scale ? gm_reserve(scale) : 0;
    for (int i = 0; i < n; i++) {
        gpu_place_linear(out[i], in[i], w, sc);
        w = gm_offset(w, gpu_linear_code_bytes(in[i]));
        sc = gm_offset(sc, gpu_linear_scale_bytes(in[i]));
    }
}

/* Linear layers in[0..n) that take the same input, uploaded one after the other (rows, codes
   and scales, gm_linear_adjacent) into out[] and described together in *all, one matrix of
   their rows in order, when one GEMV can read them as one: same format, width and scale kind;
   FP8 with every part but the last a multiple of 128 rows (its 128-row scale blocks end where
   the next part begins); NVFP4 with one global scale. Returns whether it did; otherwise it
   uploads nothing. */
static int gm_linear_stack(GpuLinear *const *out, const Linear *const *in, int n, GpuLinear *all) {
    for (int i = 1; i < n; i++) {
        const Linear *a = in[0], *b = in[i];
        if (a->format != b->format || a->cols != b->cols || a->scale_is_f32 != b->scale_is_f32 ||
            (a->format == FMT_FP8 && in[i - 1]->rows % 128) || (a->format == FMT_NVFP4 && a->global_scale != b->global_scale))
            return 0;
    }
    gm_linear_adjacent(out, in, n);
    *all = *out[0];
    for (int i = 1; i < n; i++) all->rows += out[i]->rows, all->bytes += out[i]->bytes;
    gpu_gemv_shape(all);
    return 1;
}

/* Two linear layers that take the same input, uploaded side by side (b's codes and scales
   right after a's) when they share format and shape, so that one GEMV launch of two slots
   computes both in decode (gemv_add_pair); otherwise each in buffers of its own. Returns
   whether they were paired. */
static int gm_linear_pair(GpuLinear *ga, GpuLinear *gb, const Linear *a, const Linear *b, CUdeviceptr *gscales62) {
    if (a->format != b->format || a->rows != b->rows || a->cols != b->cols || a->scale_is_f32 != b->scale_is_f32) {
        gm_linear(ga, a);
        gm_linear(gb, b);
        return 0;
    }
    gm_linear_adjacent((GpuLinear *[]){ga, gb}, (const Linear *[]){a, b}, 2);
    *gscales62 = gm_floats((float[]){ga->gscale62, gb->gscale62}, 2);
    return 1;
}


/* The linear layers of L other than the routed experts, into list[] (at most 16); returns how
   many (the compressor and indexer ones only where the layer has them). */
static int layer_linears(const Layer *L, const Linear **list) {
    const Linear *all[] = {&L->wq_a, &L->wq_b, &L->wkv, &L->wo_a, &L->wo_b, &L->gate, &L->shared_w1, &L->shared_w2,
                           &L->shared_w3, &L->compressor.wkv, &L->compressor.wgate, &L->index_wq_b,
                           &L->index_weights_proj, &L->index_compressor.wkv, &L->index_compressor.wgate};
    int n = 0;
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (all[i]->rows) list[n++] = all[i];
    return n;
}

/* Blocks a head's keys are split over in decode (attention_decode's grid.z, at most 16): as
   many as fill the SMs with the blocks of `heads` heads once. */
static int attention_splits(int heads) {
    int z = gpu->sm_count / heads;
    return z < 1 ? 1 : z > 16 ? 16 : z;
}

/* Refuse, naming it, a size the GPU kernels cannot handle (kernels.ptx states each limit). */
static void gpu_check_limits(const Config *c) {
    if (c->head_dim % 4 || c->head_dim > 512) fatal("the GPU path needs head_dim a multiple of 4 up to 512, not %d", c->head_dim);
    if (c->index_heads > 64 || c->index_heads % 2)   /* indexer_scores' (cos, sin) table must be 8-byte aligned */
        fatal("the GPU path takes an even number of index heads up to 64, not %d", c->index_heads);
    if (c->index_dim % 4 || c->index_dim > 512) fatal("the GPU path needs index_head_dim a multiple of 4 up to 512, not %d", c->index_dim);
    if (c->n_experts > 1024 || c->topk > 32) fatal("the GPU path takes at most 1024 experts and top-32, not %d and %d", c->n_experts, c->topk);
    int inputs[] = {c->hidden_size, c->q_lora_rank, c->n_heads * c->head_dim / c->o_groups, c->o_groups * c->o_lora_rank,
                    c->moe_inter};
    for (int i = 0; i < 5; i++)   /* the GEMM reads x 4 floats at a time */
        if (inputs[i] % 4) fatal("the GPU path needs every linear layer's input a multiple of 4 wide, not %d", inputs[i]);
}

/* Free gm's host memory (the layers' descriptions); the device arena is left alone. */
static void gm_free_host(void) {
    for (int l = 0; gm->layers && l < gm->n_layers; l++) {
        GpuExperts *stacks[3] = {&gm->layers[l].w1, &gm->layers[l].w2, &gm->layers[l].w3};
        for (int i = 0; i < 3; i++) {
            free(stacks[i]->host_factors);
            free(stacks[i]->host_table);
        }
    }
    free(gm->layers);
    free(gm->state.layers);
    gm->layers = NULL;
    gm->state.layers = NULL;
}

/* ------------------------------------------------------------------------ expert placement */
/* When the model does not fit the GPU (or --gpu-mem), the embedding table and the routed experts
   that do not fit stay in page-locked host memory mapped into the GPU's address space (decode
   streams the chosen experts into device slots, prefill and the embedding read them where they
   lie: "Streaming the host experts"): everything else, and as many experts as fit, is in
   device memory. Which experts get the device: the most used first, by the counts of an
   --expert-profile (hits [L, X]: how often earlier runs chose expert e of layer l); ties, and
   every expert without a profile (all counts 0), in the order expert 0 of every layer, expert 1
   of every layer, ...: each layer gets the same number of device experts, the first layers one
   more while the budget lasts. */

typedef struct { uint64_t hits; int layer, expert; } ExpertRank;

/* qsort order: more hits first, then the lower expert number, then the lower layer. */
static int compare_expert_rank(const void *a, const void *b) {
    const ExpertRank *x = a, *y = b;
    if (x->hits != y->hits) return x->hits > y->hits ? -1 : 1;
    if (x->expert != y->expert) return x->expert < y->expert ? -1 : 1;
    return (x->layer > y->layer) - (x->layer < y->layer);
}

/* Choose on_device [L, X] (1: device memory, 0: host) for experts taking expert_bytes[l] bytes
   of device memory each (layer l's w1, w2 and w3 as gpu_upload_experts lays them out), within
   `budget` bytes, in the order above (hits NULL: no profile). Returns the bytes placed on the
   device. */
static size_t place_experts(int L, int X, const size_t *expert_bytes, const uint64_t *hits, size_t budget,
                            uint8_t *on_device) {
    size_t n = (size_t)L * X, used = 0;
    ExpertRank *order = xcalloc(n, sizeof *order);
    for (int l = 0; l < L; l++)
        for (int e = 0; e < X; e++) order[(size_t)l * X + e] = (ExpertRank){hits ? hits[(size_t)l * X + e] : 0, l, e};
    qsort(order, n, sizeof *order, compare_expert_rank);
    memset(on_device, 0, n);
    for (size_t i = 0; i < n; i++) {
        size_t bytes = expert_bytes[order[i].layer];
        if (bytes > budget - used) continue;
        on_device[(size_t)order[i].layer * X + order[i].expert] = 1;
        used += bytes;
    }
    free(order);
    return used;
}

/* Bytes a decode step is expected to read from host memory: in layer l, K experts of read_bytes[l]
   (their codes and scales) each, on the host with the probability the profile gives them (their
   share of the layer's hits) or, without a profile or hits in that layer, uniformly. */
static double host_bytes_per_token(int L, int X, int K, const size_t *read_bytes, const uint64_t *hits,
                                   const uint8_t *on_device) {
    double bytes = 0;
    for (int l = 0; l < L; l++) {
        double total = 0, on_host = 0, host_experts = 0;
        for (int e = 0; e < X; e++) {
            size_t i = (size_t)l * X + e;
            total += hits ? (double)hits[i] : 0;
            on_host += !on_device[i] && hits ? (double)hits[i] : 0;
            host_experts += !on_device[i];
        }
        bytes += K * (double)read_bytes[l] * (total > 0 ? on_host / total : host_experts / X);
    }
    return bytes;
}

/* Bytes of one row of the embedding table: what a token reads of it. */
static size_t embed_row_bytes(const Model *m) { return m->embed.nbytes / (size_t)m->config.vocab_size; }

/* Device bytes of one of layer l's experts as gpu_upload_experts lays it out (*device, each
   buffer rounded as reserve rounds it) and bytes its GEMVs read (*read: the codes and scales). */
static void expert_bytes(const Layer *w, size_t *device, size_t *read) {
    const ExpertStack *stacks[3] = {&w->w1, &w->w2, &w->w3};
    *device = *read = 0;
    for (int i = 0; i < 3; i++) {
        Linear one = expert_matrix(stacks[i], 0);
        size_t code = gpu_linear_code_bytes(&one), scale = gpu_linear_scale_bytes(&one);
        *device += state_aligned(code) + state_aligned(scale);
        *read += (size_t)one.rows * linear_row_bytes(&one) + linear_scale_bytes(&one);
    }
}

/* --expert-profile FILE: the experts' hits of earlier runs, as text: the line "nvfp4 expert
   profile: L layers, X experts", then a line of X counts for each layer. */
#define PROFILE_HEADER "nvfp4 expert profile: %d layers, %d experts\n"

/* The counts [L, X] in `path`, or NULL when there is no such file (the first run writes it);
   fatal, naming the file, when it is not such a profile or is one of another model's shape. */
static uint64_t *read_expert_profile(const char *path, int L, int X) {
    size_t size;
    char *text = read_file(path, &size);
    if (!text && errno == ENOENT) return NULL;
    if (!text) fatal("--expert-profile: cannot read %s: %s", path, strerror(errno));
    int file_l, file_x, at = 0;
    if (sscanf(text, PROFILE_HEADER "%n", &file_l, &file_x, &at) != 2 || !at)
        fatal("--expert-profile: %s is not an expert profile (it does not begin with \"nvfp4 expert profile:\")", path);
    if (file_l != L || file_x != X)
        fatal("--expert-profile: %s counts %d layers of %d experts, the model has %d layers of %d experts", path, file_l,
              file_x, L, X);
    uint64_t *hits = xcalloc((size_t)L * X, sizeof *hits);
    const char *p = text + at;
    for (size_t i = 0; i < (size_t)L * X; i++) {
        char *end;
        while (*p == ' ' || *p == '\n') p++;
        errno = 0;
        hits[i] = strtoull(p, &end, 10);
        if (end == p || *p == '-' || errno)
            fatal("--expert-profile: %s: count %zu of layer %zu is missing or not a count", path, i % X, i / X);
        p = end;
    }
    while (*p == ' ' || *p == '\n') p++;
    if (*p) fatal("--expert-profile: %s has more than %d layers of %d counts", path, L, X);
    free(text);
    return hits;
}

/* Write the counts [L, X] to `path` through a temporary file renamed over it (the old profile
   stays whole until the new one is complete); fatal, naming the file, when it cannot. */
static void write_expert_profile(const char *path, int L, int X, const uint64_t *hits) {
    char *temp = xcalloc(strlen(path) + 16, 1);
    sprintf(temp, "%s.tmp%d", path, (int)getpid());
    FILE *f = fopen(temp, "w");
    if (!f) fatal("--expert-profile: cannot write %s: %s", temp, strerror(errno));
    fprintf(f, PROFILE_HEADER, L, X);
    for (int l = 0; l < L; l++)
        for (int e = 0; e < X; e++) fprintf(f, "%llu%c", (unsigned long long)hits[(size_t)l * X + e], e + 1 < X ? ' ' : '\n');
    int failed = ferror(f) | fclose(f);
    if (failed || rename(temp, path)) {
        int error = errno;
        unlink(temp);
        fatal("--expert-profile: cannot write %s: %s", path, strerror(error));
    }
    free(temp);
}

/* ---------------------------------------------------------------- streaming the host experts
   In decode the GPU does not read the host-placed experts over PCIe itself: the copy engine
   moves host memory faster than the SMs' loads do (55 against 44 GB/s on an H100, and 55
   against 33 on a host whose link serves SM loads badly: docs/performance.md). So a host
   thread, the copy thread, does the moving:
   - the launch that routes layer l (w1/w3) posts its K chosen experts and a tag in the layer's
     StreamMail (mapped host memory) as soon as it has routed;
   - the copy thread sees the new tag, copies each chosen host expert's pieces into streaming
     slot k (k its place in the list): first every expert's w1 and w3, then every w2, each
     followed by a write of the tag into its ready flag (cuStreamWriteValue32 on the thread's
     own stream, ordered after the copy);
   - the GEMVs read those experts from the slots once their flags hold the tag (kernels.ptx,
     STREAM_WAIT); the device experts of the launch are computed meanwhile.
   The tag is step * L + l + 1, step the counter embed_streams advances each decode step, so a
   flag left from an earlier layer or step never matches. The slots are reused by every layer:
   layer l + 1 posts only after layer l's w2 launch has finished reading them. A wait longer
   than STREAM_TIMEOUT_NS gives up and is reported after the step (stream_check), so a copy
   that never comes stops the run with a message, not a hang. The decode step stays one
   graph; the host thread is the only party outside it. Prefill's GEMMs read the host experts
   where they lie (host_table). */

/* Bytes of one streaming slot: the largest expert's w1, w3 and w2 as gpu_upload_experts lays
   them out. */
static size_t stream_slot_bytes(const Model *m) {
    size_t most = 0, device, read;
    for (int l = 0; l < m->config.n_layers; l++) {
        expert_bytes(&m->layers[l], &device, &read);
        most = device > most ? device : most;
    }
    return most;
}

/* Device bytes that streaming takes: K slots and the control words. */
static size_t stream_device_bytes(const Model *m) {
    return (size_t)m->config.topk * stream_slot_bytes(m) + state_aligned(SC_BYTES);
}

/* One copy of the copy thread: bytes from host src to device dst, then ready flag `flag`
   (part * STREAM_MAX_SLOTS + k) set to the post's tag when flag >= 0. */
typedef struct { const void *src; CUdeviceptr dst; size_t bytes; int flag; } StreamCopy;

/* The copies that serve a post of layer g (experts[K], the routing's choice; on_device [X] the
   layer's placement) into out[] (room for 3K), in order: for part 0 (w1, w3) then part 1 (w2),
   for k = 0..K-1 each host expert's pieces of that part into slot k, the last one setting the
   slot's flag. Experts outside [0, X) are skipped. Returns how many. */
static int stream_copies(const GpuLayer *g, const uint8_t *on_device, int X, const int *experts, int K,
                         CUdeviceptr staging, size_t slot_bytes, StreamCopy *out) {
    int n = 0;
    for (int part = 0; part < 2; part++)
        for (int k = 0; k < K; k++) {
            int e = experts[k];
            if (e < 0 || e >= X || on_device[e]) continue;
            for (int i = 0; i < g->stream_pieces; i++) {
                const StreamPiece *p = &g->stream[i];
                if (p->part != part) continue;
                out[n++] = (StreamCopy){host_address(p->source[2 * (size_t)e]),
                                        staging + (CUdeviceptr)k * slot_bytes + p->slot_offset, p->bytes, -1};
            }
            out[n - 1].flag = part * STREAM_MAX_SLOTS + k;
        }
    return n;
}

/* The copy thread and what it has done. */
static struct {
    pthread_t thread;
    int running, layers, experts, topk;
    int stop;                    /* set (atomically) by stream_stop */
    int failed;                  /* a driver call failed: error says which */
    char error[200];
    uint32_t *seen;              /* [L]: the last tag served of each layer */
    uint64_t bytes;              /* bytes copied so far (atomic: read while the thread runs) */
} streamer;

/* The copy thread's body: poll the layers' mails; serve each new post (stream_copies) on the
   thread's own stream. It spins while posts come, naps 20 us between polls after 10 ms without
   one (a pause between tokens) and 1 ms after a second (a user typing), until stream_stop. A
   failed driver call is recorded and ends the serving: the GPU's wait then times out and
   stream_check reports both. */
static void *stream_thread_main(void *unused) {
    (void)unused;
    CUstream stream = NULL;
    StreamCopy *copies = xcalloc((size_t)3 * streamer.topk, sizeof *copies);
    CUresult r = cu.cuCtxSetCurrent(gpu->ctx);
    if (!r) r = cu.cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING);
    if (r) snprintf(streamer.error, sizeof streamer.error, "the copy thread could not start (driver error %d)", r);
    double last_post = now_seconds();
    while (!r && !__atomic_load_n(&streamer.stop, __ATOMIC_ACQUIRE)) {
        int served = 0;
        for (int l = 0; l < streamer.layers && !r; l++) {
            StreamMail *mail = &gm->stream_mail[l];
            uint32_t tag = __atomic_load_n(&mail->tag, __ATOMIC_ACQUIRE);
            if (tag == streamer.seen[l]) continue;
            streamer.seen[l] = tag;
            int experts[STREAM_MAX_SLOTS];
            for (int k = 0; k < streamer.topk; k++) experts[k] = __atomic_load_n(&mail->expert[k], __ATOMIC_RELAXED);
            int n = stream_copies(&gm->layers[l], gm->on_device + (size_t)l * streamer.experts, streamer.experts, experts,
                                  streamer.topk, gm->stream_staging, gm->stream_slot_bytes, copies);
            for (int i = 0; i < n && !r; i++) {
                r = cu.cuMemcpyHtoDAsync(copies[i].dst, copies[i].src, copies[i].bytes, stream);
                if (!r && copies[i].flag >= 0)
                    r = cu.cuStreamWriteValue32(stream, gm->stream_control + SC_READY + 4 * (CUdeviceptr)copies[i].flag, tag, 0);
                if (!r) __atomic_fetch_add(&streamer.bytes, copies[i].bytes, __ATOMIC_RELAXED);
            }
            if (r) snprintf(streamer.error, sizeof streamer.error, "the copy thread's copy for layer %d failed (driver error %d)", l, r);
            served = 1;
        }
        double idle = served ? 0 : now_seconds() - last_post;
        if (served) last_post = now_seconds();
        else if (idle > 0.01) nanosleep(&(struct timespec){0, idle > 1 ? 1000000 : 20000}, NULL);
    }
    if (stream) {
        cu.cuStreamSynchronize(stream);
        cu.cuStreamDestroy(stream);
    }
    free(copies);
    if (r) __atomic_store_n(&streamer.failed, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Start the copy thread for the loaded model when it streams experts (gm->stream_slot_bytes). */
static void stream_start(const Config *c) {
    if (!gm->stream_slot_bytes) return;
    memset(&streamer, 0, sizeof streamer);
    streamer.layers = c->n_layers, streamer.experts = c->n_experts, streamer.topk = c->topk;
    streamer.seen = xcalloc((size_t)c->n_layers, sizeof *streamer.seen);
    int error = pthread_create(&streamer.thread, NULL, stream_thread_main, NULL);
    if (error) fatal("cannot start the copy thread: %s", strerror(error));
    streamer.running = 1;
}

/* Stop the copy thread (harmless when none runs). */
static void stream_stop(void) {
    if (!streamer.running) return;
    __atomic_store_n(&streamer.stop, 1, __ATOMIC_RELEASE);
    pthread_join(streamer.thread, NULL);
    free(streamer.seen);
    streamer.seen = NULL;
    streamer.running = 0;
}

/* After a decode step: fatal, naming the layer, when a GEMV stopped waiting for a copy (the
   step's results are void) or the copy thread failed. */
static void stream_check(void) {
    if (!streamer.running) return;
    for (int l = 0; l < streamer.layers; l++)
        if (__atomic_load_n(&gm->stream_mail[l].timed_out, __ATOMIC_ACQUIRE))
            fatal("layer %d's experts in host memory did not reach the GPU within %d s%s%s", l, STREAM_TIMEOUT_NS / 1000000000,
                  __atomic_load_n(&streamer.failed, __ATOMIC_ACQUIRE) ? ": " : " (the copy thread is stuck)", streamer.error);
    if (__atomic_load_n(&streamer.failed, __ATOMIC_ACQUIRE)) fatal("%s", streamer.error);
}

/* Lay out model m for chunks of T tokens and a context of C over gm->plan: the weights in the
   kernels' layout, the state (plan_state over its own region), then the GPU's own scratch and
   the values a decode step reads. While counting (gm->plan.base NULL) only the sizes and the
   descriptions are made; while placing, everything is uploaded too (a progress bar on a tty). */
static void gpu_lay_out(const Model *m, int T, int C, int all_logits) {
    const Config *c = &m->config;
    int E = c->hidden_size, X = c->n_experts, L = c->n_layers, placing = gm->plan.base != NULL;
    /* experts on the host are streamed in decode through K slots of one expert each */
    gm->stream_slot_bytes = gm->on_device && memchr(gm->on_device, 0, (size_t)L * X) ? stream_slot_bytes(m) : 0;
    if (gm->stream_slot_bytes > UINT32_MAX)   /* GemvStream.slot_bytes */
        fatal("the GPU path streams experts of at most 4 GiB, and one of this model's takes %.2f GiB",
              gm->stream_slot_bytes / 1073741824.0);
    /* with experts in host memory, the embedding table goes there too: a token reads one row
       of it (E * 2 bytes over PCIe), and its device memory holds more experts instead */
    gm->embed = gm->on_device ? gm_reserve_host(m->embed.nbytes) : gm_reserve(m->embed.nbytes);
    if (placing && m->embed.data) gm_write(gm->embed, m->embed.data, m->embed.nbytes);
    if (placing && !m->embed.data) gpu_fill_random(gm->embed, m->embed.nbytes, FILL_BF16);   /* the benchmark's model */
    Linear head = gm->ranks > 1 ? linear_rows_view(&m->head, gm->vocab.first, gm->vocab.count) : m->head;
    gm_linear(&gm->head, &head);   /* a rank's share: its rows */
    gm->norm = gm_floats(m->norm, (size_t)E);
    gm->hc_head_fn = gm_floats(m->hc_head.fn, (size_t)HC * HC * E);
    gm->hc_head_base = gm_floats(m->hc_head.base, HC);
    gm->hc_head_scale = gm_floats(m->hc_head.scale, 1);
    gm->layers = xcalloc((size_t)L, sizeof(GpuLayer));
    gm->n_layers = L;
    size_t mix = (size_t)(2 + HC) * HC;
    for (int l = 0; l < L; l++) {
        const Layer *w = &m->layers[l];
        GpuLayer *g = &gm->layers[l];
        int ratio = c->compress_ratio[l], parts = c->attn_kind[l] == ATTN_CSA ? 2 : 1;
        if (!gm_linear_stack((GpuLinear *[]){&g->wq_a, &g->wkv}, (const Linear *[]){&w->wq_a, &w->wkv}, 2, &g->wq_a_wkv)) {
            gm_linear(&g->wq_a, &w->wq_a);
            gm_linear(&g->wkv, &w->wkv);
        }
        /* attention divided: the rank's groups of wq_b, the sinks and wo_a, and of wo_b (copied) */
        Layer attn = gm->attention_split ? layer_attention_share(c, w, gm->groups, !placing) : *w;
        gm_linear(&g->wq_b, &attn.wq_b);
        gm_linear(&g->wo_a, &attn.wo_a);
        gm_linear(&g->wo_b, &attn.wo_b);
        g->attn_sink = gm_floats(attn.attn_sink, (size_t)gm_heads(c));
        if (gm->attention_split) free((void *)attn.wo_b.weight), free((void *)attn.wo_b.scale);
        gm_linear(&g->gate, &w->gate);
        if (gm->ranks <= 1) {
            g->shared_paired = gm_linear_pair(&g->shared_w1, &g->shared_w3, &w->shared_w1, &w->shared_w3, &g->shared_gscales62);
            gm_linear(&g->shared_w2, &w->shared_w2);
        } else if (gm->shared.count) {   /* a rank's rows of w1 and w3, the same columns of w2 (copied) */
            Range s = gm->shared;
            Linear w1 = linear_rows_view(&w->shared_w1, s.first, s.count);
            Linear w3 = linear_rows_view(&w->shared_w3, s.first, s.count);
            Linear w2 = linear_cols_copy(&w->shared_w2, s.first, s.count, !placing);
            g->shared_paired = gm_linear_pair(&g->shared_w1, &g->shared_w3, &w1, &w3, &g->shared_gscales62);
            gm_linear(&g->shared_w2, &w2);
            free((void *)w2.weight);
            free((void *)w2.scale);
        }
        g->attn_norm = gm_floats(w->attn_norm, (size_t)E);
        g->ffn_norm = gm_floats(w->ffn_norm, (size_t)E);
        g->q_norm = gm_floats(w->q_norm, (size_t)c->q_lora_rank);
        g->kv_norm = gm_floats(w->kv_norm, (size_t)c->head_dim);
        g->hc_attn_fn = gm_floats(w->hc_attn.fn, mix * HC * E);
        g->hc_attn_base = gm_floats(w->hc_attn.base, mix);
        g->hc_attn_scale = gm_floats(w->hc_attn.scale, 3);
        g->hc_ffn_fn = gm_floats(w->hc_ffn.fn, mix * HC * E);
        g->hc_ffn_base = gm_floats(w->hc_ffn.base, mix);
        g->hc_ffn_scale = gm_floats(w->hc_ffn.scale, 3);
        /* CSA: both compressors and the indexer's weights_proj as one matrix (one decode GEMV) */
        int csa_stacked = c->attn_kind[l] == ATTN_CSA &&
            gm_linear_stack((GpuLinear *[]){&g->comp_wkv, &g->comp_wgate, &g->index_comp_wkv, &g->index_comp_wgate,
                                            &g->index_weights_proj},
                            (const Linear *[]){&w->compressor.wkv, &w->compressor.wgate, &w->index_compressor.wkv,
                                               &w->index_compressor.wgate, &w->index_weights_proj},
                            5, &g->csa_stack);
        if (ratio) {
            if (!csa_stacked)
                g->comp_paired = gm_linear_pair(&g->comp_wkv, &g->comp_wgate, &w->compressor.wkv, &w->compressor.wgate,
                                                &g->comp_gscales62);
            g->comp_ape = gm_floats(w->compressor.ape, (size_t)ratio * parts * c->head_dim);
            g->comp_norm = gm_floats(w->compressor.norm, (size_t)c->head_dim);
        }
        if (c->attn_kind[l] == ATTN_CSA) {
            gm_linear(&g->index_wq_b, &w->index_wq_b);
            if (!csa_stacked) {
                gm_linear(&g->index_weights_proj, &w->index_weights_proj);
                g->index_comp_paired = gm_linear_pair(&g->index_comp_wkv, &g->index_comp_wgate, &w->index_compressor.wkv,
                                                      &w->index_compressor.wgate, &g->index_comp_gscales62);
            }
            g->index_comp_ape = gm_floats(w->index_compressor.ape, (size_t)ratio * 2 * c->index_dim);
            g->index_comp_norm = gm_floats(w->index_compressor.norm, (size_t)c->index_dim);
        }
        if (is_hash_layer(c, l)) {
            size_t n = (size_t)c->vocab_size * c->topk;
            g->tid2eid = gm_reserve(n * sizeof(int32_t));
            if (placing) gm_write(g->tid2eid, w->tid2eid, n * sizeof(int32_t));
        } else {
            g->gate_bias = gm_floats(w->gate_bias, (size_t)X);
        }
        /* the routed experts; a host expert's pieces in a streaming slot: w1 and w3, then w2 */
        g->w13_paired = w->w1.format == w->w3.format && w->w1.scale_is_f32 == w->w3.scale_is_f32;
        GpuExperts w13[2];
        size_t piece;
        if (g->w13_paired) {
            piece = gpu_upload_experts(w13, (const ExpertStack *[]){&w->w1, &w->w3}, 2, l, X, 0);
            g->w1 = w13[0];
            g->w3 = w13[1];
            g->stream[g->stream_pieces++] = (StreamPiece){0, 0, piece, g->w1.host_table};
        } else {
            piece = gpu_upload_experts(&g->w1, (const ExpertStack *[]){&w->w1}, 1, l, X, 0);
            g->stream[g->stream_pieces++] = (StreamPiece){0, 0, piece, g->w1.host_table};
            size_t w3 = gpu_upload_experts(&g->w3, (const ExpertStack *[]){&w->w3}, 1, l, X, piece);
            g->stream[g->stream_pieces++] = (StreamPiece){0, piece, w3, g->w3.host_table};
            piece += w3;
        }
        size_t w2 = gpu_upload_experts(&g->w2, (const ExpertStack *[]){&w->w2}, 1, l, X, piece);
        g->stream[g->stream_pieces++] = (StreamPiece){1, piece, w2, g->w2.host_table};
        if (placing && gm->ranks > 1)   /* this host's ranks, one after the other */
            progress("uploading layers to the GPUs", (int)(gm - gpu_ranks) * L + l + 1, gm->ranks / gpu_hosts.count * L);
        else if (placing) progress("uploading layers", l + 1, L);
    }

    /* the state: the CPU's plan over a region of the arena, then the GPU's own scratch */
    char *state_arena = reserve(&gm->plan, state_bytes(c, T, C, all_logits), 1);
    gm->state.layers = xcalloc((size_t)L, sizeof(LayerCache));
    plan_state(&gm->state, c, T, C, all_logits, state_arena);
    if (placing) {
        float *inv_freq = xcalloc((size_t)c->rope_dim / 2 + 1, sizeof(float));
        rope_frequencies(c, 0, inv_freq);
        gm_write(DEV(gm->state.rope_main.inv_freq), inv_freq, (size_t)c->rope_dim / 2 * sizeof(float));
        rope_frequencies(c, 1, inv_freq);
        gm_write(DEV(gm->state.rope_compress.inv_freq), inv_freq, (size_t)c->rope_dim / 2 * sizeof(float));
        free(inv_freq);
    }
    gm->hc_slices = (E + HC_SLICE - 1) / HC_SLICE;
    gm->hc_partial = gm_reserve((size_t)T * mix * gm->hc_slices * sizeof(double));
    gm->hc_partial_ss = gm_reserve((size_t)T * gm->hc_slices * sizeof(double));
    int min_ratio = 0;
    for (int l = 0; l < L; l++)
        if (c->attn_kind[l] == ATTN_CSA && (!min_ratio || c->compress_ratio[l] < min_ratio)) min_ratio = c->compress_ratio[l];
    gm->score_stride = min_ratio ? C / min_ratio : 1;
    gm->index_scores = gm_reserve((size_t)T * gm->score_stride * sizeof(float));
    gm->selected = gm_reserve((size_t)T * (c->index_topk ? c->index_topk : 1) * sizeof(int32_t));
    gm->n_selected = gm_reserve((size_t)T * sizeof(int32_t));
    gm->active_experts = gm_reserve((size_t)X * sizeof(int32_t));
    gm->active_count = gm_reserve(sizeof(int32_t));
    int32_t identity[64];
    for (int k = 0; k < c->topk; k++) identity[k] = k;
    gm->slot_identity = gm_reserve((size_t)c->topk * sizeof(int32_t));
    if (placing) gm_write(gm->slot_identity, identity, (size_t)c->topk * sizeof(int32_t));
    gm->probs = gm_reserve((size_t)c->vocab_size * sizeof(float));
    gm->attn_splits = attention_splits(gm_heads(c));
    gm->attn_partial = gm_reserve((size_t)gm_heads(c) * gm->attn_splits * (c->head_dim + 4) * sizeof(float));
    gm->attn_counter = gm_reserve((size_t)gm_heads(c) * sizeof(uint32_t));
    gm->qr_kv = gm_reserve((size_t)(c->q_lora_rank + c->head_dim) * sizeof(float));
    gm->shared_act = gm_reserve(2 * (size_t)c->moe_inter * sizeof(float));
    gm->csa_out = gm_reserve((size_t)(4 * c->head_dim + 4 * c->index_dim + c->index_heads) * sizeof(float));
    gm->pos = gm_reserve(sizeof(int32_t));
    gm->tokens = gm_reserve((size_t)T * sizeof(int32_t));
    gm->rng = gm_reserve(sizeof(uint64_t));
    gm->out_token = gm_reserve(sizeof(int32_t));
    gm->recent = gm_reserve(REPEAT_LAST_N_MAX * sizeof(int32_t));
    gm->n_fed = gm_reserve(sizeof(uint32_t));
    gm->hits = gm_reserve((size_t)L * X * sizeof(uint32_t));
    if (gm->ranks > 1) {
        gm->rank_partial = gm_reserve((size_t)3 * T * E * sizeof(float));
        gm->rank_published = gm_reserve(sizeof(uint32_t));
    }
    if (gm->stream_slot_bytes) {
        gm->stream_staging = gm_reserve((size_t)c->topk * gm->stream_slot_bytes);
        gm->stream_control = gm_reserve(SC_BYTES);
        gm->stream_mail_dev = gm_reserve_host((size_t)L * sizeof(StreamMail));
        gm->stream_mail = host_address(gm->stream_mail_dev);   /* NULL while counting */
        if (gm->stream_mail) memset(gm->stream_mail, 0, (size_t)L * sizeof(StreamMail));
    }
}

/* What a load may take, and what is known of the experts' use. */
typedef struct {
    size_t device_cap;         /* --gpu-mem: bytes of device memory the model may take (0: what the GPU has free) */
    const uint64_t *profile;   /* [L, X]: --expert-profile's counts, or NULL */
    int gpus;                  /* --gpus: ranks to divide the model over, one a GPU (gpu_load_ranks; 0: the
                                  command line's load chooses, gpu_default_count; --bench's: 1) */
} GpuBudget;

/* The budget of the command line's load (main sets it: --gpu-mem, --expert-profile). */
static GpuBudget gpu_budget;

/* Where a load puts the model (gpu_plan_placement; the load line: gpu_placement_line). */
static struct {
    int host_experts, experts;   /* routed experts in host memory, of all L * X */
    double pcie_per_token;       /* bytes a decode step is expected to read from host memory */
    size_t device_bytes;         /* the device allocation: the layout's total in GPU_ALLOC_GRANULE pages */
    size_t host_bytes;           /* the page-locked host region: the embedding table and the host experts (0: none) */
} placed;

/* Bytes the kernel reports MemAvailable (/proc/meminfo), or SIZE_MAX when it cannot be read. */
static size_t host_memory_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    unsigned long long kib;
    size_t bytes = SIZE_MAX;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) bytes = (size_t)kib << 10;
    if (f) fclose(f);
    return bytes;
}

/* The limits on locking host memory, in words: RLIMIT_MEMLOCK and the cgroup's memory.max. */
static void host_lock_limits(char *out, size_t n) {
    struct rlimit r;
    char rlimit[64] = "unknown", cgroup[64] = "none";
    if (!getrlimit(RLIMIT_MEMLOCK, &r))
        snprintf(rlimit, sizeof rlimit, r.rlim_cur == RLIM_INFINITY ? "unlimited" : "%.1f GiB", r.rlim_cur / 1073741824.0);
    size_t size;
    char *max = read_file("/sys/fs/cgroup/memory.max", &size);
    if (max) snprintf(cgroup, sizeof cgroup, strncmp(max, "max", 3) ? "%.1f GiB" : "unlimited", strtod(max, NULL) / 1073741824.0);
    free(max);
    snprintf(out, n, "RLIMIT_MEMLOCK %s, cgroup memory.max %s", rlimit, cgroup);
}

/* Plan where model m goes for chunks of T tokens and a context of C, with free_bytes of device
   memory free and `budget` (NULL: no cap, no profile). It allocates and launches nothing (the
   layout is only counted), so it runs on any machine; gm must hold no loaded model. (The
   layout depends on the GPU a little: the decode attention's splits follow gpu->sm_count.)
   gpu_lay_out counts the bytes with everything on the device; when they do not fit the room
   (the free memory less GPU_HEADROOM, or the cap, in GPU_ALLOC_GRANULE pages), the embedding
   table and the experts that do not fit beside the rest and the K streaming slots go to host
   memory (place_experts) and the layout is counted again. Sets `placed` and gm->on_device ([L, X], NULL when everything
   fits on the device; the caller frees it); the rest of gm is left counted. Returns 0 with the
   refusal, naming the numbers, in why[n] when the layout is too large to address or the part
   other than the experts and the embedding table (with the slots when experts stream) does not fit. */
static int gpu_plan_placement(const Model *m, int T, int C, int all_logits, size_t free_bytes, const GpuBudget *budget,
                              char *why, size_t n) {
    const Config *c = &m->config;
    int L = c->n_layers, X = c->n_experts;
    gm_clear();
    memset(&placed, 0, sizeof placed);
    gpu_lay_out(m, T, C, all_logits);
    gm_free_host();
    if (gm->plan.total == SIZE_MAX) {
        snprintf(why, n, "the model's GPU layout for --ctx %d and --chunk %d is too large to address", C, T);
        return 0;
    }
    size_t all_device = gm->plan.total, cap = budget && budget->device_cap ? budget->device_cap : SIZE_MAX;
    size_t usable = free_bytes > GPU_HEADROOM ? free_bytes - GPU_HEADROOM : 0;
    size_t room = (cap < usable ? cap : usable) / GPU_ALLOC_GRANULE * GPU_ALLOC_GRANULE;
    const uint64_t *profile = budget ? budget->profile : NULL;
    uint8_t *on_device = NULL;
    placed.experts = L * X;
    if (all_device > room && gm->ranks > 1) {   /* a rank's share is not divided again */
        snprintf(why, n, "rank %d's share of the model (routed experts %d to %d) needs %.2f GiB of GPU memory, and %s "
                 "%.2f GiB", gm->rank, gm->experts.first, gm->experts.first + gm->experts.count - 1,
                 all_device / 1073741824.0, cap < free_bytes ? "--gpu-mem allows" : "the GPU has free", room / 1073741824.0);
        return 0;
    }
    if (all_device > room) {
        size_t *device_bytes = xcalloc((size_t)L, sizeof(size_t)), *read_bytes = xcalloc((size_t)L, sizeof(size_t));
        size_t experts = 0, embed = state_aligned(m->embed.nbytes);
        for (int l = 0; l < L; l++) {
            expert_bytes(&m->layers[l], &device_bytes[l], &read_bytes[l]);
            experts += (size_t)X * device_bytes[l];
        }
        /* the rest, and the streaming slots unless every expert fits beside it */
        size_t rest = all_device - experts - embed, stream = stream_device_bytes(m);
        size_t need = rest + (rest <= room && experts <= room - rest ? 0 : stream);
        if (need > room) {
            snprintf(why, n, "the model's part other than its routed experts and its embedding table (the state for "
                     "--ctx %d and --chunk %d included, and %.2f GiB of slots to stream the host experts through) needs "
                     "%.2f GiB of GPU memory, and %s %.2f GiB", C, T, stream / 1073741824.0, need / 1073741824.0,
                     cap < free_bytes ? "--gpu-mem allows" : "the GPU has free", room / 1073741824.0);
            free(device_bytes);
            free(read_bytes);
            return 0;
        }
        on_device = xcalloc((size_t)L * X, 1);
        place_experts(L, X, device_bytes, profile, room - need, on_device);
        for (size_t i = 0; i < (size_t)L * X; i++) placed.host_experts += !on_device[i];
        placed.pcie_per_token = host_bytes_per_token(L, X, c->topk, read_bytes, profile, on_device) +
                                embed_row_bytes(m);   /* and the token's embedding row */
        free(device_bytes);
        free(read_bytes);
        gm_clear();   /* counted again, the placed experts and the embedding on the host */
        gm->on_device = on_device;
        gpu_lay_out(m, T, C, all_logits);
        gm_free_host();
    }
    placed.device_bytes = (gm->plan.total + GPU_ALLOC_GRANULE - 1) / GPU_ALLOC_GRANULE * GPU_ALLOC_GRANULE;
    placed.host_bytes = gm->host_plan.total;
    return 1;
}

/* Upload model m and lay out the state for chunks of T tokens and a context of C on the GPU,
   within `budget` (NULL: all the free device memory, no profile), where gpu_plan_placement
   says. Refused before anything is allocated, naming the numbers: what gpu_plan_placement
   refuses, host memory that is not there or cannot be locked. Then one device allocation,
   zeroed, and (if any) one host allocation, page-locked and mapped, are laid out and filled.
   Returns the seconds the upload took. */
static double gpu_load_model(const Model *m, int T, int C, int all_logits, const GpuBudget *budget) {
    const Config *c = &m->config;
    int L = c->n_layers, X = c->n_experts;
    char why[256];
    size_t free_bytes, total_bytes;
    gpu_check_limits(c);
    CU_CHECK(cu.cuMemGetInfo(&free_bytes, &total_bytes));
    if (!gpu_plan_placement(m, T, C, all_logits, free_bytes, budget, why, sizeof why)) fatal("%s", why);
    const uint8_t *on_device = gm->on_device;
    size_t bytes = placed.device_bytes, host_bytes = placed.host_bytes;
    if (!gpu_fits(bytes, why, sizeof why)) fatal("the model %s", why);
    double start = now_seconds();
    gm_clear();
    gm->on_device = on_device;
    if (host_bytes) {
        size_t available = host_memory_available();
        if (host_bytes > available)
            fatal("the embedding table and the %d routed experts that do not fit the GPU need %.2f GiB of host memory, "
                  "and the host has %.2f GiB available (MemAvailable)", placed.host_experts, host_bytes / 1073741824.0, available / 1073741824.0);
        CUresult r = cu.cuMemHostAlloc((void **)&host_map.base, host_bytes, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP);
        if (r) {
            char limits[160];
            host_lock_limits(limits, sizeof limits);
            fatal("cannot lock %.2f GiB of host memory for the embedding table and the %d routed experts that do not "
                  "fit the GPU (%s; driver error %d)", host_bytes / 1073741824.0, placed.host_experts, limits, r);
        }
        CU_CHECK(cu.cuMemHostGetDevicePointer(&host_map.dev, host_map.base, 0));
        host_map.bytes = host_bytes;
        gm->host_plan.base = host_map.base;
    }
    gm->arena = gpu_alloc(bytes);
    gm->arena_bytes = bytes;
    CU_CHECK(cu.cuMemsetD8Async(gm->arena, 0, bytes, gpu->stream));   /* the state at position 0, the counters 0 */
    gm->plan.base = (char *)(uintptr_t)gm->arena;
    gpu_staging_open();
    gpu_lay_out(m, T, C, all_logits);
    gpu_staging_close();
    stream_start(c);
    gm->host_logits = xcalloc((size_t)(all_logits ? T : 1) * m->config.vocab_size, sizeof(float));
    gm->prefill_hits = xcalloc((size_t)L * X, sizeof(uint64_t));
    return now_seconds() - start;
}

/* Where the last load put the model, in one line: device GiB, host GiB and which experts, the
   bytes a token is expected to read over PCIe. */
static void gpu_placement_line(char *out, size_t n) {
    if (gpu_ranks[0].ranks > 1) {
        size_t most = 0;
        for (int r = 0; r < gpu_rank_count; r++) most = gpu_ranks[r].arena_bytes > most ? gpu_ranks[r].arena_bytes : most;
        snprintf(out, n, "divided over %d GPUs, at most %.2f GiB each%s", gpu_ranks[0].ranks, most / 1073741824.0,
                 gpu_hosts.count > 1 ? " on this host" : "");
        return;
    }
    if (!host_map.bytes) {
        snprintf(out, n, "%.2f GiB on the GPU (everything)", gm->arena_bytes / 1073741824.0);
        return;
    }
    char experts[64] = "";
    if (placed.host_experts) snprintf(experts, sizeof experts, " and %d of the %d routed experts", placed.host_experts, placed.experts);
    snprintf(out, n, "%.2f GiB on the GPU (everything but the embedding table%s), %.2f GiB of %s in page-locked host "
             "memory: %.2f GB a token over PCIe expected", gm->arena_bytes / 1073741824.0, experts,
             host_map.bytes / 1073741824.0, placed.host_experts ? "those" : "it", placed.pcie_per_token / 1e9);
}

/* The experts' hits [L, X] of this load so far: decode's (counted on the GPU) and prefill's. */
static void gpu_expert_hits(uint64_t *hits, int L, int X) {
    size_t n = (size_t)L * X;
    uint32_t *decode = xcalloc(n, sizeof *decode);
    gpu_download(decode, gm->hits, n * sizeof *decode);
    for (size_t i = 0; i < n; i++) hits[i] = gm->prefill_hits[i] + decode[i];
    free(decode);
}

/* Upload model m divided as `plan` says (split_plan with peer access) over its plan->n ranks,
   rank r on GPU r modulo the GPUs opened (one GPU: every rank on it, the tests' way to run the
   several GPUs' code), each holding its share of the routed experts of every layer, of the
   head's rows (128-row blocks), of the shared expert's intermediate rows (blocks of 128: w1's
   and w3's rows, w2's columns; a rank may get none) and, where the plan divides attention, of
   its output groups (layer_attention_share), and a whole copy of the rest, each as
   gpu_load_model loads a model (its refusals, and a rank's share that does not fit). Several
   hosts: this host's ranks alone (gpu_hosts.gpus from host index * that), as gpu_ranks[0 ..
   gpu_hosts.gpus). Leaves rank 0 current (its GPU's). Returns the seconds the uploads took. */
static double gpu_load_ranks(const Model *m, int T, int C, int all_logits, const GpuBudget *budget, const SplitPlan *plan) {
    double seconds = 0;
    int ranks = plan->n, blocks = (m->config.vocab_size + SPLIT_BLOCK - 1) / SPLIT_BLOCK;
    int local = gpu_hosts.count > 1 ? gpu_hosts.gpus : ranks, first = gpu_hosts.index * gpu_hosts.gpus;
    if (!gpu_device_count) fatal("internal error: a model loaded onto no GPU");
    if (plan->pipeline) fatal("internal error: a split by layers loaded (the GPU path divides within layers only)");
    if (gpu_hosts.count > 1 && ranks != gpu_hosts.count * gpu_hosts.gpus) fatal("internal error: a plan not of every host's GPUs");
    if (local > GPUS_MAX) fatal("internal error: %d ranks on one host (at most %d)", local, GPUS_MAX);
    if (ranks > blocks)
        fatal("a model of %d blocks of %d head rows divided over %d GPUs: at most one a block", blocks, SPLIT_BLOCK, ranks);
    for (int r = 0; r < local; r++) {
        const RankShare *share = &plan->rank[first + r];
        gpu_ranks[r].device = r % gpu_device_count;
        gpu_use_rank(r);
        gm->rank = first + r, gm->ranks = ranks, gm->experts = share->experts, gm->vocab = share->vocab;
        gm->shared = share->shared, gm->groups = share->groups, gm->attention_split = plan->attention_split;
        seconds += gpu_load_model(m, T, C, all_logits, budget);
    }
    gpu_rank_count = local;
    gpu_split = *plan;
    gpu_use_rank(0);
    return seconds;
}

/* Free everything gpu_load_model allocated for the current rank. */
static void gpu_unload_rank(void) {
    stream_stop();
    if (gm->decode_graph) CU_CHECK(cu.cuGraphExecDestroy(gm->decode_graph));
    gpu_free(gm->arena);
    if (host_map.base) CU_CHECK(cu.cuMemFreeHost(host_map.base));
    memset(&host_map, 0, sizeof host_map);
    gm_free_host();
    free(gm->host_logits);
    free(gm->prefill_hits);
    free((void *)gm->on_device);
    memset(gm, 0, sizeof *gm);
}

/* Free every rank's model (gpu_load_model's or gpu_load_ranks'). */
static void gpu_unload(void) {
    for (int r = gpu_rank_count - 1; r >= 0; r--) gpu_use_rank(r), gpu_unload_rank();   /* leaves rank 0 current */
    gpu_rank_count = 1;
    sums_by_nccl = 0;
}

/* -------------------------------------------------------------------------------- launches */

/* y[t*y_stride + r] = factor * sum_c W[row0 + r, c] x[t*x_stride + c] for r < nrows, t < T, on
   the tensor cores (kernels.ptx gemm_prefill), W in the GEMV layout. Mirrors linear_rows. */
static void gpu_gemm(const GpuLinear *w, float factor, int row0, int nrows, CUdeviceptr x, int x_stride, CUdeviceptr y,
                     int y_stride, int T) {
    GemmPrefillArgs args = {
        .y = y, .x = x, .weight = w->weight, .scale = w->scale, .global_scale = factor, .format = w->format,
        .scale_is_f32 = w->format == FMT_FP8, .T = (uint32_t)T, .cols = (uint32_t)w->cols, .row0 = (uint32_t)row0,
        .nrows = (uint32_t)nrows, .x_stride = (uint32_t)x_stride, .y_stride = (uint32_t)y_stride, .accumulate = 0,
        .row_bytes = w->row_bytes};
    LAUNCH(K_GEMM, (unsigned)(nrows + 63) / 64, (unsigned)(T + 63) / 64, 1, 128, 0, args);
}

/* Rows row0 .. row0 + nrows of W applied to T rows of x: the GEMV for a whole matrix and one
   token (decode), the GEMM otherwise. Mirrors linear_rows. */
static void gpu_linear_rows(const GpuLinear *g, int row0, int nrows, CUdeviceptr x, int x_stride, CUdeviceptr y,
                            int y_stride, int T) {
    if (T == 1 && row0 == 0 && nrows == g->rows) gpu_gemv(g, x, y);
    else gpu_gemm(g, gpu_gemm_factor(g), row0, nrows, x, x_stride, y, y_stride, T);
}

/* Append ya = A x and yb = B x (one token) to parts[n]: one part of two slots for a pair
   uploaded side by side (gm_linear_pair; yb must lie after ya), described by *plan, else two
   parts. Returns the new count. */
static int gemv_add_pair(GemvPart *parts, int n, GemvPlan *plan, const GpuLinear *a, const GpuLinear *b, int paired,
                         CUdeviceptr gscales62, CUdeviceptr x, CUdeviceptr ya, CUdeviceptr yb) {
    if (paired && yb > ya) {
        *plan = (GemvPlan){.count = 2, .y_stride = (int)((yb - ya) / 4), .stride_w = b->weight - a->weight,
                           .stride_s = b->scale - a->scale, .gscales62 = a->format == FMT_NVFP4 ? gscales62 : 0,
                           .list_len = 2};
        parts[n++] = (GemvPart){a, x, ya, plan};
    } else {
        parts[n++] = (GemvPart){a, x, ya, NULL};
        parts[n++] = (GemvPart){b, x, yb, NULL};
    }
    return n;
}

/* y[T, rows] = x[T, cols] W^T. Mirrors linear. */
static void gpu_linear(const GpuLinear *g, CUdeviceptr x, CUdeviceptr y, int T) {
    gpu_linear_rows(g, 0, g->rows, x, g->cols, y, g->rows, T);
}

/* Rows x[T, n_heads, dim] in place: RMSNorm (when norm; weight 0 = unweighted), then RoPE of the
   last rope_dim dims at position *pos + t (rope_dim 0: none), then a copy into `ring` (0: none)
   at row (*pos + t) % ring_rows. Mirrors rmsnorm + rope. */
static void gpu_row_norm_rope(CUdeviceptr x, int T, int n_heads, int dim, int norm, CUdeviceptr weight, float eps,
                              int rope_dim, const Rope *rope, CUdeviceptr ring, int ring_rows) {
    RowNormRopeArgs args = {
        .x = x, .n_heads = (uint32_t)n_heads, .dim = (uint32_t)dim, .do_norm = (uint32_t)norm, .weight = weight,
        .eps = eps, .rope_dim = (uint32_t)rope_dim, .inv_freq = rope ? DEV(rope->inv_freq) : 0,
        .rope_scale = rope ? rope->scale : 1, .pos0_ptr = gm->pos, .ring = ring, .ring_rows = (uint32_t)ring_rows};
    LAUNCH(K_ROW_NORM_ROPE, (unsigned)n_heads, (unsigned)T, 1, 128, 0, args);
}

/* One compressor's part of a compressor_update launch: the chunk's projections kv, gate and
   the compressor's weights and cache. */
static CompressorArgs compressor_args(CompressorCache *s, CUdeviceptr ape, CUdeviceptr norm, int parts, int d,
                                      CUdeviceptr kv, CUdeviceptr gate) {
    return (CompressorArgs){kv, gate, ape, norm, DEV(s->pending_kv), DEV(s->pending_gate), DEV(s->prev_kv),
                            DEV(s->prev_gate), DEV(s->entries), (uint32_t)parts, (uint32_t)d};
}

/* Feed the chunk's projections into n (1 or 2) compressors of one ratio, one block each,
   emitting entries as windows close. Mirrors compressor_feed. */
static void gpu_compressors(const Config *c, const CompressorArgs *comp, int n, int ratio, int T) {
    const Rope *r = &gm->state.rope_compress;
    CompressorUpdateArgs args = {
        .comp = {comp[0], n > 1 ? comp[1] : comp[0]}, .T = (uint32_t)T, .ratio = (uint32_t)ratio, .eps = c->rms_eps,
        .rope_dim = (uint32_t)c->rope_dim, .inv_freq = DEV(r->inv_freq), .rope_scale = r->scale, .pos0_ptr = gm->pos};
    LAUNCH(K_COMPRESSOR, (unsigned)n, 1, 1, 256, 0, args);
}

/* Bytes of the scales of `rows` rows of g in the GEMV layout (FP8: rows a multiple of 128). */
static size_t gpu_scale_rows_bytes(const GpuLinear *g, int rows) {
    size_t n = (size_t)rows, row_bytes = g->row_bytes;
    return g->format == FMT_NVFP4 ? n * (row_bytes / 8) : g->format == FMT_MXFP4 ? n * (row_bytes / 16)
         : g->format == FMT_FP8 ? n / 128 * (row_bytes / 128) * 4 : 0;
}

/* The RoPE of layer l's queries and keys: "main" for sliding-window layers, "compress" else. */
static const Rope *gpu_layer_rope(const Config *c, int l) {
    return c->attn_kind[l] == ATTN_SLIDING ? &gm->state.rope_main : &gm->state.rope_compress;
}

/* ------------------------------------------------------------- stages both paths launch */

/* The embedding of tokens[0..T) into the streams h, and the first site's partial mixing sums.
   Mirrors forward()'s embedding and the sums of hc_mix. */
static void gpu_embed(const Config *c, int T) {
    Scratch *w = &gm->state.scratch;
    int E = c->hidden_size, mix = (2 + HC) * HC;
    EmbedStreamsArgs embed = {.h = DEV(w->h), .embed = gm->embed, .tokens = gm->tokens, .E = (uint32_t)E,
                              .step = T == 1 && gm->stream_slot_bytes ? gm->stream_control + SC_STEP : 0};   /* a decode step */
    LAUNCH(K_EMBED, (unsigned)(E + 255) / 256, (unsigned)T, 1, 256, 0, embed);
    HcMixPartialArgs sums = {.partial = gm->hc_partial, .partial_ss = gm->hc_partial_ss, .h = DEV(w->h),
                             .fn = gm->layers[0].hc_attn_fn, .E = (uint32_t)E, .rows = (uint32_t)mix, .slice = HC_SLICE};
    LAUNCH(K_HC_MIX, (unsigned)gm->hc_slices, (unsigned)T, 1, (unsigned)(8 * mix), 0, sums);
}

/* CSA: the indexer's scores of the compressed entries for each of the T queries (the kernel
   rotates index_q as it stages it, weighs the heads by index_w [T, NI]), then each query's
   top-k entries into selected / n_selected. Mirrors select_entries. */
static void gpu_indexer(const Config *c, int l, int T, CUdeviceptr index_w) {
    Scratch *w = &gm->state.scratch;
    const LayerCache *ls = &gm->state.layers[l];
    const Rope *r = &gm->state.rope_compress;
    int NI = c->index_heads, DI = c->index_dim, R = c->rope_dim, ratio = c->compress_ratio[l];
    unsigned smem = (unsigned)(NI * (DI + 4) * 4 + NI * 4 + R * 4), tiles = (unsigned)(gm->score_stride + 31) / 32;
    IndexerScoresArgs scores = {
        .scores = gm->index_scores, .score_stride = (uint32_t)gm->score_stride, .index_q = DEV(w->index_q),
        .index_w = index_w, .index_keys = DEV(ls->index_comp.entries), .NI = (uint32_t)NI, .DI = (uint32_t)DI,
        .ratio = (uint32_t)ratio, .pos0_ptr = gm->pos, .rope_dim = (uint32_t)R, .inv_freq = DEV(r->inv_freq),
        .rope_scale = r->scale};
    LAUNCH(K_INDEXER_SCORES, tiles < 792 ? tiles : 792, (unsigned)T, 1, 256, smem, scores);
    TopKSelectArgs top = {.scores = gm->index_scores, .score_stride = (uint32_t)gm->score_stride, .selected = gm->selected,
                          .sel_stride = (uint32_t)c->index_topk, .n_selected = gm->n_selected,
                          .k = (uint32_t)c->index_topk, .ratio = (uint32_t)ratio, .pos0_ptr = gm->pos};
    LAUNCH(K_TOP_K, (unsigned)T, 1, 1, 1024, 0, top);
}

/* Each of the T queries q [T, H, D] (normalized and rotated by the kernel; H: the rank's heads,
   gm_heads) over its window and compressed entries, with the sink, into attn [T, H, D]. `new_key` is decode's kv [D] (the
   kernel normalizes, rotates and writes it into the ring first, and a head's keys are split
   over gm->attn_splits blocks for CSA/HCA layers); 0 in prefill, where the ring holds the
   chunk's keys already. Mirrors attention()'s loop over queries (attend). */
static void gpu_attend(const Config *c, int l, int T, CUdeviceptr new_key) {
    const GpuLayer *g = &gm->layers[l];
    Scratch *w = &gm->state.scratch;
    LayerCache *ls = &gm->state.layers[l];
    const Rope *rope_l = gpu_layer_rope(c, l);
    int H = gm_heads(c), D = c->head_dim, ratio = c->compress_ratio[l];
    int mode = c->attn_kind[l] == ATTN_CSA ? 1 : c->attn_kind[l] == ATTN_HCA ? 2 : 0;
    int splits = new_key && mode ? gm->attn_splits : 1;
    AttentionDecodeArgs args = {
        .q = DEV(w->q), .attn = DEV(w->attn), .H = (uint32_t)H, .D = (uint32_t)D, .sink = g->attn_sink,
        .ring = DEV(ls->keys), .ring_rows = (uint32_t)ring_rows(&gm->state, c), .window = (uint32_t)c->sliding_window,
        .entries = DEV(ls->comp.entries), .comp_mode = (uint32_t)mode, .selected = gm->selected,
        .n_selected = gm->n_selected, .sel_stride = (uint32_t)c->index_topk, .ratio = (uint32_t)(ratio ? ratio : 1),
        .rope_dim = (uint32_t)c->rope_dim, .inv_freq = DEV(rope_l->inv_freq), .rope_scale = rope_l->scale,
        .pos0_ptr = gm->pos, .eps = c->rms_eps, .kv = new_key, .kv_norm = g->kv_norm, .partial = gm->attn_partial,
        .counter = gm->attn_counter};
    LAUNCH(K_ATTENTION, (unsigned)H, (unsigned)T, (unsigned)splits, 512, 0, args);
}

/* The grouped output projection: attn [T, H * D] -> grouped [T, G * O] by wo_a, group by group
   (one token: the groups as the slots of one GEMV where wo_a's layout allows), then wo_b ->
   block_out [T, E] (the rank's part when attention is divided: its H heads, G groups). Mirrors
   the end of attention(). */
static void gpu_output_projection(const Config *c, int l, int T) {
    const GpuLayer *g = &gm->layers[l];
    Scratch *w = &gm->state.scratch;
    int H = gm_heads(c), D = c->head_dim, G = gm_groups(c), O = c->o_lora_rank, group_in = H * D / G;
    if (T == 1 && G <= GEMV_MAX_SLOTS && (g->wo_a.format != FMT_FP8 || O % 128 == 0)) {
        GpuLinear group = g->wo_a;
        group.rows = O;
        GemvPlan slots = {.count = G, .x_stride = group_in, .y_stride = O, .stride_w = (size_t)O * g->wo_a.row_bytes,
                          .stride_s = gpu_scale_rows_bytes(&g->wo_a, O), .list_len = G};
        gpu_gemv_plan(&group, DEV(w->attn), DEV(w->grouped), &slots);
    } else {
        for (int grp = 0; grp < G; grp++)
            gpu_linear_rows(&g->wo_a, grp * O, O, DEV(w->attn) + (size_t)grp * group_in * 4, H * D,
                            DEV(w->grouped) + (size_t)grp * O * 4, G * O, T);
    }
    gpu_linear(&g->wo_b, DEV(w->grouped), DEV(w->block_out), T);
}

/* Blocks of 256 threads for a grid-stride loop over n elements: one an element, at most 4 an SM. */
static unsigned gpu_stride_grid(size_t n) {
    size_t blocks = (n + 255) / 256, most = (size_t)gpu->sm_count * 4;
    return (unsigned)(blocks < most ? blocks : most);
}

/* gate[n] = silu(min(gate, limit)) * clamp(up, -limit, limit). Mirrors expert_ffn's activation. */
static void gpu_swiglu(CUdeviceptr gate, CUdeviceptr up, size_t n, float limit) {
    SwigluArgs args = {.gate = gate, .up = up, .n = (uint32_t)n, .limit = limit};
    LAUNCH(K_SWIGLU, gpu_stride_grid(n), 1, 1, 256, 0, args);
}

/* h' = hc_post of the current site (with the MoE combine when `moe`), then the next site's
   partial mixing sums: fn/rows of the next site (the next layer's attention, the ffn of this
   layer, or the head). Mirrors hc_post (+ moe's combine) and the sums of hc_mix. */
static void gpu_hc_post_mix(int T, CUdeviceptr fn, int rows, int moe, int K, const Config *c) {
    Scratch *w = &gm->state.scratch;
    HcPostMixArgs args = {
        .partial = gm->hc_partial, .partial_ss = gm->hc_partial_ss, .h = DEV(w->h), .fn = fn,
        .E = (uint32_t)c->hidden_size, .rows = (uint32_t)rows, .slice = HC_SLICE, .block_out = DEV(w->block_out),
        .post = DEV(w->post), .comb = DEV(w->comb), .expert_out = moe ? DEV(w->expert_out) : 0,
        .route_weight = DEV(w->route_weight), .slot_row = T == 1 ? gm->slot_identity : DEV(w->slot_row), .K = (uint32_t)K};
    LAUNCH(K_HC_POST_MIX, (unsigned)gm->hc_slices, (unsigned)T, 1, (unsigned)(8 * rows), 0, args);
}

/* The mixing after layer l's attention (into the sums of its MoE site) or after its MoE (into
   the next layer's attention site, or the head's after the last layer). */
static void gpu_after_block(const Config *c, int l, int T, int moe) {
    int mix = (2 + HC) * HC, combine = moe && gm->ranks <= 1;   /* a rank's MoE output is whole already (gpu_rank_sum) */
    if (!moe) gpu_hc_post_mix(T, gm->layers[l].hc_ffn_fn, mix, 0, c->topk, c);
    else if (l + 1 < c->n_layers) gpu_hc_post_mix(T, gm->layers[l + 1].hc_attn_fn, mix, combine, c->topk, c);
    else gpu_hc_post_mix(T, gm->hc_head_fn, HC, combine, c->topk, c);
}

/* ------------------------- several GPUs: the sums of the divided sub-blocks, the logits gather */
/* A rank holds a share of the routed experts and of the shared expert's rows: after layer l's
   MoE each rank publishes its part of the output (gpu_rank_partial: the combine over its own
   slots), then each sums every rank's part in rank order into its block_out (gpu_rank_sum), so
   that every rank goes on with the same bits. Where attention is divided too (by output
   groups), its block_out is a rank's part in the same way, published and summed before the
   attention site's mixing: two sums a layer. A rank also holds a share of the head's rows:
   after the head each rank publishes its columns of the logits (gpu_rank_publish) and copies
   the others' in (gpu_rank_gather). Every rank's part is launched before any sum or gather:
   on one GPU the ranks take turns on one stream; on several, each sum waits for the others'
   counts. The parts rotate through three buffers (a step's sum s: buffer s % 2, the last sum of
   an odd count the third): a rank writes a buffer again only after every rank has published
   the part between, i.e. has finished summing the part before it. */

/* The place of layer l's attention sum (moe 0) or MoE sum (moe 1) among a step's sums: the
   MoE's alone, or attention's and the MoE's of every layer when attention is divided. */
static int rank_sum_index(int l, int moe) { return gm->attention_split ? 2 * l + moe : l; }

/* The part buffer of rank r's sum s (rank_sum_index): f32 [T, E] in its rank_partial [3, T, E]. */
static CUdeviceptr rank_part_buffer(const Config *c, int r, int sum) {
    int sums = c->n_layers * (1 + gpu_ranks[r].attention_split), buffer = sums % 2 && sum == sums - 1 ? 2 : sum % 2;
    return gpu_ranks[r].rank_partial + (size_t)buffer * gpu_ranks[r].state.max_tokens * c->hidden_size * sizeof(float);
}

/* The current rank's part of layer l's MoE output (moe 1: its share of the shared expert and
   the combine over the slots of its experts) or attention output (moe 0: block_out, its
   groups') for the chunk's T tokens, published. */
static void gpu_rank_partial(const Config *c, int l, int T, int moe) {
    Scratch *w = &gm->state.scratch;
    RankPartialArgs args = {
        .partial = rank_part_buffer(c, (int)(gm - gpu_ranks), rank_sum_index(l, moe)), .block_out = DEV(w->block_out),
        .expert_out = DEV(w->expert_out), .route_weight = DEV(w->route_weight),
        .slot_row = T == 1 ? gm->slot_identity : DEV(w->slot_row), .chosen = DEV(w->chosen),
        .published = gm->rank_published, .E = (uint32_t)c->hidden_size, .K = moe ? (uint32_t)c->topk : 0,
        .first = (uint32_t)gm->experts.first, .end = (uint32_t)(gm->experts.first + gm->experts.count),
        .shared = !moe || gm->layers[l].shared_w1.rows > 0};
    LAUNCH(K_RANK_PARTIAL, (unsigned)(c->hidden_size + 255) / 256, (unsigned)T, 1, 256, 0, args);
}

/* Where the current rank's head writes: its columns of the logits [T, V] (all of them on one). */
static CUdeviceptr gpu_head_logits(void) {
    return DEV(gm->state.scratch.logits) + (gm->ranks > 1 ? (size_t)gm->vocab.first * sizeof(float) : 0);
}

/* The current rank's count advanced once its head is done (rank_gather waits for it). */
static void gpu_rank_publish(void) {
    RankPublishArgs args = {.published = gm->rank_published};
    LAUNCH(K_RANK_PUBLISH, 1, 1, 1, 32, 0, args);
}

/* Every rank's columns of the logits [T, V] copied into the current rank's (the head divided by
   rows: each rank computed its vocab range). */
static void gpu_rank_gather(const Config *c, int T) {
    if (gpu_hosts.count > 1 || !gpu_peer_access) fatal("internal error: a gather through peer memory without peer access");
    RankGatherArgs args = {.out = DEV(gm->state.scratch.logits), .ranks = (uint32_t)gm->ranks, .rank = (uint32_t)gm->rank,
                           .V = (uint32_t)c->vocab_size, .T = (uint32_t)T};
    for (int r = 0; r < gm->ranks; r++) {
        args.sources[r] = DEV(gpu_ranks[r].state.scratch.logits);
        args.published[r] = gpu_ranks[r].rank_published;
        args.bounds[r] = (uint32_t)gpu_ranks[r].vocab.first;
    }
    args.bounds[gm->ranks] = (uint32_t)c->vocab_size;
    LAUNCH(K_RANK_GATHER, gpu_stride_grid((size_t)T * c->vocab_size), 1, 1, 256, 0, args);
}

/* Every rank's part of layer l's MoE output (moe 1) or attention output (moe 0) summed into the
   current rank's block_out [T, E]. */
static void gpu_rank_sum(const Config *c, int l, int T, int moe) {
    if (gpu_hosts.count > 1 || !gpu_peer_access) fatal("internal error: a sum through peer memory without peer access");
    RankSumArgs args = {.out = DEV(gm->state.scratch.block_out), .ranks = (uint32_t)gm->ranks, .rank = (uint32_t)gm->rank,
                        .n = (uint32_t)(T * c->hidden_size)};
    for (int r = 0; r < gm->ranks; r++) {
        args.partials[r] = rank_part_buffer(c, r, rank_sum_index(l, moe));
        args.published[r] = gpu_ranks[r].rank_published;
    }
    LAUNCH(K_RANK_SUM, gpu_stride_grid(args.n), 1, 1, 256, 0, args);
}

/* Every rank's part of layer l's MoE output (moe 1) or attention output (moe 0) summed into
   every rank's block_out [T, E], after every rank's part was launched: rank_sum on each rank,
   or one NCCL all-reduce over the GPUs (one rank a GPU), which gives every rank the same bits. */
static void gpu_rank_sums(const Config *c, int l, int T, int moe) {
    if (!sums_by_nccl) {
        for (int r = 0; r < gpu_rank_count; r++) gpu_use_rank(r), gpu_rank_sum(c, l, T, moe);
        return;
    }
    if (gpu_rank_count != gpu_device_count) fatal("internal error: NCCL's sums need one rank a GPU");
    NCCL_CHECK(nccl.ncclGroupStart());
    for (int r = 0; r < gpu_rank_count; r++) {
        gpu_use_rank(r);
        CUdeviceptr part = rank_part_buffer(c, r, rank_sum_index(l, moe)), out = DEV(gm->state.scratch.block_out);
        NCCL_CHECK(nccl.ncclAllReduce((const void *)(uintptr_t)part, (void *)(uintptr_t)out, (size_t)T * c->hidden_size,
                                      NCCL_FLOAT32, NCCL_SUM, nccl_comms[gm->device], gpu->stream));
        gpu_launches++;   /* its kernel, as the step's kernels are counted */
    }
    NCCL_CHECK(nccl.ncclGroupEnd());
}

/* Every rank's columns of the logits [rows, V] gathered into every rank's: through peer memory
   (each rank's count advanced, rank_publish, then rank_gather on each), or where NCCL alone joins
   the GPUs (several hosts, no peer access), each rank's columns of each row broadcast from it. */
static void gpu_gather_logits(const Config *c, int rows) {
    if (gpu_hosts.count == 1 && gpu_peer_access) {
        for (int r = 0; r < gpu_rank_count; r++) gpu_use_rank(r), gpu_rank_publish();
        for (int r = 0; r < gpu_rank_count; r++) gpu_use_rank(r), gpu_rank_gather(c, rows);
        return;
    }
    NCCL_CHECK(nccl.ncclGroupStart());
    for (int r = 0; r < gpu_rank_count; r++) {
        gpu_use_rank(r);
        for (int t = 0; t < rows; t++)
            for (int q = 0; q < gpu_split.n; q++) {
                size_t at = (size_t)t * c->vocab_size + (size_t)gpu_split.rank[q].vocab.first;
                CUdeviceptr columns = DEV(gm->state.scratch.logits) + at * sizeof(float);
                NCCL_CHECK(nccl.ncclBroadcast((const void *)(uintptr_t)columns, (void *)(uintptr_t)columns,
                                              (size_t)gpu_split.rank[q].vocab.count, NCCL_FLOAT32, q, nccl_comms[gm->device],
                                              gpu->stream));
            }
        gpu_launches++;   /* its kernel, as the step's kernels are counted */
    }
    NCCL_CHECK(nccl.ncclGroupEnd());
}

/* ===================================================================== GPU: prefill a chunk */
/* A chunk of T > 1 tokens, section by section as forward() computes it: every linear layer a
   tensor-core GEMM over the chunk's rows, each site's x made by an hc_finish launch, the MoE's
   experts launched one by one over the slots the host reads back. */

/* x[n, E] = RMSNorm(collapse of the streams) for n tokens from t0, with post and comb for a
   block site (rows 24) or the head's pre only (rows 4). Mirrors hc_pre / hc_head + rmsnorm. */
static void gpu_hc_finish(const Config *c, int n, int t0, CUdeviceptr base, CUdeviceptr scale, CUdeviceptr norm, int rows) {
    Scratch *w = &gm->state.scratch;
    HcFinishArgs args = {
        .x = DEV(w->x), .post_out = rows == 24 ? DEV(w->post) : 0, .comb_out = rows == 24 ? DEV(w->comb) : 0,
        .h = DEV(w->h), .partial = gm->hc_partial, .partial_ss = gm->hc_partial_ss, .base = base, .scale = scale,
        .norm_weight = norm, .E = (uint32_t)c->hidden_size, .rows = (uint32_t)rows, .S = (uint32_t)gm->hc_slices,
        .t0 = (uint32_t)t0, .hc_eps = c->hc_eps, .rms_eps = c->rms_eps, .sinkhorn_iters = (uint32_t)c->sinkhorn_iters};
    LAUNCH(K_HC_FINISH, (unsigned)n, 1, 1, 1024, 0, args);
}

/* Attention sub-block of layer l for the chunk: x[T, E] (normed) -> block_out[T, E]. Mirrors
   attention(): its projections (qr normalized in place; kv normalized, rotated and copied into
   the ring; the queries' per-head norm and RoPE happen in attention_decode), compress_and_index
   (the indexer's projections reuse the compressor's scratch once its entries are made), the
   queries, the output projection. */
static void gpu_attention_prefill(const Model *m, int l, int T) {
    const Config *c = &m->config;
    const GpuLayer *g = &gm->layers[l];
    Scratch *w = &gm->state.scratch;
    LayerCache *ls = &gm->state.layers[l];
    int D = c->head_dim, ratio = c->compress_ratio[l], csa = c->attn_kind[l] == ATTN_CSA;
    CUdeviceptr x = DEV(w->x), qr = DEV(w->qr), kv = DEV(w->kv), comp_kv = DEV(w->comp_kv), comp_gate = DEV(w->comp_gate);

    gpu_linear(&g->wq_a, x, qr, T);
    gpu_linear(&g->wkv, x, kv, T);
    gpu_row_norm_rope(qr, T, 1, c->q_lora_rank, 1, g->q_norm, c->rms_eps, 0, NULL, 0, 0);
    gpu_linear(&g->wq_b, qr, DEV(w->q), T);
    gpu_row_norm_rope(kv, T, 1, D, 1, g->kv_norm, c->rms_eps, c->rope_dim, gpu_layer_rope(c, l), DEV(ls->keys),
                      ring_rows(&gm->state, c));

    if (ratio) {
        gpu_linear(&g->comp_wkv, x, comp_kv, T);
        gpu_linear(&g->comp_wgate, x, comp_gate, T);
        CompressorArgs comp = compressor_args(&ls->comp, g->comp_ape, g->comp_norm, csa ? 2 : 1, D, comp_kv, comp_gate);
        gpu_compressors(c, &comp, 1, ratio, T);
    }
    if (csa) {
        gpu_linear(&g->index_comp_wkv, x, comp_kv, T);
        gpu_linear(&g->index_comp_wgate, x, comp_gate, T);
        gpu_linear(&g->index_weights_proj, x, DEV(w->index_w), T);
        gpu_linear(&g->index_wq_b, qr, DEV(w->index_q), T);
        CompressorArgs index = compressor_args(&ls->index_comp, g->index_comp_ape, g->index_comp_norm, 2, c->index_dim,
                                               comp_kv, comp_gate);
        gpu_compressors(c, &index, 1, ratio, T);
        gpu_indexer(c, l, T, DEV(w->index_w));
    }

    gpu_attend(c, l, T, 0);
    gpu_output_projection(c, l, T);
}

/* One expert stack's matrix applied to the chunk's slots in expert order, x [T * K, cols] ->
   y [T * K, rows]: per expert with slots, a GEMM over its rows (start[X + 1]: the expert
   counts, which the host read). */
static void gpu_expert_gemm(const GpuExperts *g, CUdeviceptr x, CUdeviceptr y, const int *start, int X) {
    const GpuLinear *w = &g->one;
    for (int e = 0; e < X; e++) {
        int n = start[e + 1] - start[e];
        if (!n || !g->host_table[2 * e]) continue;   /* no slots; another rank's expert */
        GpuLinear one = *w;
        one.weight = g->host_table[2 * e];
        one.scale = g->host_table[2 * e + 1];
        gpu_gemm(&one, g->host_factors[e], 0, w->rows, x + (size_t)start[e] * w->cols * 4, w->cols,
                 y + (size_t)start[e] * w->rows * 4, w->rows, n);
    }
}

/* MoE sub-block of layer l for the chunk: x[T, E] (normed) -> block_out[T, E] holds the shared
   expert's output and expert_out [T * K, E] the routed experts' rows in slot order (slot_row);
   hc_post_mix adds them, weighted. Mirrors moe() up to its combine: the router and the shared
   expert first (the routed experts reuse the shared expert's scratch), the routing, then the
   host reads the expert counts to size one GEMM per chosen expert. */
static void gpu_moe_prefill(const Model *m, int l, int T) {
    const Config *c = &m->config;
    const GpuLayer *g = &gm->layers[l];
    Scratch *w = &gm->state.scratch;
    int E = c->hidden_size, X = c->n_experts, K = c->topk, I = c->moe_inter;
    CUdeviceptr x = DEV(w->x);
    gpu_linear(&g->gate, x, DEV(w->router), T);
    if (g->shared_w1.rows) {   /* a rank's rows of the shared expert (none: not there) */
        gpu_linear(&g->shared_w1, x, DEV(w->expert_gate), T);
        gpu_linear(&g->shared_w3, x, DEV(w->expert_up), T);
        gpu_swiglu(DEV(w->expert_gate), DEV(w->expert_up), (size_t)T * g->shared_w1.rows, c->swiglu_limit);
        gpu_linear(&g->shared_w2, DEV(w->expert_gate), DEV(w->block_out), T);
    }
    RouteTokensArgs route = {
        .router = DEV(w->router), .bias = g->gate_bias, .tid2eid = g->tid2eid, .tokens = gm->tokens,
        .chosen = DEV(w->chosen), .route_weight = DEV(w->route_weight), .expert_start = DEV(w->expert_start),
        .slot_order = DEV(w->slot_order), .slot_row = DEV(w->slot_row), .active_experts = gm->active_experts,
        .active_count = gm->active_count, .T = (uint32_t)T, .X = (uint32_t)X, .K = (uint32_t)K,
        .routed_scaling = c->routed_scaling};
    LAUNCH(K_ROUTE, 1, 1, 1, 1024, 0, route);
    int *start = xcalloc((size_t)X + 1, sizeof(int));
    gpu_download(start, DEV(w->expert_start), ((size_t)X + 1) * sizeof(int));
    for (int e = 0; e < X; e++) gm->prefill_hits[(size_t)l * X + e] += (uint64_t)(start[e + 1] - start[e]);
    GatherRowsArgs gather = {.dst = DEV(w->expert_x), .src = x, .slot_order = DEV(w->slot_order), .K = (uint32_t)K,
                             .E = (uint32_t)E};
    LAUNCH(K_GATHER, (unsigned)(T * K), 1, 1, 256, 0, gather);
    gpu_expert_gemm(&g->w1, DEV(w->expert_x), DEV(w->expert_gate), start, X);
    gpu_expert_gemm(&g->w3, DEV(w->expert_x), DEV(w->expert_up), start, X);
    gpu_swiglu(DEV(w->expert_gate), DEV(w->expert_up), (size_t)T * K * I, c->swiglu_limit);
    gpu_expert_gemm(&g->w2, DEV(w->expert_gate), DEV(w->expert_out), start, X);
    free(start);
}

/* Layer l's MoE half for the current rank and the chunk's T tokens, from attention's whole
   block_out: the attention site's mixing, the MoE site's x, the MoE, the rank's part published
   (several ranks). */
static void gpu_moe_half_prefill(const Model *m, int l, int T) {
    const Config *c = &m->config;
    const GpuLayer *g = &gm->layers[l];
    gpu_after_block(c, l, T, 0);
    gpu_hc_finish(c, T, 0, g->hc_ffn_base, g->hc_ffn_scale, g->ffn_norm, (2 + HC) * HC);
    gpu_moe_prefill(m, l, T);
    if (gm->ranks > 1) gpu_rank_partial(c, l, T, 1);
}

/* The chunk of T > 1 tokens at tokens[0..T) and position *pos through the model: logits of
   every row [T, V] when all_logits, else of the last [1, V], into gm->state.scratch.logits. Does
   not advance *pos. Mirrors forward(); several ranks as gpu_decode. */
static void gpu_prefill(const Model *m, int T, int all_logits) {
    const Config *c = &m->config;
    int mix = (2 + HC) * HC, rows = all_logits ? T : 1, ranks = gpu_rank_count, attention_split = gpu_ranks[0].attention_split;
    int divided = gpu_ranks[0].ranks > 1;
    for (int r = 0; r < ranks; r++) gpu_use_rank(r), gpu_embed(c, T);
    for (int l = 0; l < c->n_layers; l++) {
        for (int r = 0; r < ranks; r++) {
            gpu_use_rank(r);
            const GpuLayer *g = &gm->layers[l];
            gpu_hc_finish(c, T, 0, g->hc_attn_base, g->hc_attn_scale, g->attn_norm, mix);
            gpu_attention_prefill(m, l, T);
            if (attention_split) gpu_rank_partial(c, l, T, 0);
            else gpu_moe_half_prefill(m, l, T);
        }
        if (attention_split) {
            gpu_rank_sums(c, l, T, 0);
            for (int r = 0; r < ranks; r++) gpu_use_rank(r), gpu_moe_half_prefill(m, l, T);
        }
        if (divided) gpu_rank_sums(c, l, T, 1);
        for (int r = 0; r < ranks; r++) gpu_use_rank(r), gpu_after_block(c, l, T, 1);
    }
    for (int r = 0; r < ranks; r++) {
        gpu_use_rank(r);
        gpu_hc_finish(c, rows, T - rows, gm->hc_head_base, gm->hc_head_scale, gm->norm, HC);
        gpu_linear_rows(&gm->head, 0, gm->head.rows, DEV(gm->state.scratch.x), c->hidden_size, gpu_head_logits(),
                        c->vocab_size, rows);
    }
    if (divided) gpu_gather_logits(c, rows);
    gpu_use_rank(0);
}

/* ====================================================================== GPU: the decode step */
/* One token, the step the CUDA graph captures: the same sections as gpu_prefill with decode's
   fusions, so that every weight byte is read once by a GEMV and few kernels run:
   - one gemv launch computes the GEMVs that need no result of one another (up to four
     matrices of any formats: gpu_gemv_parts), pairs and stacks uploaded side by side as one;
   - the GEMVs that read a site's x make it from the mHC finish themselves (GemvHc): no
     hc_finish launches;
   - the experts' w1/w3 launch routes the token itself (GemvRoute): no router launch;
   - a CSA layer's two compressors share one launch; the queries' RMSNorm is applied by wq_b
     as it stages qr, SwiGLU by w2 as it stages its input, the new key's norm, RoPE and ring
     write by attention_decode.
   Every kernel reads the position (*pos) and the token (tokens[0]) from device memory; the
   step's last kernel, sample_token, writes the next token and advances *pos. */

/* Decode's mHC finish of the site before layer l's attention (attn 1) or MoE (attn 0), or of
   the head (l = n_layers): what the GEMVs that read that site's x make it with. */
static GemvHc gemv_hc_site(const Config *c, int l, int attn) {
    Scratch *w = &gm->state.scratch;
    GemvHc hc = {.post = DEV(w->post), .comb = DEV(w->comb), .h = DEV(w->h), .partial = gm->hc_partial,
                 .partial_ss = gm->hc_partial_ss, .rows = (2 + HC) * HC, .slices = (uint32_t)gm->hc_slices,
                 .iters = (uint32_t)c->sinkhorn_iters, .hc_eps = c->hc_eps, .rms_eps = c->rms_eps};
    if (l == c->n_layers) {   /* the head: pre only, the final norm */
        hc.post = hc.comb = 0;
        hc.base = gm->hc_head_base, hc.scale = gm->hc_head_scale, hc.norm = gm->norm, hc.rows = HC;
    } else {
        const GpuLayer *g = &gm->layers[l];
        hc.base = attn ? g->hc_attn_base : g->hc_ffn_base;
        hc.scale = attn ? g->hc_attn_scale : g->hc_ffn_scale;
        hc.norm = attn ? g->attn_norm : g->ffn_norm;
    }
    return hc;
}

/* Attention sub-block of layer l for one token: block_out[E]. Its x is made from the site's
   mHC finish by the GEMVs that read it (hc; NULL: x is in scratch, as the tests give it).
   Mirrors attention(): one launch for every projection of x (wq_a and wkv stacked, beside a
   CSA layer's five compressor and indexer projections stacked, or an HCA layer's compressor
   pair), one for wq_b and the indexer's wq_b (which normalize qr as they stage it), the
   compressors, the indexer, the queries (which write the new key into the ring first), the
   output projection. */
static void gpu_attention_decode(const Model *m, int l, const GemvHc *hc) {
    const Config *c = &m->config;
    const GpuLayer *g = &gm->layers[l];
    Scratch *w = &gm->state.scratch;
    LayerCache *ls = &gm->state.layers[l];
    int Q = c->q_lora_rank, ratio = c->compress_ratio[l], csa = c->attn_kind[l] == ATTN_CSA;
    CUdeviceptr x = hc ? 0 : DEV(w->x), qr = DEV(w->qr), kv = DEV(w->kv);
    CUdeviceptr comp_kv = DEV(w->comp_kv), comp_gate = DEV(w->comp_gate), index_kv = comp_kv, index_gate = comp_gate;
    CUdeviceptr index_w = DEV(w->index_w);
    GemvPart parts[7];
    GemvPlan plans[3];
    int n = 0;
    if (g->wq_a_wkv.rows) {
        qr = gm->qr_kv, kv = gm->qr_kv + (size_t)Q * sizeof(float);
        parts[n++] = (GemvPart){&g->wq_a_wkv, x, qr, NULL};
    } else {
        parts[n++] = (GemvPart){&g->wq_a, x, qr, NULL};
        parts[n++] = (GemvPart){&g->wkv, x, kv, NULL};
    }
    if (csa) {   /* the five outputs side by side in csa_out, as the stack writes them */
        comp_kv = gm->csa_out, comp_gate = comp_kv + (size_t)g->comp_wkv.rows * 4;
        index_kv = comp_gate + (size_t)g->comp_wgate.rows * 4, index_gate = index_kv + (size_t)g->index_comp_wkv.rows * 4;
        index_w = index_gate + (size_t)g->index_comp_wgate.rows * 4;
    }
    if (g->csa_stack.rows) {
        parts[n++] = (GemvPart){&g->csa_stack, x, gm->csa_out, NULL};
    } else if (ratio) {
        n = gemv_add_pair(parts, n, &plans[0], &g->comp_wkv, &g->comp_wgate, g->comp_paired, g->comp_gscales62, x,
                          comp_kv, comp_gate);
        if (csa) {
            n = gemv_add_pair(parts, n, &plans[1], &g->index_comp_wkv, &g->index_comp_wgate, g->index_comp_paired,
                              g->index_comp_gscales62, x, index_kv, index_gate);
            parts[n++] = (GemvPart){&g->index_weights_proj, x, index_w, NULL};
        }
    }
    gpu_gemv_parts(parts, n, hc);
    plans[2] = (GemvPlan){.norm_weight = g->q_norm, .eps = c->rms_eps};
    GemvPart queries[2] = {{&g->wq_b, qr, DEV(w->q), &plans[2]}, {&g->index_wq_b, qr, DEV(w->index_q), &plans[2]}};
    gpu_gemv_parts(queries, csa ? 2 : 1, NULL);

    CompressorArgs comp[2] = {
        compressor_args(&ls->comp, g->comp_ape, g->comp_norm, csa ? 2 : 1, c->head_dim, comp_kv, comp_gate),
        compressor_args(&ls->index_comp, g->index_comp_ape, g->index_comp_norm, 2, c->index_dim, index_kv, index_gate)};
    if (ratio) gpu_compressors(c, comp, csa ? 2 : 1, ratio, 1);
    if (csa) gpu_indexer(c, l, 1, index_w);

    gpu_attend(c, l, 1, kv);
    gpu_output_projection(c, l, 1);
}

/* The decode plan of an expert stack's matrix over K slots: expert chosen[k] (the routing's
   choice) for slot k, input x + k * x_slot_stride floats (staged as SwiGLU(x, up) with up
   up_offset bytes after x when up_offset is not 0), output row k; its host experts streamed
   as `stream` says (NULL: none). */
static GemvPlan expert_plan(const GpuExperts *g, int K, int x_slot_stride, size_t up_offset, float limit,
                            const GemvStream *stream) {
    return (GemvPlan){.count = K, .x_stride = x_slot_stride, .y_stride = g->one.rows, .expert = DEV(gm->state.scratch.chosen),
                      .table = g->table, .gscales62 = g->one.format == FMT_NVFP4 ? g->gscales62 : 0, .list_len = K,
                      .up_offset = up_offset, .limit = limit, .stream = stream, .share = gm->ranks > 1};
}

/* MoE sub-block of layer l for one token: block_out[E] holds the shared expert's output and
   expert_out [K, E] the routed experts' (row k: slot k); hc_post_mix adds them, weighted.
   Mirrors moe() up to its combine, in three launches: the router's logits (its blocks also
   write the site's post and comb); the shared expert's w1 and w3 beside the chosen experts'
   (every block routes the token first: block 0 writes chosen and route_weight; the shared
   expert's weights stream into the ring meanwhile); the w2 of both, which apply the activation
   as they stage their input. x is made from the site's mHC finish (hc; NULL: in scratch). */
static void gpu_moe_decode(const Model *m, int l, const GemvHc *hc) {
    const Config *c = &m->config;
    const GpuLayer *g = &gm->layers[l];
    Scratch *w = &gm->state.scratch;
    int X = c->n_experts, K = c->topk, I = c->moe_inter;
    CUdeviceptr x = hc ? 0 : DEV(w->x);
    GemvPart gate = {&g->gate, x, DEV(w->router), NULL};
    gpu_gemv_parts(&gate, 1, hc);

    /* w1 and w3: one part of 2K slots when the stacks lie side by side (the w3 outputs go to
       rows K..2K-1 of expert_gate, which has room for max_tokens * K rows) */
    CUdeviceptr shared_gate = gm->shared_act, shared_up = gm->shared_act + (size_t)I * sizeof(float);
    CUdeviceptr up = DEV(w->expert_up);
    GemvPart parts[4];
    GemvPlan pair, routed13, routed1, routed3;
    /* the experts in host memory come through the streaming slots: this launch posts the choice
       (part 0), the w2 launch reads its pieces (part 1) */
    GemvStream stream13 = {.staging = gm->stream_staging, .control = gm->stream_control,
                           .mail = gm->stream_mail_dev + (size_t)l * sizeof(StreamMail),
                           .slot_bytes = (uint32_t)gm->stream_slot_bytes, .part = 0, .layer = (uint32_t)l,
                           .layers = (uint32_t)c->n_layers};
    GemvStream stream2 = stream13;
    stream2.part = 1;
    const GemvStream *streamed13 = gm->stream_slot_bytes ? &stream13 : NULL, *streamed2 = gm->stream_slot_bytes ? &stream2 : NULL;
    int shared = g->shared_w1.rows > 0;   /* a rank's rows of the shared expert (none: not there) */
    int n = !shared ? 0 : gemv_add_pair(parts, 0, &pair, &g->shared_w1, &g->shared_w3, g->shared_paired,
                                        g->shared_gscales62, x, shared_gate, shared_up);
    if (g->w13_paired && gm->state.max_tokens >= 2) {
        const GpuLinear *one = &g->w1.one;
        routed13 = (GemvPlan){.count = 2 * K, .y_stride = I, .expert = DEV(w->chosen), .table = g->w1.table,
                              .gscales62 = one->format == FMT_NVFP4 ? g->w1.gscales62 : 0,
                              .list_len = K, .list_offset = X, .stream = streamed13, .share = gm->ranks > 1};
        parts[n++] = (GemvPart){one, x, DEV(w->expert_gate), &routed13};
        up = DEV(w->expert_gate) + (size_t)K * I * sizeof(float);
    } else {
        routed1 = expert_plan(&g->w1, K, 0, 0, 0, streamed13), routed3 = expert_plan(&g->w3, K, 0, 0, 0, streamed13);
        parts[n++] = (GemvPart){&g->w1.one, x, DEV(w->expert_gate), &routed1};
        parts[n++] = (GemvPart){&g->w3.one, x, up, &routed3};
    }
    GemvHc again = hc ? *hc : (GemvHc){0};   /* x made again; post and comb are written already */
    again.post = again.comb = 0;
    GemvRoute route = {DEV(w->router), g->gate_bias, g->tid2eid, gm->tokens, DEV(w->chosen), DEV(w->route_weight),
                       DEV(w->expert_start), DEV(w->slot_order), DEV(w->slot_row), gm->active_experts,
                       gm->active_count, (uint32_t)X, (uint32_t)K, c->routed_scaling, 0,
                       gm->hits + (size_t)l * X * sizeof(uint32_t)};
    gpu_gemv_launch(parts, n, hc ? &again : NULL, &route);

    /* w2: the experts' list comes from the launch just before (read after the wait) */
    GemvPlan shared_plan = {.up_offset = shared_up - shared_gate, .limit = c->swiglu_limit};
    GemvPlan routed = expert_plan(&g->w2, K, I, up - DEV(w->expert_gate), c->swiglu_limit, streamed2);
    GemvPart w2[2] = {{&g->shared_w2, shared_gate, DEV(w->block_out), &shared_plan},
                      {&g->w2.one, DEV(w->expert_gate), DEV(w->expert_out), &routed}};
    gpu_gemv_parts(w2 + !shared, 1 + shared, NULL);
}

/* Layer l's MoE half for the current rank, from attention's whole block_out: the attention
   site's mixing, the MoE, the rank's part published (several ranks). */
static void gpu_moe_half_decode(const Model *m, int l) {
    const Config *c = &m->config;
    GemvHc ffn = gemv_hc_site(c, l, 0);
    gpu_after_block(c, l, 1, 0);
    gpu_moe_decode(m, l, &ffn);
    if (gm->ranks > 1) gpu_rank_partial(c, l, 1, 1);
}

/* The token at tokens[0] and position *pos through the model: its logits [1, V] into
   gm->state.scratch.logits. Does not advance *pos (sample_token does). Mirrors forward() for
   T = 1. Several ranks: layer by layer, every rank's part of a divided sub-block before any
   sum (attention's, where divided, then the MoE's). */
static void gpu_decode(const Model *m) {
    const Config *c = &m->config;
    int ranks = gpu_rank_count, attention_split = gpu_ranks[0].attention_split, divided = gpu_ranks[0].ranks > 1;
    for (int r = 0; r < ranks; r++) gpu_use_rank(r), gpu_embed(c, 1);
    for (int l = 0; l < c->n_layers; l++) {
        for (int r = 0; r < ranks; r++) {
            gpu_use_rank(r);
            GemvHc attn = gemv_hc_site(c, l, 1);
            gpu_attention_decode(m, l, &attn);
            if (attention_split) gpu_rank_partial(c, l, 1, 0);
            else gpu_moe_half_decode(m, l);
        }
        if (attention_split) {
            gpu_rank_sums(c, l, 1, 0);
            for (int r = 0; r < ranks; r++) gpu_use_rank(r), gpu_moe_half_decode(m, l);
        }
        if (divided) gpu_rank_sums(c, l, 1, 1);
        for (int r = 0; r < ranks; r++) gpu_use_rank(r), gpu_after_block(c, l, 1, 1);
    }
    for (int r = 0; r < ranks; r++) {
        gpu_use_rank(r);
        GemvHc head_site = gemv_hc_site(c, c->n_layers, 0);
        GemvPart head = {&gm->head, 0, gpu_head_logits(), NULL};
        gpu_gemv_parts(&head, 1, &head_site);
    }
    if (divided) gpu_gather_logits(c, 1);
    gpu_use_rank(0);
}

/* The sampler's settings into sample_token's arguments (the buffers are the caller's). */
static void sample_token_settings(SampleTokenArgs *args, const Sampler *s) {
    args->temperature = s->temperature;
    args->top_p = s->top_p;
    args->top_k = (uint32_t)s->top_k;
    args->log_min_p = s->min_p > 0 ? logf(s->min_p) : -INFINITY;   /* the CPU's logf: the same floor */
    args->penalty = s->repeat_penalty;
    args->last_n = (uint32_t)s->repeat_last_n;
}

/* The sampler's ring of recent tokens and its count into the device's recent [last_n] and
   n_fed [1] (nothing without a ring). */
static void gpu_upload_ring(const Sampler *s, CUdeviceptr recent, CUdeviceptr n_fed) {
    uint32_t count = (uint32_t)s->n_fed;
    if (!s->repeat_last_n) return;
    gpu_upload(recent, s->recent, (size_t)s->repeat_last_n * sizeof(int));
    gpu_upload(n_fed, &count, sizeof count);
}

/* The sampler's RNG state into every rank's rng (they draw alike). */
static void gpu_seed(uint64_t rng) {
    for (int r = gpu_rank_count - 1; r >= 0; r--) gpu_use_rank(r), gpu_upload(gm->rng, &rng, sizeof rng);
}

/* The chunk's first position and its tokens [T] (none: NULL) into every rank's pos and tokens. */
static void gpu_feed(int pos, const int *tokens, int T) {
    for (int r = gpu_rank_count - 1; r >= 0; r--) {   /* leaves rank 0 current */
        gpu_use_rank(r);
        gpu_upload(gm->pos, &pos, sizeof pos);
        if (tokens) gpu_upload(gm->tokens, tokens, (size_t)T * sizeof(int));
    }
}

/* Sample the next token from the last logits row on the device: out_token and tokens[0], the
   token appended to the device's ring of recent tokens (gm->recent, when s->repeat_last_n); *pos
   advances by one when `advance` (a decode step). Mirrors sample(). */
static void gpu_sample(const Sampler *s, int V, int row, int advance) {
    for (int r = 0; r < gpu_rank_count; r++) {   /* every rank draws the same token (the same logits and RNG) */
        gpu_use_rank(r);
        CUdeviceptr logits = DEV(gm->state.scratch.logits) + (size_t)row * V * 4;
        SampleTokenArgs args = {.logits = logits, .probs = gm->probs, .V = (uint32_t)V, .rng = gm->rng,
                                .out_token = gm->out_token, .tokens = gm->tokens, .pos0_ptr = gm->pos,
                                .advance = (uint32_t)advance, .recent = gm->recent, .n_fed = gm->n_fed};
        sample_token_settings(&args, s);
        LAUNCH(K_SAMPLE, 1, 1, 1, 1024, 0, args);
    }
    gpu_use_rank(0);
}

/* Capture one decode step (gpu_decode of tokens[0] at *pos, then sampling, which advances
   *pos) as a CUDA graph, once; every later step replays it (gpu_replay_decode). Several GPUs:
   one graph each, on the stream of its first rank, which keeps it. */
static void gpu_capture_decode(const Model *m, const Sampler *s) {
    int used = gpu_devices_used();
    for (int d = 0; d < used; d++)
        gpu_use_rank(d), CU_CHECK(cu.cuStreamBeginCapture(gpu->stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
    gpu_decode(m);
    gpu_sample(s, m->config.vocab_size, 0, 1);
    CUgraph graphs[GPUS_MAX];
    for (int d = 0; d < used; d++) gpu_use_rank(d), CU_CHECK(cu.cuStreamEndCapture(gpu->stream, &graphs[d]));
    for (int d = used - 1; d >= 0; d--) {   /* every capture ended first; leaves rank 0 current */
        gpu_use_rank(d);
        CU_CHECK(cu.cuGraphInstantiate(&gm->decode_graph, graphs[d], 0));
        CU_CHECK(cu.cuGraphDestroy(graphs[d]));
    }
}

/* One decode step: the captured graph of every GPU launched on its stream. */
static void gpu_replay_decode(void) {
    for (int d = gpu_devices_used() - 1; d >= 0; d--)   /* leaves rank 0 current */
        gpu_use_rank(d), CU_CHECK(cu.cuGraphLaunch(gm->decode_graph, gpu->stream));
}

/* `rounds` sums of one token's E floats over the loaded ranks as a step makes them: every
   rank's part published (rank_partial), then summed (gpu_rank_sums), the part buffers in turn. */
static void gpu_sum_rounds(const Config *c, int rounds) {
    int split = gpu_ranks[0].attention_split;
    for (int i = 0; i < rounds; i++) {
        int moe = split ? i % 2 : 1, l = split || c->n_layers < 2 ? 0 : i % 2;   /* sums 0, 1, 0, 1, ... */
        for (int r = 0; r < gpu_rank_count; r++) gpu_use_rank(r), gpu_rank_partial(c, l, 1, moe);
        gpu_rank_sums(c, l, 1, moe);
    }
}

/* Microseconds one sum of E floats takes over the loaded ranks, one a GPU, through peer memory
   (rank_partial + rank_sum) or NCCL (rank_partial + its all-reduce): a graph of SUM_ROUNDS sums
   on every GPU, replayed; the median replay over the rounds. Leaves rank 0 current. */
#define SUM_ROUNDS 32
static double gpu_sum_us(const Config *c, int by_nccl) {
    int used = gpu_devices_used(), saved = sums_by_nccl;
    float t[9];
    CUgraphExec exec[GPUS_MAX];
    sums_by_nccl = by_nccl;
    gpu_sum_rounds(c, 2);   /* as it comes first: NCCL sets a stream up at its first call, which a capture may not */
    for (int d = 0; d < used; d++) gpu_use_rank(d), gpu_sync();
    for (int d = 0; d < used; d++)
        gpu_use_rank(d), CU_CHECK(cu.cuStreamBeginCapture(gpu->stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
    gpu_sum_rounds(c, SUM_ROUNDS);
    for (int d = 0; d < used; d++) {
        CUgraph graph;
        gpu_use_rank(d);
        CU_CHECK(cu.cuStreamEndCapture(gpu->stream, &graph));
        CU_CHECK(cu.cuGraphInstantiate(&exec[d], graph, 0));
        CU_CHECK(cu.cuGraphDestroy(graph));
    }
    for (int i = -1; i < 9; i++) {   /* a warm-up, then nine timed */
        double start = now_seconds();
        for (int d = 0; d < used; d++) gpu_use_rank(d), CU_CHECK(cu.cuGraphLaunch(exec[d], gpu->stream));
        for (int d = 0; d < used; d++) gpu_use_rank(d), gpu_sync();
        if (i >= 0) t[i] = (float)((now_seconds() - start) * 1e6 / SUM_ROUNDS);
    }
    for (int d = used - 1; d >= 0; d--) gpu_use_rank(d), CU_CHECK(cu.cuGraphExecDestroy(exec[d]));
    sums_by_nccl = saved;
    qsort(t, 9, sizeof *t, compare_float);
    return t[4];
}

/* Several GPUs (one rank each): how the loaded ranks sum their parts, measured: through peer
   memory, or by NCCL's all-reduce where NCCL is there and faster (sums_by_nccl). Returns the
   microseconds of one sum the chosen way, with the two in words in line[n]. */
static double gpu_choose_sums(const Config *c, char *line, size_t n) {
    int bytes = c->hidden_size * (int)sizeof(float);
    if (gpu_hosts.count > 1 || !gpu_peer_access) {   /* NCCL alone reaches the other hosts, or GPUs without peer access */
        sums_by_nccl = 1;
        double us = gpu_sum_us(c, 1);
        snprintf(line, n, "a sum of %d bytes over %d GPUs%s takes %.1f us by NCCL %d.%d.%d (%s)", bytes, gpu_split.n,
                 gpu_hosts.count > 1 ? " of several hosts" : "", us, nccl_version / 10000, nccl_version / 100 % 100,
                 nccl_version % 100, gpu_hosts.count > 1 ? "the only link between hosts" : "no peer access between them");
        return us;
    }
    double peer = gpu_sum_us(c, 0), by_nccl = nccl_comms[0] ? gpu_sum_us(c, 1) : 0;
    sums_by_nccl = nccl_comms[0] && by_nccl < peer;
    if (nccl_comms[0])
        snprintf(line, n, "a sum of %d bytes over %d GPUs takes %.1f us through peer memory, %.1f us by NCCL %d.%d.%d: %s",
                 bytes, gpu_rank_count, peer, by_nccl, nccl_version / 10000, nccl_version / 100 % 100, nccl_version % 100,
                 sums_by_nccl ? "NCCL's used" : "peer memory used");
    else snprintf(line, n, "a sum of %d bytes over %d GPUs takes %.1f us through peer memory (NCCL not used: %s)", bytes,
                  gpu_rank_count, peer, nccl_why);
    return sums_by_nccl ? by_nccl : peer;
}

/* A chunk of T tokens through the model on the GPU: the decode step's kernels for one token,
   the prefill's for more (logits as gpu_prefill leaves them). */
static void gpu_forward(const Model *m, int T, int all_logits) {
    if (T == 1) gpu_decode(m);
    else gpu_prefill(m, T, all_logits);
}

/* ================================================================ several GPUs: the split plan */
/* How a model is to be divided over N GPUs of one host for one user's decode (gpu_load_ranks
   loads a plan, all of it but the pipeline; --bench prints the plans of 1 to 8 GPUs,
   bench_split). Every GPU (a rank) keeps a whole copy of what is small or needed whole by each
   token: the embedding table, the norms and mHC parameters, the router,
   wq_a and wkv, the compressors and the indexer, the caches (one KV head: every rank writes the
   same entries). What is large is divided, each rank reading only its share each step:
   - the routed experts (expert parallel): rank r holds experts [X r / N, X (r + 1) / N) of
     every layer and computes the token's choices among them;
   - the shared expert: blocks of 128 of its intermediate rows (w1's and w3's rows, the same
     columns of w2);
   - attention, when it pays (tensor parallel): whole output groups, each with its heads (wq_b's
     rows, the sinks), its wo_a rows and its wo_b columns; a rank attends with its heads;
   - the head: blocks of 128 rows of the vocabulary, the logits gathered before sampling.
   After a divided sub-block each rank holds a partial sum of the output [E]; one all-reduce of
   E floats makes it whole on every rank. The MoE always needs one; attention divided needs a
   second, so it is divided only where the bytes that saves the busiest rank take longer to read
   than the all-reduce takes (costs.read_bytes_per_us, costs.allreduce_us: the caller's).
   Without peer access between the GPUs the model is divided by layers instead, for fit (a
   pipeline: rank r holds a contiguous run of layers, about 1/N of the weights with the embedding
   table on the first and the head on the last, and the residual streams are handed on).
   split_plan is a pure function of the model's shapes and the costs (tests: test_split_plan). */

/* Bytes of rows [first, first + count) of W as the checkpoint stores them (codes and scales;
   FP8: the 128-row scale blocks they touch). */
static double linear_rows_bytes(const Linear *w, int first, int count) {
    if (count <= 0) return 0;
    double codes = (double)count * linear_row_bytes(w);
    Linear rows = *w;
    rows.rows = count;
    if (w->format == FMT_FP8) rows.rows = ((first + count + 127) / 128 - first / 128) * 128;
    return codes + (double)linear_scale_bytes(&rows);
}

/* Bytes of `count` columns of W starting at a multiple of 128 (FP8's scale blocks). */
static double linear_cols_bytes(const Linear *w, int count) {
    if (count <= 0) return 0;
    Linear cols = *w;
    cols.cols = count;
    return (double)w->rows * linear_row_bytes(&cols) + (double)linear_scale_bytes(&cols);
}

/* Bytes of all of W. */
static double linear_bytes(const Linear *w) { return linear_rows_bytes(w, 0, w->rows); }

/* Whether model m's attention can be divided over n GPUs by output groups: at least one group
   each, and in every layer a group's rows of wq_b and wo_a and its columns of wo_b whole scale
   blocks of their formats (FP8: 128 rows and 128 columns; MXFP4 and NVFP4: 32 and 16 columns). */
static int attention_divisible(const Model *m, int n) {
    const Config *c = &m->config;
    int G = c->o_groups, O = c->o_lora_rank;
    if (n > G || c->n_heads % G) return 0;
    int rows = c->n_heads / G * c->head_dim;   /* a group's rows of wq_b */
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        if (L->wo_b.format == FMT_F32 || rows % linear_row_block(&L->wq_b) || O % linear_row_block(&L->wo_a) ||
            O % linear_col_block(&L->wo_b))
            return 0;
    }
    return 1;
}

/* Bytes of layer l on a rank holding `share` of it (whole attention when !attention_split): the
   bytes a step reads (its experts: K of X expected), or with `held` those it holds (every one). */
static double layer_share_bytes(const Model *m, int l, const RankShare *share, int attention_split, int held) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    const Linear *list[16];
    int n = layer_linears(L, list), G = c->o_groups, group_rows = c->n_heads / G * c->head_dim;
    double bytes = 0;
    for (int i = 0; i < n; i++) {
        const Linear *w = list[i];
        Range g = attention_split ? share->groups : (Range){0, G};
        if (w == &L->wq_b) bytes += linear_rows_bytes(w, g.first * group_rows, g.count * group_rows);
        else if (w == &L->wo_a) bytes += linear_rows_bytes(w, g.first * c->o_lora_rank, g.count * c->o_lora_rank);
        else if (w == &L->wo_b) bytes += linear_cols_bytes(w, g.count * c->o_lora_rank);
        else if (w == &L->shared_w1 || w == &L->shared_w3)
            bytes += linear_rows_bytes(w, share->shared.first, share->shared.count);
        else if (w == &L->shared_w2) bytes += linear_cols_bytes(w, share->shared.count);
        else bytes += linear_bytes(w);
    }
    size_t device, read;
    expert_bytes(L, &device, &read);
    bytes += held ? (double)read * share->experts.count : (double)c->topk * read * share->experts.count / c->n_experts;
    return bytes + 2.0 * (2 + HC) * HC * HC * c->hidden_size * 4;   /* the two mHC sites' matrices */
}

/* Weight bytes of a rank's share s of model m (attention divided or not): what a decode step
   reads on it (held 0: the token's embedding row, its head rows, its share of every layer, the
   routed experts expected under uniform routing) or what it holds (held 1: the embedding table
   instead of the row, all its experts). */
static double rank_share_bytes(const Model *m, const RankShare *s, int attention_split, int held) {
    double bytes = (held ? (double)m->embed.nbytes : embed_row_bytes(m)) + linear_rows_bytes(&m->head, s->vocab.first, s->vocab.count);
    for (int l = 0; l < m->config.n_layers; l++) bytes += layer_share_bytes(m, l, s, attention_split, held);
    return bytes;
}

/* The plan for model m over n GPUs (peer_access: every pair can read the other's memory) at
   `costs`, into *p. Returns 0 with the reason in why[size] when m cannot be divided n ways. */
static int split_plan(const Model *m, int n, int peer_access, SplitCosts costs, SplitPlan *p, char *why, size_t size) {
    const Config *c = &m->config;
    int L = c->n_layers, X = c->n_experts, V = c->vocab_size;
    memset(p, 0, sizeof *p);
    if (n < 1 || n > RANKS_MAX) return snprintf(why, size, "%d GPUs: from 1 to %d", n, RANKS_MAX), 0;
    if (peer_access ? n > X : n > L)
        return snprintf(why, size, "%d GPUs for %d %s: at least one each", n, peer_access ? X : L,
                        peer_access ? "routed experts a layer" : "layers"), 0;
    if (n > 1 && !(costs.read_bytes_per_us > 0 && costs.allreduce_us >= 0))
        return snprintf(why, size, "split costs: a read rate of %g bytes a us and all-reduces of %g us", costs.read_bytes_per_us,
                        costs.allreduce_us), 0;
    p->n = n;
    p->pipeline = n > 1 && !peer_access;
    double head = linear_bytes(&m->head), embed_row = embed_row_bytes(m);
    if (p->pipeline) {   /* layer l goes to the rank the midpoint of its held bytes falls in */
        RankShare all = {{0, X}, {0, c->o_groups}, {0, c->moe_inter}, {0, V}, {0, L}, 0, 0};
        double embed = (double)m->embed.nbytes, total = embed + head, before = embed;
        for (int l = 0; l < L; l++) total += layer_share_bytes(m, l, &all, 0, 1);
        for (int r = 0; r < n; r++) p->rank[r] = all, p->rank[r].layers = (Range){L, 0};
        for (int l = 0; l < L; l++) {
            double held = layer_share_bytes(m, l, &all, 0, 1);
            int r = (int)((before + held / 2) * n / total);
            RankShare *s = &p->rank[r < n ? r : n - 1];
            if (!s->layers.count) s->layers.first = l;
            s->layers.count++;
            s->read_bytes += layer_share_bytes(m, l, &all, 0, 0);
            s->held_bytes += held;
            before += held;
        }
        for (int r = 0; r < n; r++)
            if (!p->rank[r].layers.count) return snprintf(why, size, "%d GPUs: GPU %d would get no layer", n, r), 0;
        p->rank[0].read_bytes += embed_row, p->rank[0].held_bytes += embed;
        p->rank[n - 1].read_bytes += head, p->rank[n - 1].held_bytes += head;
        for (int r = 0; r < n - 1; r++) p->rank[r].vocab = (Range){V, 0};
        return 1;
    }
    for (int r = 0; r < n; r++) {
        RankShare *s = &p->rank[r];
        s->experts = split_range(X, 1, r, n);
        s->groups = attention_divisible(m, n) ? split_range(c->o_groups, 1, r, n) : (Range){0, c->o_groups};
        s->shared = split_range(c->moe_inter, SPLIT_BLOCK, r, n);
        s->vocab = split_range(V, SPLIT_BLOCK, r, n);
        s->layers = (Range){0, L};
    }
    /* attention divided: what it saves the busiest rank against the second all-reduce */
    if (n > 1 && attention_divisible(m, n)) {
        double busiest_whole = 0, busiest_divided = 0;   /* the busiest rank's bytes with attention whole, divided */
        for (int r = 0; r < n; r++) {
            double whole = 0, divided = 0;
            for (int l = 0; l < L; l++) {
                whole += layer_share_bytes(m, l, &p->rank[r], 0, 0);
                divided += layer_share_bytes(m, l, &p->rank[r], 1, 0);
            }
            busiest_whole = whole > busiest_whole ? whole : busiest_whole;
            busiest_divided = divided > busiest_divided ? divided : busiest_divided;
        }
        p->saved_us = (busiest_whole - busiest_divided) / costs.read_bytes_per_us;
        p->attention_split = p->saved_us > L * costs.allreduce_us;
    }
    for (int r = 0; r < n; r++) {
        RankShare *s = &p->rank[r];
        if (!p->attention_split) s->groups = (Range){0, c->o_groups};
        s->read_bytes = rank_share_bytes(m, s, p->attention_split, 0);
        s->held_bytes = rank_share_bytes(m, s, p->attention_split, 1);
    }
    p->allreduces = n > 1 ? L * (1 + p->attention_split) : 0;
    return 1;
}

/* The costs a load plans with (split_plan): an H100's streaming read (docs/GPU.md: 3.09 TB/s),
   and all-reduces of E floats of the order of NCCL's small all-reduce over NVLink (not measured:
   no several-GPU machine yet). */
#define SPLIT_READ_BYTES_PER_US 3.0e6
#define SPLIT_ALLREDUCE_US 10.0

/* "N" when every rank's count of a range is N, "N to M" when they differ (range k of a RankShare:
   0 experts, 1 groups). */
static void share_counts(const SplitPlan *p, int k, char *out, size_t n) {
    int least = INT_MAX, most = 0;
    for (int r = 0; r < p->n; r++) {
        int count = k ? p->rank[r].groups.count : p->rank[r].experts.count;
        least = count < least ? count : least;
        most = count > most ? count : most;
    }
    if (least == most) snprintf(out, n, "%d", most);
    else snprintf(out, n, "%d to %d", least, most);
}

/* Plan p in words: each GPU's share and the busiest GPU's bytes. */
static void split_line(const Model *m, const SplitPlan *p, char *out, size_t n) {
    char experts[32], groups[32];
    share_counts(p, 0, experts, sizeof experts);
    share_counts(p, 1, groups, sizeof groups);
    double read = 0, held = 0;
    for (int r = 0; r < p->n; r++) {
        read = p->rank[r].read_bytes > read ? p->rank[r].read_bytes : read;
        held = p->rank[r].held_bytes > held ? p->rank[r].held_bytes : held;
    }
    char attention[64] = "attention whole on each";
    if (p->attention_split) snprintf(attention, sizeof attention, "%s of attention's %d output groups", groups, m->config.o_groups);
    snprintf(out, n, "divided over %d GPUs, each with %s of the %d routed experts of every layer, about 1/%d of the shared "
             "expert's and of the head's rows and %s; the busiest holds %.2f GB of weights and reads %.2f GB a token", p->n,
             experts, m->config.n_experts, p->n, attention, held / 1e9, read / 1e9);
}

/* ============================================================================== generation */

/* Load tokenizer.json of the model directory (and tokenizer_config.json's add_bos_token);
   fatal when it is unusable or names ids the model's vocabulary does not have. */
static void load_tokenizer(Tokenizer *t, int *add_bos, const char *dir, const Config *c) {
    char *path = path_join(dir, "tokenizer.json"), err[512];
    if (tokenizer_load_file(t, path, err, sizeof err)) fatal("%s", err);
    if (t->n_ids > c->vocab_size)
        fatal("%s: the tokenizer has ids up to %d but the model's vocab_size is %d", path, t->n_ids - 1, c->vocab_size);
    free(path);
    *add_bos = 1;
    path = path_join(dir, "tokenizer_config.json");
    if (access(path, F_OK) == 0) {
        Json *tc = load_json_file(path);
        static const char *const known[] = {"add_bos_token", "chat_template", NULL}, *const ignored[] = {"add_eos_token", NULL};
        warn_misspelled_keys(tc, path, known, ignored);
        const Json *bos = json_get(tc, "add_bos_token");
        if (bos && bos->type == JSON_BOOL) *add_bos = bos->number != 0;
        json_free(tc);
    }
    free(path);
}

/* Whether the model directory's tokenizer_config.json has a chat template ("chat_template": a
   non-empty string, or a non-empty list of named ones): -i then chats in DeepSeek V4's format
   rather than continuing plain text. The template itself is not run: the format is V4's. */
static int has_chat_template(const char *dir) {
    char *path = path_join(dir, "tokenizer_config.json");
    int found = 0;
    if (access(path, F_OK) == 0) {
        Json *tc = load_json_file(path);
        const Json *template = json_get(tc, "chat_template");
        found = template && (template->type == JSON_STRING || template->type == JSON_ARRAY) && template->length > 0;
        json_free(tc);
    }
    free(path);
    return found;
}

/* The offset of the first byte of text[n] that is not part of valid UTF-8, or n. */
static size_t utf8_invalid_at(const char *text, size_t n) {
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t length = utf8_decode((const unsigned char *)text + i, n - i, &cp);
        if (cp == INVALID_CHAR) return i;
        i += length;
    }
    return n;
}

/* Like getline (the next line of f with its newline in *line, grown as needed; its length, or
   -1 at the end of the input or on an error), but fatal as soon as the line passes
   MAX_PROMPT_BYTES: an endless line (-i < /dev/zero) must not take all the memory. */
static ssize_t read_line(char **line, size_t *capacity, FILE *f) {
    size_t len = 0;
    for (int c = 0; c != '\n' && (c = getc(f)) != EOF;) {
        if (len == MAX_PROMPT_BYTES + (c == '\n'))
            fatal("a line of standard input is larger than the limit of %d MiB", MAX_PROMPT_MIB);
        if (len + 2 > *capacity) {   /* room for c and the NUL */
            size_t grown = *capacity < 256 ? 256 : 2 * *capacity;
            char *bigger = realloc(*line, grown);
            if (!bigger) fatal("out of memory reading standard input");
            *line = bigger;
            *capacity = grown;
        }
        (*line)[len++] = (char)c;
    }
    if (!len) return -1;
    (*line)[len] = '\0';
    return (ssize_t)len;
}

/* Check that text[n] is valid UTF-8; fatal naming the first bad byte otherwise. */
static void check_utf8(const char *text, size_t n, const char *what) {
    size_t at = utf8_invalid_at(text, n);
    if (at < n) fatal("%s is not valid UTF-8 (bad byte 0x%02x at offset %zu)", what, (unsigned char)text[at], at);
}

/* How text_ids encodes a text: TEXT_CHAT as one user turn of the chat format; TEXT_SPECIAL with
   the added tokens typed in it (<｜User｜>, </think>) taken as those tokens (--special), else as
   plain text (tokenizer_encode_plain). */
enum { TEXT_CHAT = 1, TEXT_SPECIAL = 2 };

/* The ids of head[n_head], then those of the prompt: as it is, or with TEXT_CHAT as one user
   turn in DeepSeek V4's chat format,
     <｜User｜>{prompt}<｜Assistant｜></think>
   (</think> only when the tokenizer has it: V4's non-thinking chat mode), the format's own
   tokens always as control tokens, the prompt's as `how` says. Each part is encoded on its
   own, as the library encodes the text between added tokens. The prompt must be non-empty
   valid UTF-8 (`what` names it in the messages: "the prompt"). Returns the count; *ids is
   allocated. */
static int text_ids(const Tokenizer *t, const int *head, int n_head, const char *prompt, int how, const char *what, int **ids) {
    size_t n = strlen(prompt);
    if (n == 0) fatal("%s is empty", what);
    check_utf8(prompt, n, what);
    int chat = how & TEXT_CHAT;
    const char *open = chat ? "<｜User｜>" : "";
    const char *close = !chat ? "" : tokenizer_find(t, "</think>") >= 0 ? "<｜Assistant｜></think>" : "<｜Assistant｜>";
    int (*encode)(const Tokenizer *, const char *, size_t, int *, int) = how & TEXT_SPECIAL ? tokenizer_encode
                                                                                           : tokenizer_encode_plain;
    int n_open = tokenizer_encode(t, open, strlen(open), NULL, 0), n_close = tokenizer_encode(t, close, strlen(close), NULL, 0);
    int count = encode(t, prompt, n, NULL, 0);
    if (count < 0 || count > INT_MAX - n_head - n_open - n_close) fatal("%s (%zu bytes) is too long to tokenize", what, n);
    *ids = xcalloc((size_t)n_head + (size_t)n_open + (size_t)count + (size_t)n_close + 1, sizeof(int));
    if (n_head) memcpy(*ids, head, (size_t)n_head * sizeof(int));
    int at = n_head + tokenizer_encode(t, open, strlen(open), *ids + n_head, n_open);
    at += encode(t, prompt, n, *ids + at, count);
    return at + tokenizer_encode(t, close, strlen(close), *ids + at, n_close);
}

/* The ids fed to the model for a one-shot prompt: BOS (when the tokenizer asks for it), then
   the text (`how`: TEXT_*), wrapped in DeepSeek V4's chat format with TEXT_CHAT (--chat):
     <｜begin▁of▁sentence｜><｜User｜>{prompt}<｜Assistant｜></think>
   Returns the count; *ids is allocated. */
static int prompt_ids(const Tokenizer *t, int add_bos, int bos_id, const char *prompt, int how, int **ids) {
    return text_ids(t, &bos_id, add_bos || (how & TEXT_CHAT), prompt, how, "the prompt", ids);
}

/* The head of every chat-format context: BOS, then the system prompt (--system; none when
   NULL) as text, encoded as `special` says (TEXT_SPECIAL or 0), as DeepSeek V4's template puts
   it: <｜begin▁of▁sentence｜>{system}<｜User｜>... Returns the count; *ids is allocated. */
static int chat_head(const Tokenizer *t, int bos_id, const char *system, int special, int **ids) {
    if (system) return text_ids(t, &bos_id, 1, system, special, "the system prompt", ids);
    *ids = xcalloc(1, sizeof(int));
    **ids = bos_id;
    return 1;
}

/* prompt_ids with a system prompt (`system`, NULL for none) after BOS in the chat format. */
static int prompt_ids_system(const Tokenizer *t, int add_bos, int bos_id, const char *system, const char *prompt, int how, int **ids) {
    if (!system || !(how & TEXT_CHAT)) return prompt_ids(t, add_bos, bos_id, prompt, how, ids);
    int *head, n_head = chat_head(t, bos_id, system, how & TEXT_SPECIAL, &head);
    int n = text_ids(t, head, n_head, prompt, how, "the prompt", ids);
    free(head);
    return n;
}

/* Write n bytes to stdout, and with `flush` push everything out; fatal on a write error (a full
   disk, an I/O error), so that no output is lost without a word. */
static void write_stdout(const void *bytes, size_t n, int flush) {
    if ((n && fwrite(bytes, 1, n, stdout) != n) || (flush && (fflush(stdout) || ferror(stdout))))   /* ferror: a fprintf's */
        fatal("cannot write the output: %s", strerror(errno));
}

/* --stop STRING: generation ends when the reply's text holds one of these (set by main). */
#define MAX_STOPS 8          /* --stop given at most this often */
#define MAX_STOP_BYTES 256   /* and each string at most this long */
static const char *stop_strings[MAX_STOPS];
static int n_stop_strings;

/* A reply's text on its way to stdout: the token bytes go through `utf8` (whole characters,
   U+FFFD for bytes that cannot form one), then wait in held[n_held] as long as they may be the
   start of a stop string: what is written is never part of one. */
typedef struct {
    Utf8Stream utf8;
    char held[MAX_STOP_BYTES + 3 * (4096 + 3)];   /* a stop string's prefix + one piece of print_token */
    size_t n_held;
} ReplyText;

/* Add the n settled bytes at text (n <= 3 * (4096 + 3)) to the reply and write to stdout what
   can no longer be part of a stop string. Returns 1 when the text now holds a stop string: the
   text before its first one is written, the rest dropped. */
static int reply_write(ReplyText *r, const char *text, size_t n) {
    memcpy(r->held + r->n_held, text, n);
    r->n_held += n;
    size_t cut = r->n_held;   /* where the first stop string starts, if any */
    for (int k = 0; k < n_stop_strings; k++) {
        size_t len = strlen(stop_strings[k]);
        for (size_t at = 0; at + len <= r->n_held && at < cut; at++)
            if (!memcmp(r->held + at, stop_strings[k], len)) cut = at;
    }
    if (cut < r->n_held) {
        write_stdout(r->held, cut, 1);
        r->n_held = 0;
        return 1;
    }
    size_t keep = 0;   /* the longest end of the text that begins a stop string */
    for (int k = 0; k < n_stop_strings; k++)
        for (size_t len = strlen(stop_strings[k]) - 1; len > keep; len--)
            if (len <= r->n_held && !memcmp(r->held + r->n_held - len, stop_strings[k], len)) {
                keep = len;
                break;
            }
    write_stdout(r->held, r->n_held - keep, 0);
    memmove(r->held, r->held + r->n_held - keep, keep);
    r->n_held = keep;
    return 0;
}

/* Write a token's text to stdout, holding back an incomplete UTF-8 character and what may begin
   a stop string. Returns 1 when the text now holds a stop string (see reply_write). */
static int print_token(const Tokenizer *t, ReplyText *r, int id) {
    size_t len = 0;
    const char *bytes = id < t->n_ids ? tokenizer_token_bytes(t, id, &len) : NULL;
    char out[3 * (4096 + 3)];
    while (bytes && len) {
        size_t piece = len > 4096 ? 4096 : len;
        if (reply_write(r, out, utf8_stream_push(&r->utf8, bytes, piece, out))) return 1;
        bytes += piece;
        len -= piece;
    }
    write_stdout(NULL, 0, 1);
    return 0;
}

/* End the reply's text: U+FFFD for an unfinished character, then whatever was held back (unless
   that completes a stop string), then a newline. */
static void reply_end(ReplyText *r) {
    char tail[3];
    if (!reply_write(r, tail, utf8_stream_flush(&r->utf8, tail))) write_stdout(r->held, r->n_held, 0);
    r->n_held = 0;
    write_stdout("\n", 1, 1);
}

/* ---------- Logits file ----------
   --dump-logits FILE is written to a temporary file beside FILE and renamed over it when the run
   completes. An error exit (atexit) or a signal removes the temporary file, so a run that does
   not complete leaves neither a partial FILE nor the temporary one. */

static char dump_temp[PATH_MAX + 16];   /* the temporary logits file while it exists, else "" */

/* Remove the temporary logits file and host 0's rendezvous file (--hosts), if any (at exit and
   from signal handlers: unlink is async-signal-safe). */
static void remove_temporary_files(void) {
    if (dump_temp[0]) unlink(dump_temp);
    if (rendezvous_path[0]) unlink(rendezvous_path);
}

/* Append rows x V float32 logits to f (nothing when f is NULL); fatal on a write error. */
static void write_logits(FILE *f, const float *logits, size_t rows, int V) {
    if (f && fwrite(logits, sizeof(float), rows * V, f) != rows * V) fatal("cannot write the logits file: %s", strerror(errno));
}

/* Whether two stats name the same file (links and other spellings of a path included). */
static int same_file(const struct stat *a, const struct stat *b) { return a->st_dev == b->st_dev && a->st_ino == b->st_ino; }

/* The directory part of path ("." when it has none) and its last component, in new strings. */
static void split_path(const char *path, char **dir, char **base) {
    const char *slash = strrchr(path, '/');
    *base = xstrdup(slash ? slash + 1 : path);
    *dir = xstrdup(!slash ? "." : slash == path ? "/" : path);
    if (slash && slash != path) (*dir)[slash - path] = 0;
}

/* Refuse --dump-logits `path` where writing it could harm what the run reads: inside the model
   directory (at any depth: each directory above the target, symbolic links resolved, is compared
   with it by device and inode), the same file as one of the n files in `read` or as stdin,
   stdout or stderr (device and inode: hard and symbolic links included), an existing path that
   is not a regular file (a device, a directory), or a symbolic link that leads nowhere (the
   rename would replace the link itself, not create what it names). */
static void check_dump_target(const char *path, const char *model_dir, const char *const *read, int n) {
    struct stat target, other, model;
    char *dir, *base;
    split_path(path, &dir, &base);
    if (!*base) fatal("--dump-logits: %s names a directory, not a file", path);
    if (lstat(path, &other) == 0 && S_ISLNK(other.st_mode) && stat(path, &target))
        fatal("--dump-logits: %s is a symbolic link that leads nowhere (%s)", path, strerror(errno));
    if (stat(path, &target) == 0) {
        if (!S_ISREG(target.st_mode)) fatal("--dump-logits: %s exists and is not a regular file", path);
        for (int i = 0; i < n; i++)
            if (stat(read[i], &other) == 0 && same_file(&target, &other))
                fatal("--dump-logits: %s is a file this run reads (%s)", path, read[i]);
        for (int fd = 0; fd <= 2; fd++)
            if (fstat(fd, &other) == 0 && same_file(&target, &other))
                fatal("--dump-logits: %s is this run's standard %s", path, fd == 0 ? "input" : fd == 1 ? "output" : "error");
    }
    if (stat(model_dir, &model)) fatal("cannot read %s: %s", model_dir, strerror(errno));
    char *real = realpath(dir, NULL);
    if (!real) fatal("--dump-logits: cannot write in %s: %s", dir, strerror(errno));
    for (;;) {
        if (stat(real, &other) == 0 && same_file(&other, &model))
            fatal("--dump-logits: %s is inside the model directory %s", path, model_dir);
        if (!strcmp(real, "/")) break;
        char *slash = strrchr(real, '/');
        slash[slash == real] = 0;
    }
    free(real);
    free(dir);
    free(base);
}

/* Create the temporary file for --dump-logits `path`: in the same directory (so that the final
   rename is atomic), with the permissions a new file gets. */
static FILE *open_dump(const char *path) {
    char *dir, *base, temp[sizeof dump_temp];
    split_path(path, &dir, &base);
    if ((size_t)snprintf(temp, sizeof temp, "%s/.%s.XXXXXX", dir, base) >= sizeof temp)
        fatal("--dump-logits: the path %s is too long", path);
    int fd = mkstemp(temp);
    if (fd < 0) fatal("--dump-logits: cannot create a file in %s: %s", dir, strerror(errno));
    memcpy(dump_temp, temp, sizeof temp);   /* from now on, removed unless completed */
    mode_t mask = umask(0);
    umask(mask);
    FILE *f = fchmod(fd, 0666 & ~mask) ? NULL : fdopen(fd, "wb");
    if (!f) fatal("--dump-logits: cannot write %s: %s", dump_temp, strerror(errno));
    free(dir);
    free(base);
    return f;
}

/* Complete the logits file: flush it to the disk, then rename it over `path` (saying so when that
   replaces a file). */
static void finish_dump(FILE *f, const char *path) {
    struct stat st;
    int existed = stat(path, &st) == 0;
    if (fflush(f) || fsync(fileno(f)) || fclose(f)) fatal("cannot write the logits file %s: %s", dump_temp, strerror(errno));
    if (rename(dump_temp, path)) fatal("cannot rename %s to %s: %s", dump_temp, path, strerror(errno));
    dump_temp[0] = 0;
    if (existed) say("replaced %s", path);
}

/* ---------- Signals ---------- */

static volatile sig_atomic_t generating;    /* generate() or perplexity() runs: a SIGINT stops it after the current step */
static volatile sig_atomic_t interrupted;   /* a SIGINT came while generating */
static volatile sig_atomic_t chatting;      /* chat() runs: a SIGINT ends a reply, or at the prompt the conversation */

/* SIGINT: the first one during generation asks it to stop after the current token (the run then
   flushes its text, prints the stats and exits 130; --perplexity stops after the current
   chunk, printing no perplexity); a second one, or one while nothing is
   being generated (loading, reading the prompt), exits at once with 130. In a chat (-i) the first
   one only sets `interrupted` too, which chat() reads: a reply stops and the prompt comes back;
   at the prompt the conversation ends. The temporary logits file is removed either way. */
static void on_sigint(int sig) {
    (void)sig;
    if ((generating || chatting) && !interrupted) {
        interrupted = 1;
        return;
    }
    remove_temporary_files();
    _exit(130);
}

/* SIGTERM, SIGHUP, SIGPIPE: remove the temporary files, then die of the signal as usual
   (installed with SA_RESETHAND: the raised signal is delivered, with its default action, on
   return). */
static void on_fatal_signal(int sig) {
    remove_temporary_files();
    raise(sig);
}

/* Write the string s to stderr from a signal handler (write(2) only), with `escape` its control
   characters as \xHH: a shard's path comes from the index file. */
static void write_stderr_raw(const char *s, int escape) {
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char hex[4] = {'\\', 'x', "0123456789abcdef"[c >> 4], "0123456789abcdef"[c & 15]};
        int plain = !escape || (c >= 0x20 && c != 0x7f);
        if (write(2, plain ? s : hex, plain ? 1 : 4) < 0) return;
    }
}

/* SIGBUS: a read of a mapped checkpoint file beyond its end, the file having been truncated or
   overwritten (which truncates it first) during the run. When the fault address lies in one of
   the mapped files, say which in one line, remove the temporary logits file and exit 1; any
   other SIGBUS dies of the signal as usual. Async-signal-safe: write, unlink and _exit only. */
static void on_sigbus(int sig, siginfo_t *info, void *context) {
    (void)context;
    static atomic_int taken;   /* the CPU's threads fault together: the first reports, the rest wait for its exit */
    if (atomic_exchange(&taken, 1))
        for (;;) pause();
    uintptr_t at = (uintptr_t)info->si_addr;
    for (int i = 0; i < n_mapped; i++)
        if (at - (uintptr_t)mapped_files[i].map < mapped_files[i].size) {
            write_stderr_raw("nvfp4: error: ", 0);
            write_stderr_raw(mapped_files[i].path, 1);
            write_stderr_raw(" changed during the run (truncated or overwritten): its weights cannot be read\n", 0);
            remove_temporary_files();
            _exit(1);
        }
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigaction(sig, &dfl, NULL);   /* not SA_RESETHAND: a second thread's fault must not kill the first's report */
    on_fatal_signal(sig);
}

/* Install `sa` for signal `sig`, unless it is ignored: a signal the parent ignores (nohup's
   SIGHUP, `trap '' PIPE`, a background job's SIGINT) stays ignored. */
static void catch_signal(int sig, const struct sigaction *sa) {
    struct sigaction old;
    if (sigaction(sig, NULL, &old) == 0 && old.sa_handler == SIG_IGN) return;
    sigaction(sig, sa, NULL);
}

/* Install the handlers above, and remove the temporary files on any exit. SIGBUS is caught
   even when ignored (a fault's SIGBUS cannot be), and SIGXFSZ is ignored: a write beyond
   `ulimit -f` then fails with EFBIG and is reported like any write error. */
static void install_signal_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESTART;
    catch_signal(SIGINT, &sa);
    sa.sa_handler = on_fatal_signal;
    sa.sa_flags = SA_RESETHAND;
    catch_signal(SIGTERM, &sa);
    catch_signal(SIGHUP, &sa);
    catch_signal(SIGPIPE, &sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;   /* on_sigbus resets it itself */
    sigaction(SIGBUS, &sa, NULL);
    signal(SIGXFSZ, SIG_IGN);
    atexit(remove_temporary_files);
}

/* ---------- Generating ---------- */

/* ------------------------------------------------------------------------------ backends */
/* generate(), chat() and perplexity() run the model through a Backend: the CPU's reference
   forward pass, or the GPU (gm: the same state plan over device memory, the sampler there
   too, each decode step one CUDA graph replay; only the sampled token id comes back, and the
   logits only when --dump-logits or --perplexity asks for them). */
typedef struct {
    const char *name;   /* "cpu" or "gpu", for the stats */
    /* Lay out the state for chunks of T tokens, a context of C and (all_logits) every row's
       logits kept, and load the model's weights where the backend reads them; the sampler's
       RNG starts at rng. Fatal, naming the numbers, when they do not fit. Writes where the
       model went (" onto <GPU> (<rate> upload)", or "") into where[n]. */
    State *(*load)(const Model *m, int T, int C, int all_logits, uint64_t rng, char *where, size_t n);
    /* Forward T tokens at s->pos (advancing it). Returns the host logits rows [T or 1, V] when
       keep_all (--dump-logits, --perplexity; every row), else whatever the path has (the CPU's
       last row, NULL on the GPU, whose sampler reads them there). */
    const float *(*chunk)(const Model *m, State *s, const int *tokens, int T, int keep_all);
    /* The next token from row `row` of the last chunk's logits (fatal when they are not finite). */
    int (*sample)(const Model *m, State *s, Sampler *sampler, int row);
    /* Feed `token` (the one just sampled) and return the next; *logits (when asked) points to
       its host logits row. */
    int (*step)(const Model *m, State *s, Sampler *sampler, int token, const float **logits);
    /* Free what load allocated. */
    void (*unload)(State *s);
    /* Wait for the work queued so far to finish (the GPU's stream; the CPU's is done), so that
       the stats can time the prefill apart from the first sampling. */
    void (*wait)(void);
} Backend;

/* The message every backend stops with when a row of logits is not finite. */
static void refuse_logits(int pos) {
    fatal("the logits at position %d are not finite: the checkpoint holds NaN or infinite weights", pos);
}

/* ---------- the CPU ---------- */

static State *cpu_load(const Model *m, int T, int C, int all_logits, uint64_t rng, char *where, size_t n) {
    (void)rng;   /* the CPU's sampler keeps its own state */
    const Config *c = &m->config;
    size_t bytes = state_bytes(c, T, C, all_logits);
    size_t physical = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE);
    if (bytes == SIZE_MAX || bytes > physical)
        fatal("the decoding state for --ctx %d and --chunk %d needs %.1f GiB, more than this machine's %.1f GiB", C, T,
              bytes == SIZE_MAX ? INFINITY : bytes / 1073741824.0, physical / 1073741824.0);
    State *s = xcalloc(1, sizeof *s);
    alloc_state(s, c, T, C, all_logits);
    snprintf(where, n, "%s", "");
    return s;
}

static const float *cpu_chunk(const Model *m, State *s, const int *tokens, int T, int keep_all) {
    forward(m, s, tokens, T, keep_all);
    return s->scratch.logits;
}

static int cpu_sample(const Model *m, State *s, Sampler *sampler, int row) {
    int V = m->config.vocab_size;
    float *logits = s->scratch.logits + (size_t)row * V;
    for (int v = 0; v < V; v++)
        if (!isfinite(logits[v])) refuse_logits(s->pos - 1);
    return sample(sampler, logits, V);
}

static int cpu_step(const Model *m, State *s, Sampler *sampler, int token, const float **logits) {
    forward(m, s, &token, 1, 0);
    if (logits) *logits = s->scratch.logits;
    return cpu_sample(m, s, sampler, 0);
}

static void cpu_unload(State *s) {
    free_state(s);
    free(s);
}

static void cpu_wait(void) {}

static const Backend cpu_backend = {"cpu", cpu_load, cpu_chunk, cpu_sample, cpu_step, cpu_unload, cpu_wait};

/* ---------- the GPU ---------- */

/* The GPUs a load without --gpus divides model m over: one when it fits GPU 0 whole (within
   --gpu-mem) or the machine has one; else every GPU (at most GPUS_MAX), opened here, or one
   again, said, when they cannot reach each other's memory. */
static int gpu_default_count(const Model *m, int T, int C, int all_logits) {
    int present = 0;
    size_t free_bytes, total_bytes;
    char why[256];
    CU_CHECK(cu.cuDeviceGetCount(&present));
    if (present < 2) return 1;
    CU_CHECK(cu.cuMemGetInfo(&free_bytes, &total_bytes));
    int fits = gpu_plan_placement(m, T, C, all_logits, free_bytes, &gpu_budget, why, sizeof why) && !placed.host_bytes;
    free((void *)gm->on_device);
    memset(gm, 0, sizeof *gm);
    if (fits) return 1;
    int count = present < GPUS_MAX ? present : GPUS_MAX;
    if (gpu_open_more(count, why, sizeof why)) return count;
    say("the model does not fit GPU 0, and the %d GPUs cannot be used together (%s): one GPU, experts in host memory",
        count, why);
    return 1;
}

static State *gpu_backend_load(const Model *m, int T, int C, int all_logits, uint64_t rng, char *where, size_t n) {
    int gpus = gpu_hosts.count > 1 ? gpu_hosts.count * gpu_hosts.gpus
             : gpu_budget.gpus     ? gpu_budget.gpus : gpu_default_count(m, T, C, all_logits);
    SplitPlan plan;
    char why[256];
    if (!split_plan(m, gpus, 1, (SplitCosts){SPLIT_READ_BYTES_PER_US, SPLIT_ALLREDUCE_US}, &plan, why, sizeof why))
        fatal("the model cannot be divided over %d GPUs: %s", gpus, why);
    double seconds = gpu_load_ranks(m, T, C, all_logits, &gpu_budget, &plan);
    if (gpus > 1) {
        char line[400];
        split_line(m, &plan, line, sizeof line);
        say("%s", line);
        gpu_choose_sums(&m->config, line, sizeof line);
        say("%s", line);
    }
    gpu_seed(rng);
    char line[320];
    gpu_placement_line(line, sizeof line);
    char names[300];
    gpu_names(names, sizeof names);
    snprintf(where, n, " onto %s, %.1f GB/s: %s,", names, m->weight_bytes / seconds / 1e9, line);
    return &gm->state;
}

static const float *gpu_chunk(const Model *m, State *s, const int *tokens, int T, int keep_all) {
    int V = m->config.vocab_size, next = s->pos + T;
    gpu_feed(s->pos, tokens, T);
    gpu_forward(m, T, keep_all);
    gpu_feed(next, NULL, 0);   /* the first decode step's position */
    stream_check();
    s->pos = next;
    if (!keep_all) return NULL;
    gpu_download(gm->host_logits, DEV(s->scratch.logits), (size_t)T * V * sizeof(float));
    return gm->host_logits;
}

/* The first token after a prefill: the device's ring of recent tokens is made the host's (the
   sampler fed the prompt there), then sample_token draws and appends, as every decode step does. */
static int gpu_next_token(const Model *m, State *s, Sampler *sampler, int row) {
    int V = m->config.vocab_size, token;
    for (int r = gpu_rank_count - 1; r >= 0; r--) gpu_use_rank(r), gpu_upload_ring(sampler, gm->recent, gm->n_fed);
    gpu_sample(sampler, V, row, 0);
    gpu_download(&token, gm->out_token, sizeof token);
    if (token < 0 || token >= V) refuse_logits(s->pos - 1);   /* sample_token's answer to non-finite logits */
    return token;
}

/* One replay of the decode graph (captured at the first step: the sampler's settings are fixed
   for the run), which reads the token and the position from device memory and advances them. */
static int gpu_step(const Model *m, State *s, Sampler *sampler, int token, const float **logits) {
    (void)token;   /* in device memory already: the last sample_token wrote it */
    int V = m->config.vocab_size, next;
    if (!gm->decode_graph) gpu_capture_decode(m, sampler);
    gpu_replay_decode();
    gpu_download(&next, gm->out_token, sizeof next);
    stream_check();
    s->pos++;
    if (logits) {
        gpu_download(gm->host_logits, DEV(s->scratch.logits), (size_t)V * sizeof(float));
        *logits = gm->host_logits;
    }
    if (next < 0 || next >= V) refuse_logits(s->pos - 1);
    return next;
}

static void gpu_backend_unload(State *s) {
    (void)s;   /* gm->state */
    gpu_unload();
    gpu_close();
}

static void gpu_wait(void) {
    for (int d = gpu_devices_used() - 1; d >= 0; d--) gpu_use_rank(d), gpu_sync();
    stream_check();
}

static const Backend gpu_backend = {"gpu", gpu_backend_load, gpu_chunk, gpu_next_token, gpu_step, gpu_backend_unload, gpu_wait};

enum { STOP_LIMIT, STOP_EOS, STOP_CONTEXT, STOP_INTERRUPT, STOP_STRING };   /* why a reply ended */

/* What the stats lines report, summed over the turns of a run. */
typedef struct {
    int prompt_tokens, generated;   /* tokens prefilled; tokens generated (an EOS is not one) */
    int steps;                      /* decode steps: the generated tokens after each reply's first */
    double prefill_s, decode_s;     /* see generate() */
    double load_s, total_s;         /* the model's load; the whole run (set by main) */
    int stop;                       /* why the last reply ended: STOP_* */
    int windows;                    /* --perplexity: windows run (-1 in other runs) */
} Stats;

/* Prefill prompt[n_prompt] in chunks of at most s->max_tokens, then sample up to n_generate
   tokens, streaming their text to stdout, and end the text with a newline. Every evaluated
   position's logits row goes to dump (when not NULL). Stops at an EOS id (not printed), after
   n_generate tokens, when the context is full, or on SIGINT after the current chunk or token.
   Ends too when the text holds a --stop string (the string and what follows are not printed).
   Returns the last token sampled, which is not in the state yet (-1 when none was); the i-th
   token printed goes to record[i] when record is not NULL. Adds to *st: prefill time is that of
   every prompt chunk; decode time runs from the first generated token's sampling to the end of
   the last token, so that --chunk does not change it: the first token's logits come from the
   last prompt chunk, and each later one from a decode step. */
static int generate(const Backend *run, const Model *m, State *s, const Tokenizer *t, Sampler *sampler, const int *prompt, int n_prompt,
                    int n_generate, FILE *dump, Stats *st, int *record) {
    const Config *c = &m->config;
    if (s->pos + n_prompt > s->max_ctx) fatal("the prompt has %d tokens, more than the context (--ctx %d)", n_prompt, s->max_ctx);
    double start = now_seconds();
    int last_row = 0;   /* the row of the last chunk's logits that gives the next token */
    generating = 1;
    for (int done = 0; done < n_prompt && !interrupted;) {
        int T = n_prompt - done < s->max_tokens ? n_prompt - done : s->max_tokens;
        write_logits(dump, run->chunk(m, s, prompt + done, T, dump != NULL), (size_t)T, c->vocab_size);
        last_row = dump ? T - 1 : 0;
        done += T;
        st->prompt_tokens += T;
    }
    run->wait();
    double prefilled = now_seconds();
    st->prefill_s += prefilled - start;
    st->stop = STOP_LIMIT;
    ReplyText reply = {0};
    sampler_feed(sampler, prompt, n_prompt);
    int generated = 0, token = interrupted ? -1 : run->sample(m, s, sampler, last_row);
    while (!interrupted) {
        int eos = 0;
        for (int i = 0; i < c->n_eos; i++) eos |= token == c->eos_ids[i];
        if (eos) {   /* the end-of-sentence token itself is not printed */
            st->stop = STOP_EOS;
            break;
        }
        if (record) record[generated] = token;
        generated++;
        if (print_token(t, &reply, token)) {
            st->stop = STOP_STRING;
            break;
        }
        if (generated >= n_generate || interrupted) break;
        if (s->pos >= s->max_ctx) {
            fprintf(stderr, "\nnvfp4: the context is full (--ctx %d): stopping\n", s->max_ctx);
            st->stop = STOP_CONTEXT;
            break;
        }
        const float *logits = NULL;
        sampler_feed(sampler, &token, 1);
        token = run->step(m, s, sampler, token, dump ? &logits : NULL);
        write_logits(dump, logits, 1, c->vocab_size);
    }
    generating = 0;
    if (interrupted) st->stop = STOP_INTERRUPT;
    if (generated) st->decode_s += now_seconds() - prefilled;
    reply_end(&reply);
    st->generated += generated;
    st->steps += generated ? generated - 1 : 0;
    return token;
}

/* The stats on stderr, like llama.cpp's: the load time; the prompt's tokens, time and rate (or
   --perplexity's tokens, windows, time and rate); the generated tokens, their time (see
   generate) and the rate of the decode steps in it (none for a reply of one token, whose logits
   came from the prompt); how the last reply ended when -n did not end it; the total time.
   Not printed under -q. */
static void print_stats(const Stats *st, const char *backend) {
    static const char *ended[] = {"", "; ended at EOS", "; ended: the context is full", "; interrupted", "; ended at a stop string"};
    if (quiet) return;
    fprintf(stderr, "nvfp4: load %.2f ms\n", st->load_s * 1e3);
    if (st->windows >= 0)
        fprintf(stderr, "nvfp4: perplexity %d tokens, %d window%s, %.2f ms, %.2f tok/s%s\n", st->prompt_tokens, st->windows,
                st->windows == 1 ? "" : "s", st->prefill_s * 1e3, st->prefill_s > 0 ? st->prompt_tokens / st->prefill_s : 0.0,
                ended[st->stop]);
    else {
        fprintf(stderr, "nvfp4: prompt %d tokens, %.2f ms, %.2f tok/s\n", st->prompt_tokens, st->prefill_s * 1e3,
                st->prefill_s > 0 ? st->prompt_tokens / st->prefill_s : 0.0);
        fprintf(stderr, "nvfp4: generation %d token%s, %.2f ms, %d step%s", st->generated, st->generated == 1 ? "" : "s",
                st->decode_s * 1e3, st->steps, st->steps == 1 ? "" : "s");
        if (st->steps > 0 && st->decode_s > 0)
            fprintf(stderr, ", %.2f ms/token, %.2f tok/s", st->decode_s * 1e3 / st->steps, st->steps / st->decode_s);
        fprintf(stderr, "%s\n", ended[st->stop]);
    }
    fprintf(stderr, "nvfp4: total %.2f ms (%s)\n", st->total_s * 1e3, backend);
}

/* The read function of the chat's standard input (fopencookie): it waits in ppoll with SIGINT
   unblocked there only, so that a SIGINT at the prompt, even one that comes just before the
   wait, makes the read fail with EINTR (interrupted set) rather than block. */
static ssize_t read_stdin_interruptible(void *cookie, char *buf, size_t size) {
    (void)cookie;
    sigset_t sigint, old;
    sigemptyset(&sigint);
    sigaddset(&sigint, SIGINT);
    sigprocmask(SIG_BLOCK, &sigint, &old);
    struct pollfd in = {0, POLLIN, 0};
    int ready = -1;
    while (!interrupted && (ready = ppoll(&in, 1, NULL, &old)) < 0 && errno == EINTR) {}
    ssize_t n = interrupted || ready < 0 ? -1 : read(0, buf, size);
    int error = interrupted ? EINTR : errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    errno = error;
    return n;
}

/* Interactive mode (-i). The turns are `first` (when not NULL), then the lines of stdin ("> " on
   stderr when it is a terminal), each followed by the model's reply, in one of two forms:
   - plain text (`how` without TEXT_CHAT; a base model): BOS (add_bos), then the turns and
     replies as one text that the model continues, each turn after the first on a line of its
     own ("\n" + the line), or right after the EOS when the reply ended at one;
   - TEXT_CHAT, DeepSeek V4's chat format, with the system prompt (`system`, NULL for none):
       <｜begin▁of▁sentence｜>{system}<｜User｜>turn 1<｜Assistant｜></think>reply 1<｜end▁of▁sentence｜><｜User｜>turn 2...
   A turn is encoded as text_ids does with `how` (TEXT_CHAT, TEXT_SPECIAL). The state is kept
   between turns, so that each turn prefills only its own ids: the end of the previous reply (its
   last token when it did not end at EOS, since that one was printed but not fed back; then, in
   the chat format, the EOS), then the new turn. A line that holds a NUL byte or is not valid
   UTF-8 is skipped with a message. SIGINT during a reply stops it and the prompt comes back, the
   tokens so far staying in the context (one during the prefill leaves the part prefilled); at
   the prompt it ends the conversation with st->stop STOP_INTERRUPT, as EOF and a line "/exit" end
   it. When a turn and room for its reply (-n tokens, at most half the context) do not fit in the
   rest of the context, the oldest turns are dropped, said in one line, BOS and the system prompt
   kept, and what is kept is prefilled again from position 0 (llama.cpp's context shift); a turn
   too long for the context even alone is skipped with a message. With `shift` 0 (--no-shift), a
   turn that does not fit or a reply that fills the context ends the conversation instead. */
static void chat(const Backend *run, const Model *m, State *s, const Tokenizer *t, Sampler *sampler, const char *first, int how,
                 const char *system, int add_bos, int shift, int n_generate, FILE *dump, Stats *st) {
    const Config *c = &m->config;
    int C = s->max_ctx, chat_format = how & TEXT_CHAT, terminal = isatty(0);
    int *head, n_head = chat_format ? chat_head(t, c->bos_id, system, how & TEXT_SPECIAL, &head) : add_bos;
    if (!chat_format) *(head = xcalloc(1, sizeof(int))) = c->bos_id;
    if (n_head > C) fatal("the system prompt has %d tokens with BOS, more than the context (--ctx %d)", n_head, C);
    int *context = xcalloc((size_t)C + 1, sizeof(int));   /* the ids in the state, then a printed token not fed back yet */
    int *starts = xcalloc((size_t)C + 1, sizeof(int));    /* [n_turns] where each turn kept begins in context */
    int n_turns = 0, pending[2], n_pending = 0, ended_at_eos = 0;
    char *line = NULL, *text = NULL;
    size_t capacity = 0;
    FILE *in = fopencookie(NULL, "r", (cookie_io_functions_t){.read = read_stdin_interruptible});
    if (!in) fatal("cannot read standard input: %s", strerror(errno));
    chatting = 1;
    for (const char *turn = first;; turn = NULL) {
        if (!turn) {
            if (terminal) fputs("> ", stderr);
            ssize_t len = read_line(&line, &capacity, in);
            if (interrupted) st->stop = STOP_INTERRUPT;
            else if (len < 0 && ferror(in)) fatal("cannot read standard input: %s", strerror(errno));
            if (interrupted || len < 0) {
                if (terminal) fputc('\n', stderr);
                break;
            }
            while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
            size_t bad = utf8_invalid_at(line, (size_t)len);
            if ((size_t)len != strlen(line)) say("this line holds a NUL byte (offset %zu): skipped", strlen(line));
            else if (bad < (size_t)len)
                say("this line is not valid UTF-8 (bad byte 0x%02x at offset %zu): skipped", (unsigned char)line[bad], bad);
            if ((size_t)len != strlen(line) || bad < (size_t)len) continue;
            if (!strcmp(line, "/exit")) break;
            if (!len) continue;
            turn = line;
        }
        if (s->pos <= n_head) {   /* nothing but (part of) the head in the state: start afresh */
            reset_state(s);
            n_turns = n_pending = 0;
        }
        int started = s->pos > 0;
        free(text);
        text = NULL;
        if (!chat_format && started && !ended_at_eos) {
            text = xcalloc(strlen(turn) + 2, 1);
            text[0] = '\n';
            strcpy(text + 1, turn);
            turn = text;
        }
        /* ids: what comes before the turn (the head, or the end of the last reply), then the turn */
        int *ids, lead = started ? n_pending : n_head, n = text_ids(t, started ? pending : head, lead, turn, how, "the prompt", &ids);
        int n_context = s->pos, skip = 0, room = n_generate < C / 2 ? n_generate : C / 2;
        if (s->pos + n > C || (shift && n_turns && s->pos + n + room > C)) {
            if (!shift) {
                fprintf(stderr, "nvfp4: this turn (%d tokens) does not fit in the rest of the context (--ctx %d): the conversation ends\n",
                        n, C);
                free(ids);
                break;
            }
            if (n_head + n - lead > C) {
                say("this turn (%d tokens) does not fit in the context (--ctx %d) even alone: skipped", n - lead, C);
                free(ids);
                continue;
            }
            int k = n_turns > 0;   /* drop the k oldest turns: as few as leave room for the reply, else all */
            while (k < n_turns && n_head + (s->pos - starts[k]) + n + room > C) k++;
            int from = k < n_turns ? starts[k] : s->pos, dropped = from - n_head;
            memmove(context + n_head, context + from, (size_t)(s->pos - from) * sizeof(int));
            for (int i = k; i < n_turns; i++) starts[i - k] = starts[i] - dropped;
            n_turns -= k;
            skip = n_turns ? 0 : lead;   /* the end of a dropped reply goes with it */
            n_context = s->pos - dropped;
            say("the context is full: dropped the oldest %d tokens (%d turn%s); %d kept, prefilled again", dropped, k,
                k == 1 ? "" : "s", n_context);
            reset_state(s);
        }
        int prompt_end = n_context + n - skip, start = s->pos;
        memcpy(context + n_context, ids + skip, (size_t)(n - skip) * sizeof(int));
        free(ids);
        starts[n_turns++] = n_context + lead - skip;
        for (int i = prompt_end; i <= C; i++) context[i] = -1;   /* generate writes the printed tokens here */
        int last = generate(run, m, s, t, sampler, context + start, prompt_end - start, n_generate, dump, st, context + prompt_end);
        n_pending = 0;
        if (s->pos < prompt_end) {   /* the prefill was interrupted: the part prefilled stays */
            if (starts[n_turns - 1] >= s->pos) n_turns--;
        } else if (st->stop == STOP_EOS) pending[n_pending++] = last;
        else {
            if (context[s->pos] >= 0) pending[n_pending++] = context[s->pos];   /* printed, not fed back */
            if (chat_format) pending[n_pending++] = c->eos_ids[0];
        }
        ended_at_eos = st->stop == STOP_EOS;
        if (st->stop == STOP_INTERRUPT) {   /* the reply ends here; the conversation goes on */
            interrupted = 0;
            st->stop = STOP_LIMIT;
        }
        if (st->stop == STOP_CONTEXT && !shift) {
            fprintf(stderr, "nvfp4: the reply has filled the context (--ctx %d): the conversation ends\n", C);
            break;
        }
    }
    chatting = 0;
    fclose(in);
    free(line);
    free(text);
    free(head);
    free(context);
    free(starts);
}

/* ---------- Perplexity ---------- */

/* -log softmax(logits[V])[id], in double with the largest logit subtracted; fatal when a logit
   is not finite (`pos`, the position whose logits they are, names it). */
static double token_nll(const float *logits, int V, int id, int pos) {
    double largest = -INFINITY, sum = 0;
    for (int v = 0; v < V; v++) {
        if (!isfinite(logits[v]))
            fatal("the logits at position %d are not finite: the checkpoint holds NaN or infinite weights", pos);
        largest = fmax(largest, logits[v]);
    }
    for (int v = 0; v < V; v++) sum += exp(logits[v] - largest);
    return log(sum) + largest - logits[id];
}

/* --perplexity: cut the text's ids[n] (no BOS) into consecutive windows, each run from position
   0 (reset_state) as [BOS] + the next s->max_ctx - 1 ids when bos >= 0 (the tokenizer's
   add_bos_token, so that every window starts like a prompt; the last window is shorter), or as
   the next s->max_ctx ids when bos < 0. Each window is fed in chunks of at most s->max_tokens
   (the state laid out for every row's logits), and -log p(next id) is added at every position
   but a window's last: every id is predicted (with a BOS), or every id but a window's first.
   Prints on stdout
     perplexity: P (mean NLL N nats over K tokens, W windows of up to C)
   with a progress bar on a terminal. SIGINT stops it after the current chunk: it then says so on
   stderr and prints no perplexity. Adds to *st: the tokens run as prompt tokens, their time as
   prefill. */
static void perplexity(const Backend *run, const Model *m, State *s, const int *ids, int n, int bos, Stats *st) {
    int V = m->config.vocab_size, C = s->max_ctx, head = bos >= 0, windows = 0, predicted = 0, text_done = 0;
    int *window = xcalloc((size_t)C, sizeof(int));   /* [C] the ids run: BOS (with a head), then text */
    double nll = 0, start = now_seconds();
    window[0] = bos;
    generating = 1;
    for (int first = 0; first < n && !interrupted; first += C - head, windows++) {
        int length = head + (n - first < C - head ? n - first : C - head);
        memcpy(window + head, ids + first, (size_t)(length - head) * sizeof(int));
        reset_state(s);
        for (int done = 0; done < length && !interrupted;) {
            int T = length - done < s->max_tokens ? length - done : s->max_tokens;
            const float *logits = run->chunk(m, s, window + done, T, 1);
            for (int t = 0; t < T && done + t + 1 < length; t++, predicted++)
                nll += token_nll(logits + (size_t)t * V, V, window[done + t + 1], done + t);
            done += T;
            st->prompt_tokens += T;
            text_done = first + done - head;   /* ids of the text run so far */
            progress("perplexity", text_done, n);
        }
    }
    generating = 0;
    free(window);
    st->prefill_s += now_seconds() - start;
    st->windows = windows;
    if (interrupted) {
        st->stop = STOP_INTERRUPT;
        fprintf(stderr, "%snvfp4: interrupted after %d of %d tokens: no perplexity\n", isatty(2) ? "\r\033[K" : "",
                text_done, n);
        return;
    }
    char line[256];
    int length = snprintf(line, sizeof line, "perplexity: %.4f (mean NLL %.6f nats over %d tokens, %d window%s of up to %d)\n",
                          exp(nll / predicted), nll / predicted, predicted, windows, windows == 1 ? "" : "s", C);
    write_stdout(line, (size_t)length, 1);
}

/* ============================================================================ benchmark */
/* `nvfp4 --bench` times the GPU path on a model of V4-Flash's real shapes and formats with
   random weights made on the GPU (no checkpoint needed): FP8 attention and shared expert,
   NVFP4 routed experts (256, top 6), BF16 compressors, indexer, router and head, the first
   `layers` layers of Flash's sliding / CSA / HCA pattern. It prefills `position` random tokens
   in chunks of 2048, then decodes with the CUDA graph and reports per token: time, bytes read,
   GB/s against a streaming read measured in the same run, kernels, and the projection to
   Flash's 43 layers. */

/* Milliseconds of `reps` runs of fn(arg, i) (i = 0..reps-1) on the stream, between two events. */
static float gpu_time(void (*fn)(void *, int), void *arg, int reps) {
    CUevent start, end;
    float ms;
    CU_CHECK(cu.cuEventCreate(&start, CU_EVENT_DEFAULT));
    CU_CHECK(cu.cuEventCreate(&end, CU_EVENT_DEFAULT));
    CU_CHECK(cu.cuEventRecord(start, gpu->stream));
    for (int i = 0; i < reps; i++) fn(arg, i);
    CU_CHECK(cu.cuEventRecord(end, gpu->stream));
    CU_CHECK(cu.cuEventSynchronize(end));
    CU_CHECK(cu.cuEventElapsedTime(&ms, start, end));
    CU_CHECK(cu.cuEventDestroy(start));
    CU_CHECK(cu.cuEventDestroy(end));
    return ms;
}

#define BENCH_REPEATS 9   /* timed passes; the median is reported */

/* Median over BENCH_REPEATS passes of the time per call of fn (each pass `calls` calls). */
static double gpu_median_us(void (*fn)(void *, int), void *arg, int calls) {
    float t[BENCH_REPEATS];
    gpu_time(fn, arg, calls);   /* warm-up */
    for (int i = 0; i < BENCH_REPEATS; i++) t[i] = gpu_time(fn, arg, calls) * 1000 / calls;
    qsort(t, BENCH_REPEATS, sizeof *t, compare_float);
    return t[BENCH_REPEATS / 2];
}

/* One stream_read over buf[bytes] (the call index is unused: the same buffer every time). */
typedef struct { CUdeviceptr buf, out; size_t bytes; } StreamRun;
static void stream_call(void *arg, int i) {
    (void)i;
    StreamRun *r = arg;
    gpu_stream_read(r->buf, r->bytes, r->out);
}

/* One copy of bytes from page-locked host memory to the device (the copy engine's rate). */
typedef struct { CUdeviceptr dst; const void *src; size_t bytes; } CopyRun;
static void copy_call(void *arg, int i) {
    (void)i;
    CopyRun *r = arg;
    CU_CHECK(cu.cuMemcpyHtoDAsync(r->dst, r->src, r->bytes, gpu->stream));
}

/* The released models whose shapes the benchmark takes (--model), and their layer counts. */
typedef enum { SHAPE_FLASH, SHAPE_PRO } ModelShape;
static const char *const shape_names[] = {"V4-Flash", "V4-Pro"};
static const int shape_layers[] = {43, 61};

/* The configuration of V4-Flash or V4-Pro (its config.json, read as parse_config reads it) cut
   to `layers`. */
static void bench_config(Config *c, ModelShape shape, int layers) {
    int pro = shape == SHAPE_PRO;
    memset(c, 0, sizeof *c);
    c->vocab_size = 129280, c->hidden_size = pro ? 7168 : 4096, c->n_layers = layers, c->n_heads = pro ? 128 : 64;
    c->head_dim = 512, c->rope_dim = 64, c->q_lora_rank = pro ? 1536 : 1024, c->o_groups = pro ? 16 : 8;
    c->o_lora_rank = 1024, c->n_experts = pro ? 384 : 256, c->n_shared_experts = 1, c->topk = 6;
    c->moe_inter = pro ? 3072 : 2048, c->n_hash_layers = 3, c->sinkhorn_iters = 20, c->sliding_window = 128;
    c->index_heads = 64, c->index_dim = 128, c->index_topk = pro ? 1024 : 512, c->bos_id = 0;
    c->eos_ids[0] = 1, c->n_eos = 1, c->hc_eps = 1e-6f, c->rms_eps = 1e-6f, c->routed_scaling = pro ? 2.5f : 1.5f;
    c->swiglu_limit = 10, c->rope_theta = 10000, c->compress_rope_theta = 160000, c->yarn = 1, c->yarn_factor = 16;
    c->yarn_beta_fast = 32, c->yarn_beta_slow = 1, c->yarn_original_max = 65536, c->rope_scale = 1;
    for (int l = 0; l < layers; l++) {   /* Flash [0, 0] + [4, 128] * 20 + [4]; Pro [128, 128] + [4, 128] * 29 + [4] */
        c->compress_ratio[l] = l < 2 ? (pro ? 128 : 0) : l % 2 ? 128 : 4;
        c->attn_kind[l] = c->compress_ratio[l] == 0 ? ATTN_SLIDING : c->compress_ratio[l] == 128 ? ATTN_HCA : ATTN_CSA;
    }
}

/* n random floats in [lo, hi), owned by m. */
static float *bench_floats(Model *m, size_t n, float lo, float hi, uint64_t *rng) {
    float *v = model_keep(m, xcalloc(n, sizeof(float)));
    for (size_t i = 0; i < n; i++) v[i] = lo + (hi - lo) * random_float(rng);
    return v;
}

/* A linear layer of the given format and shape with no data: the upload makes random weights. */
static Linear bench_linear(WeightFormat format, int rows, int cols) {
    return (Linear){format, rows, cols, NULL, NULL, 0, 0.01f};
}

/* The benchmark's model: V4-Flash's or V4-Pro's shapes and formats (with `experts` routed
   experts, 0: the model's own, and a vocabulary of `vocab`), small tensors random on the host;
   the matrices have no data (the upload makes random ones on the GPU). */
static void bench_model(Model *m, ModelShape shape, int layers, int experts, int vocab) {
    memset(m, 0, sizeof *m);
    Config *c = &m->config;
    bench_config(c, shape, layers);
    if (experts) c->n_experts = experts;
    c->vocab_size = vocab;
    uint64_t rng = 12345;
    int E = c->hidden_size, Q = c->q_lora_rank, D = c->head_dim, HD = c->n_heads * D, I = c->moe_inter;
    int X = c->n_experts, mix = (2 + HC) * HC, GO = c->o_groups * c->o_lora_rank;
    m->embed = (Tensor){.dtype = DT_BF16, .nbytes = (size_t)c->vocab_size * E * 2};
    m->head = bench_linear(FMT_BF16, c->vocab_size, E);
    m->norm = bench_floats(m, (size_t)E, 0.9f, 1.1f, &rng);
    m->hc_head = (HcParams){bench_floats(m, (size_t)HC * HC * E, -0.01f, 0.01f, &rng), bench_floats(m, HC, -0.1f, 0.1f, &rng),
                            bench_floats(m, 1, 0.5f, 1, &rng)};
    m->layers = xcalloc((size_t)layers, sizeof(Layer));
    for (int l = 0; l < layers; l++) {
        Layer *L = &m->layers[l];
        L->attn_norm = bench_floats(m, (size_t)E, 0.9f, 1.1f, &rng);
        L->ffn_norm = bench_floats(m, (size_t)E, 0.9f, 1.1f, &rng);
        HcParams *sites[2] = {&L->hc_attn, &L->hc_ffn};
        for (int k = 0; k < 2; k++)
            *sites[k] = (HcParams){bench_floats(m, (size_t)mix * HC * E, -0.01f, 0.01f, &rng),
                                   bench_floats(m, (size_t)mix, -0.1f, 0.1f, &rng), bench_floats(m, 3, 0.5f, 1, &rng)};
        L->wq_a = bench_linear(FMT_FP8, Q, E);
        L->q_norm = bench_floats(m, (size_t)Q, 0.9f, 1.1f, &rng);
        L->wq_b = bench_linear(FMT_FP8, HD, Q);
        L->wkv = bench_linear(FMT_FP8, D, E);
        L->kv_norm = bench_floats(m, (size_t)D, 0.9f, 1.1f, &rng);
        L->wo_a = bench_linear(FMT_FP8, GO, HD / c->o_groups);
        L->wo_b = bench_linear(FMT_FP8, E, GO);
        L->attn_sink = bench_floats(m, (size_t)c->n_heads, -1, 1, &rng);
        int ratio = c->compress_ratio[l], parts = c->attn_kind[l] == ATTN_CSA ? 2 : 1;
        if (ratio) {
            L->compressor = (Compressor){bench_linear(FMT_BF16, parts * D, E), bench_linear(FMT_BF16, parts * D, E),
                                         bench_floats(m, (size_t)ratio * parts * D, -1, 1, &rng),
                                         bench_floats(m, (size_t)D, 0.9f, 1.1f, &rng)};
        }
        if (c->attn_kind[l] == ATTN_CSA) {
            int DI = c->index_dim;
            L->index_wq_b = bench_linear(FMT_FP8, c->index_heads * DI, Q);
            L->index_weights_proj = bench_linear(FMT_BF16, c->index_heads, E);
            L->index_compressor = (Compressor){bench_linear(FMT_BF16, 2 * DI, E), bench_linear(FMT_BF16, 2 * DI, E),
                                               bench_floats(m, (size_t)ratio * 2 * DI, -1, 1, &rng),
                                               bench_floats(m, (size_t)DI, 0.9f, 1.1f, &rng)};
        }
        L->gate = bench_linear(FMT_BF16, X, E);
        if (is_hash_layer(c, l)) {
            L->tid2eid = model_keep(m, xcalloc((size_t)c->vocab_size * c->topk, sizeof(int32_t)));
            for (size_t i = 0; i < (size_t)c->vocab_size * c->topk; i++) L->tid2eid[i] = (int32_t)(random_u32(&rng) % X);
        } else {
            L->gate_bias = bench_floats(m, (size_t)X, -0.1f, 0.1f, &rng);
        }
        ExpertStack *stacks[3] = {&L->w1, &L->w2, &L->w3};
        for (int k = 0; k < 3; k++) {
            *stacks[k] = (ExpertStack){FMT_NVFP4, k == 1 ? E : I, k == 1 ? I : E, 0, NULL, NULL, NULL};
            stacks[k]->weight = model_keep(m, xcalloc((size_t)X, sizeof(void *)));
            stacks[k]->scale = model_keep(m, xcalloc((size_t)X, sizeof(void *)));
            stacks[k]->global_scale = bench_floats(m, (size_t)X, 0.005f, 0.02f, &rng);
        }
        L->shared_w1 = bench_linear(FMT_FP8, I, E);
        L->shared_w2 = bench_linear(FMT_FP8, E, I);
        L->shared_w3 = bench_linear(FMT_FP8, I, E);
    }
}

/* Bytes one decode step at `pos` reads: every weight it uses (the token's embedding row, the
   non-expert linears, K routed experts and the shared one per layer, the mHC matrices, the
   head) and the cache its queries read (window keys, selected or all compressed entries, the
   indexer's keys). */
static void bench_bytes(const Model *m, int pos, double *weights, double *cache) {
    const Config *c = &m->config;
    int D = c->head_dim, W = c->sliding_window, window = pos + 1 < W ? pos + 1 : W;
    *weights = (double)embed_row_bytes(m) + (double)m->head.rows * linear_row_bytes(&m->head);
    *cache = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        const Linear *list[16];
        int n = layer_linears(L, list);
        for (int i = 0; i < n; i++) *weights += (double)list[i]->rows * linear_row_bytes(list[i]) + linear_scale_bytes(list[i]);
        const ExpertStack *stacks[3] = {&L->w1, &L->w2, &L->w3};
        for (int k = 0; k < 3; k++) {
            Linear one = {stacks[k]->format, stacks[k]->rows, stacks[k]->cols, NULL, NULL, 0, 1};
            *weights += (double)c->topk * ((double)one.rows * linear_row_bytes(&one) + linear_scale_bytes(&one));
        }
        *weights += 2.0 * (2 + HC) * HC * HC * c->hidden_size * 4;
        int ratio = c->compress_ratio[l], visible = ratio ? (pos + 1) / ratio : 0;
        *cache += (double)window * D * 4;
        if (c->attn_kind[l] == ATTN_HCA) *cache += (double)visible * D * 4;
        if (c->attn_kind[l] == ATTN_CSA)
            *cache += (double)(visible < c->index_topk ? visible : c->index_topk) * D * 4 + (double)visible * c->index_dim * 4;
    }
}

/* Median of n floats (sorted in place). */
static float median(float *v, int n) {
    qsort(v, (size_t)n, sizeof *v, compare_float);
    return v[n / 2];
}

/* Milliseconds of one decode-graph replay, median of `steps` (each timed with events). */
static float bench_decode_ms(int steps) {
    float *t = xcalloc((size_t)steps, sizeof(float));
    CUevent start, end;
    CU_CHECK(cu.cuEventCreate(&start, CU_EVENT_DEFAULT));
    CU_CHECK(cu.cuEventCreate(&end, CU_EVENT_DEFAULT));
    for (int i = 0; i < steps; i++) {
        CU_CHECK(cu.cuEventRecord(start, gpu->stream));
        gpu_replay_decode();   /* GPU 0's graph waits for the others' parts: its time is the step's */
        CU_CHECK(cu.cuEventRecord(end, gpu->stream));
        CU_CHECK(cu.cuEventSynchronize(end));
        CU_CHECK(cu.cuEventElapsedTime(&t[i], start, end));
    }
    CU_CHECK(cu.cuEventDestroy(start));
    CU_CHECK(cu.cuEventDestroy(end));
    stream_check();   /* a step whose streamed experts never came has no time worth printing */
    float ms = median(t, steps);
    free(t);
    return ms;
}

typedef struct { const GpuLinear *head; GemvHc site; CUdeviceptr y; } HeadRun;
static void head_call(void *arg, int i) {
    (void)i;
    HeadRun *r = arg;
    GemvPart part = {r->head, 0, r->y, NULL};
    gpu_gemv_parts(&part, 1, &r->site);
}

/* One sample_token launch over the last logits (the position does not advance). */
typedef struct { const Sampler *sampler; int V; } SampleRun;
static void sample_call(void *arg, int i) {
    (void)i;
    SampleRun *r = arg;
    gpu_sample(r->sampler, r->V, 0, 0);
}

/* Bytes a decode step read from host memory, on average over the `steps` steps between two
   hit counts (before, after [L, X]: gpu_expert_hits): the chosen routed experts that are there
   (counted by the hits), and one embedding row when the table is there (gpu_lay_out). */
static double bench_host_bytes(const Model *m, const uint64_t *before, const uint64_t *after, int steps) {
    const Config *c = &m->config;
    double bytes = host_address(gm->embed) ? (double)steps * embed_row_bytes(m) : 0;
    for (int l = 0; l < c->n_layers; l++) {
        size_t device, read;
        expert_bytes(&m->layers[l], &device, &read);
        for (int e = 0; e < c->n_experts; e++) {
            size_t i = (size_t)l * c->n_experts + e;
            if (gm->on_device && !gm->on_device[i]) bytes += (double)(after[i] - before[i]) * read;
        }
    }
    return bytes / steps;
}

/* Decode again with skewed routing, as a profile would place the experts: the router's bias of
   every routed layer raised by `lift` for the experts in device memory (the 3 hash layers keep
   their uniform tables), for two lifts; prints the share of choices that fell on device
   experts, the speed and the bytes over PCIe; the uniform biases are restored. */
static void bench_skewed(const Model *m, int steps) {
    const Config *c = &m->config;
    int L = c->n_layers, X = c->n_experts;
    size_t n = (size_t)L * X;
    float lifts[2] = {0.05f, 0.2f}, *bias = xcalloc((size_t)X, sizeof(float));
    uint64_t *before = xcalloc(n, sizeof(uint64_t)), *after = xcalloc(n, sizeof(uint64_t));
    for (int pass = 0; pass <= 2; pass++) {   /* two lifts, then the uniform biases back */
        for (int l = c->n_hash_layers; l < L; l++) {
            for (int e = 0; e < X; e++)
                bias[e] = m->layers[l].gate_bias[e] + (pass < 2 && gm->on_device[(size_t)l * X + e] ? lifts[pass] : 0);
            gpu_upload(gm->layers[l].gate_bias, bias, (size_t)X * sizeof(float));
        }
        if (pass == 2) break;
        gpu_expert_hits(before, L, X);
        float ms = bench_decode_ms(steps);
        gpu_expert_hits(after, L, X);
        double chosen = 0, on_gpu = 0;
        for (size_t i = 0; i < n; i++) {
            chosen += (double)(after[i] - before[i]);
            on_gpu += gm->on_device[i] ? (double)(after[i] - before[i]) : 0;
        }
        printf("skewed   router bias +%.2f for the experts on the GPU (not the hash layers): %.0f%% of the choices on "
               "the GPU; %.3f ms/token, %.1f tok/s, %.1f MB a token from host memory\n", lifts[pass], 100 * on_gpu / chosen,
               ms, 1000 / ms, bench_host_bytes(m, before, after, steps) / 1e6);
    }
    free(bias);
    free(before);
    free(after);
}

/* The split plan of `shape`'s whole model over 1, 2, 4 and 8 GPUs (split_plan, GPUs with peer
   access reading at this run's streaming rate, all-reduces taken as SPLIT_ALLREDUCE_US): the
   busiest GPU's bytes read a token and weights held, as --gpus N divides the model. */
static void bench_split(ModelShape shape, double stream_gbs) {
    Model whole;
    bench_model(&whole, shape, shape_layers[shape], 0, 129280);
    SplitCosts costs = {stream_gbs * 1e3, SPLIT_ALLREDUCE_US};
    char why[256];
    double read[4] = {0}, held[4] = {0};   /* the busiest GPU's of 1, 2, 4, 8 */
    int divided_from = 0;                  /* the fewest GPUs attention is divided over (0: never) */
    for (int i = 0; i < 4; i++) {
        SplitPlan plan;
        if (!split_plan(&whole, 1 << i, 1, costs, &plan, why, sizeof why)) fatal("the split plan of %d GPUs: %s", 1 << i, why);
        for (int r = 0; r < plan.n; r++) {
            read[i] = plan.rank[r].read_bytes > read[i] ? plan.rank[r].read_bytes : read[i];
            held[i] = plan.rank[r].held_bytes > held[i] ? plan.rank[r].held_bytes : held[i];
        }
        if (plan.attention_split && !divided_from) divided_from = plan.n;
    }
    char divided[32] = "never";
    if (divided_from) snprintf(divided, sizeof divided, "from %d GPUs on", divided_from);
    printf("split    planned (as --gpus divides it): the busiest of 1/2/4/8 GPUs reads %.2f / %.2f / "
           "%.2f / %.2f GB a token and holds %.1f / %.1f / %.1f / %.1f GB of weights; attention divided %s (all-reduces "
           "taken as %.0f us)\n", read[0] / 1e9, read[1] / 1e9, read[2] / 1e9, read[3] / 1e9, held[0] / 1e9, held[1] / 1e9,
           held[2] / 1e9, held[3] / 1e9, divided, SPLIT_ALLREDUCE_US);
    free_model(&whole);
}

/* The benchmark (see above) on `shape`'s model, within gpu_mem bytes of device memory (0: all it
   can), divided over `gpus` GPUs (0: one; gpu_load_ranks). */
static void bench(ModelShape shape, int layers, int position, size_t gpu_mem, int gpus) {
    char why[512], line[400];
    if (!gpu_open(why, sizeof why)) fatal("--bench needs a GPU: %s", why);
    if (gpus > 1 && !gpu_open_more(gpus, why, sizeof why)) fatal("--gpus %d: %s", gpus, why);
    pool_start(usable_cores());
    /* the ceilings, same card, same run (before the model takes the memory): a streaming read of
       2 GiB of device memory (on every GPU opened: each one's own), */
    StreamRun sr = {0, 0, (size_t)2 << 30};
    double stream_gbs_of[GPUS_MAX];
    for (int d = gpu_device_count - 1; d >= 0; d--) {   /* leaves GPU 0 current */
        gpu_use_device(d);
        sr.buf = gpu_alloc(sr.bytes), sr.out = gpu_alloc(4);
        CU_CHECK(cu.cuMemsetD8Async(sr.buf, 0x5a, sr.bytes, gpu->stream));
        stream_gbs_of[d] = sr.bytes / gpu_median_us(stream_call, &sr, 3) * 1e-3;
        gpu_free(sr.buf);
        if (d) gpu_free(sr.out);
    }
    double stream_gbs = stream_gbs_of[0];
    /* the SMs reading 2 GiB of mapped page-locked host memory (PCIe; the prefill's GEMMs read
       host-placed experts so), and the copy engine moving it to the device (decode streams them
       so: the ceiling of the pcie line) */
    void *host;
    CU_CHECK(cu.cuMemHostAlloc(&host, sr.bytes, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP));
    memset(host, 0x5a, sr.bytes);
    CU_CHECK(cu.cuMemHostGetDevicePointer(&sr.buf, host, 0));
    double pcie_gbs = sr.bytes / gpu_median_us(stream_call, &sr, 1) * 1e-3;
    CopyRun copy = {gpu_alloc(sr.bytes), host, sr.bytes};
    double copy_gbs = sr.bytes / gpu_median_us(copy_call, &copy, 1) * 1e-3;
    gpu_free(copy.dst);
    CU_CHECK(cu.cuMemFreeHost(host));
    gpu_free(sr.out);

    Model m;
    bench_model(&m, shape, layers, 0, 129280);
    const Config *c = &m.config;
    int chunk = 2048, steps = 48, ctx = position + 4 * steps + 16;   /* the steps of bench_skewed too */
    GpuBudget budget = {.device_cap = gpu_mem, .gpus = gpus};
    /* several GPUs: each rank fills its copy of the weights with its own random numbers (its
       values mean nothing); what each reads and launches, the step's time, is the real one's */
    SplitPlan plan;
    if (!split_plan(&m, gpus ? gpus : 1, 1, (SplitCosts){stream_gbs * 1e3, SPLIT_ALLREDUCE_US}, &plan, why, sizeof why))
        fatal("--gpus %d: %s", gpus, why);
    double upload = gpu_load_ranks(&m, chunk, ctx, 0, &budget, &plan);
    gpu_placement_line(line, sizeof line);
    char names[300];
    gpu_names(names, sizeof names);
    printf("nvfp4 --bench on %s (%d SMs, driver %d.%d), commit %s: %s shapes, %d layers, random weights "
           "made in %.1f s: %s\n", names, gpu->sm_count, gpu->driver_version / 1000, gpu->driver_version % 1000 / 10,
           NVFP4_COMMIT, shape_names[shape], layers, upload, line);
    if (plan.n > 1) {
        split_line(&m, &plan, line, sizeof line);
        printf("gpus     %s\n", line);
        double sum_us = gpu_choose_sums(c, line, sizeof line);
        printf("sums     %s; %d a step: %.3f ms\n", line, plan.allreduces, plan.allreduces * sum_us / 1000);
    }

    /* prefill: random tokens in chunks of 2048 */
    uint64_t rng = 99;
    int *ids = xcalloc((size_t)chunk, sizeof(int));
    State *s = &gm->state;
    CU_CHECK(cu.cuStreamSynchronize(gpu->stream));
    double start = now_seconds();
    while (s->pos < position) {
        int T = position - s->pos < chunk ? position - s->pos : chunk;
        for (int i = 0; i < T; i++) ids[i] = 2 + (int)(random_u32(&rng) % (unsigned)(c->vocab_size - 2));
        gpu_chunk(&m, s, ids, T, 0);
    }
    CU_CHECK(cu.cuStreamSynchronize(gpu->stream));
    double prefill_s = now_seconds() - start;

    /* decode: the graph, its kernels, its time */
    Sampler greedy = {.temperature = 0, .top_p = 1, .rng = 1};
    gpu_seed(rng);
    gpu_next_token(&m, s, &greedy, 0);
    long before = gpu_launches;
    gpu_capture_decode(&m, &greedy);
    long kernels = gpu_launches - before, fixed = 4;   /* embed, first mixes, head, sample */
    for (int i = 0; i < 4; i++) gpu_replay_decode();   /* warm-up */
    size_t n_hits = (size_t)layers * c->n_experts;
    uint64_t *hits_before = xcalloc(n_hits, sizeof(uint64_t)), *hits_after = xcalloc(n_hits, sizeof(uint64_t));
    gpu_expert_hits(hits_before, layers, c->n_experts);
    uint64_t copied = __atomic_load_n(&streamer.bytes, __ATOMIC_RELAXED);
    float ms = bench_decode_ms(steps - 4);
    copied = __atomic_load_n(&streamer.bytes, __ATOMIC_RELAXED) - copied;
    gpu_expert_hits(hits_after, layers, c->n_experts);
    double host_bytes = bench_host_bytes(&m, hits_before, hits_after, steps - 4);
    free(hits_before);
    free(hits_after);
    HeadRun head = {&gm->head, gemv_hc_site(&m.config, m.config.n_layers, 0), gpu_head_logits()};
    double head_ms = gpu_median_us(head_call, &head, 20) / 1000;
    Sampler nucleus = {.temperature = 0.6f, .top_p = 0.95f, .rng = 1};   /* the command line's default sampling */
    SampleRun greedy_run = {&greedy, c->vocab_size}, nucleus_run = {&nucleus, c->vocab_size};
    double greedy_us = gpu_median_us(sample_call, &greedy_run, 20), nucleus_us = gpu_median_us(sample_call, &nucleus_run, 20);

    double weights, cache;
    bench_bytes(&m, position, &weights, &cache);
    int busiest = 0;   /* several GPUs: the one reading most (its shares, counted as the split plan counts them) */
    for (int r = 0; r < plan.n && plan.n > 1; r++) {
        double read = rank_share_bytes(&m, &plan.rank[r], plan.attention_split, 0);
        if (r == 0 || read > weights) weights = read, busiest = r;
    }
    double device_bytes = weights + cache - host_bytes, layer_ms = (ms - head_ms) / layers;
    double gbs = device_bytes / (ms * 1e-3) / 1e9, host_gbs = host_bytes / (ms * 1e-3) / 1e9;
    printf("prefill  %d tokens in chunks of %d: %.0f tok/s\n", position, chunk, position / prefill_s);
    printf("decode   at position %d: %.3f ms/token, %.1f tok/s (median of %d graph replays)\n", position, ms, 1000 / ms,
           steps - 4);
    char on[48] = "";
    if (gpu_rank_count > 1) snprintf(on, sizeof on, " on GPU %d (the busiest)", busiest);
    printf("bytes    per token%s: %.1f MB of weights + %.1f MB of cache; %.1f MB of it from device memory, %.1f MB of "
           "routed experts (counted) and embedding rows from host memory\n", on, weights / 1e6, cache / 1e6,
           device_bytes / 1e6, host_bytes / 1e6);
    printf("speed    %.0f GB/s from device memory; streaming read %.0f GB/s: %.0f%% of it\n", gbs, stream_gbs,
           100 * gbs / stream_gbs);
    for (int r = 0; r < plan.n && plan.n > 1; r++) {   /* each GPU against its own streaming read */
        double bytes = rank_share_bytes(&m, &plan.rank[r], plan.attention_split, 0) + cache, rank_gbs = bytes / (ms * 1e-3) / 1e9;
        int d = gpu_ranks[r].device;
        printf("gpu %d    %.1f MB a token (weights and cache), %.0f GB/s; its streaming read %.0f GB/s: %.0f%% of it\n", d,
               bytes / 1e6, rank_gbs, stream_gbs_of[d], 100 * rank_gbs / stream_gbs_of[d]);
    }
    if (placed.host_experts)
        printf("pcie     %.1f GB/s from host memory (the copy thread moved %.1f MB a token); copy engine %.1f GB/s: %.0f%% "
               "of it (SMs reading mapped host memory %.1f GB/s)\n", host_gbs, copied / (steps - 4.0) / 1e6, copy_gbs,
               100 * host_gbs / copy_gbs, pcie_gbs);
    printf("kernels  %ld per decode step, %.1f per layer\n", kernels, (double)(kernels - fixed) / layers);
    printf("sampling %.0f us greedy (the step above), %.0f us at the default --temp 0.6 --top-p 0.95 (one launch each)\n",
           greedy_us, nucleus_us);
    if (placed.host_experts) bench_skewed(&m, steps - 4);
    int all = shape_layers[shape];
    if (layers < all)
        printf("project  %d layers (%s): %.2f ms/token (head %.3f ms + %d x %.3f ms a layer)\n", all, shape_names[shape],
               head_ms + all * layer_ms, head_ms, all, layer_ms);
    bench_split(shape, stream_gbs);

    /* where a step's time goes: 8 steps launched one kernel at a time, each timed on its own (one
       GPU: on several, a GPU's sum would wait for parts the host has not launched yet) */
    double per_kernel[K_COUNT] = {0};
    int order[K_COUNT], profiled = gpu_device_count > 1 ? 0 : 8;
    gpu_kernel_ms = per_kernel;
    for (int i = 0; i < profiled; i++) {
        gpu_decode(&m);
        gpu_sample(&greedy, c->vocab_size, 0, 1);
    }
    gpu_kernel_ms = NULL;
    for (int k = 0; k < K_COUNT; k++) order[k] = k;
    for (int a = 0; a < K_COUNT; a++)   /* by time, largest first */
        for (int b = a + 1; b < K_COUNT; b++)
            if (per_kernel[order[b]] > per_kernel[order[a]]) { int t = order[a]; order[a] = order[b]; order[b] = t; }
    if (profiled) printf("kernels  time of a step by kernel, each launched alone (adds launch gaps the graph hides):\n");
    for (int i = 0; i < K_COUNT && profiled && per_kernel[order[i]] > 0; i++)
        printf("         %-18s %8.3f ms\n", kernel_info[order[i]].name, per_kernel[order[i]] / profiled);
    free(ids);
    gpu_unload();
    gpu_close();
    free_model(&m);
}

/* ==================================================================================== JSON */
/* A small DOM parser for RFC 8259 JSON, used for config.json, tokenizer.json and safetensors
   headers.  The whole document becomes a tree of Json nodes; arrays and objects hold their
   children in one contiguous `items` array (objects also hold a parallel `keys` array), so a
   128k-member object costs one allocation for the values and one per key string.

   Input is `n` bytes that need not be NUL-terminated.  Any malformed input yields NULL and a
   message "not valid JSON: line L, column C: what" -- never a crash, never a read past `n`.  Nesting deeper than
   JSON_MAX_DEPTH is refused so hostile input cannot exhaust the stack.  Strings decode \uXXXX
   escapes (surrogate pairs included, lone surrogates refused) to UTF-8; raw bytes >= 0x80 are
   copied as they are, without UTF-8 validation.

   A key repeated in one object, which RFC 8259 allows, is refused at any depth, naming its key
   path ("rope_scaling.factor", "added_tokens[3].content"): Python keeps the last, json_get would
   find the first, so the file would mean two things.  Each object's keys go through a hash, so
   the check is linear in the size of the text.  So is \u0000 in a key or a string, naming the
   same path: C strings end there ("BF16\u0000x" would read as the dtype "BF16", a tensor name
   or key would match its prefix), and none of nvfp4's files holds one legitimately (a
   byte-level BPE vocabulary spells byte 0 as U+0100). */

#define JSON_MAX_DEPTH 64

typedef struct {
    const char *text;     /* the whole document */
    size_t n;             /* its length in bytes */
    size_t pos;           /* next unread byte */
    int depth;            /* arrays/objects currently open */
    char *err;            /* message buffer supplied by the caller */
    size_t errlen;
    int failed;           /* set once the first error has been recorded */
    struct {              /* per open container, the member being read: for the key path */
        const char *key;  /* its key, or NULL in an array */
        size_t index;     /* its index in an array */
    } at[JSON_MAX_DEPTH];
} JsonParser;

/* Records the first error for the current position (columns count bytes, starting at 1):
   "not valid JSON: line L, column C: message" when the text is malformed, "message (line L,
   column C)" when it is refused (`refused`: valid JSON that json_parse does not take).  Later
   errors are ignored so the root cause is reported.  Always returns 0 so callers can write
   `return json_report(...)`. */
static int json_report(JsonParser *p, int refused, const char *fmt, va_list args) {
    if (p->failed) return 0;
    p->failed = 1;
    if (!p->err || p->errlen == 0) return 0;
    size_t line = 1, column = 1;
    for (size_t i = 0; i < p->pos && i < p->n; i++) {
        if (p->text[i] == '\n') { line++; column = 1; } else column++;
    }
    char what[512];
    vsnprintf(what, sizeof what, fmt, args);
    if (refused) snprintf(p->err, p->errlen, "%s (line %zu, column %zu)", what, line, column);
    else snprintf(p->err, p->errlen, "not valid JSON: line %zu, column %zu: %s", line, column, what);
    return 0;
}

/* json_report for malformed text. */
static int json_fail(JsonParser *p, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    json_report(p, 0, fmt, args);
    va_end(args);
    return 0;
}

/* json_report for valid JSON that is refused (a repeated key, \u0000). */
static int json_refuse(JsonParser *p, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    json_report(p, 1, fmt, args);
    va_end(args);
    return 0;
}

/* The key path of what is read at nesting depth `levels` (the keys and array indices of the
   members the open containers are reading, outermost first), then `last` when not NULL:
   "rope_scaling.factor", "added_tokens[3].content".  Into out[n], cut to fit. */
static void json_path(const JsonParser *p, int levels, const char *last, char *out, size_t n) {
    size_t used = 0;
    out[0] = '\0';
    for (int d = 0; d <= levels && used < n; d++) {
        const char *key = d < levels ? p->at[d].key : last;
        int wrote;
        if (d == levels && !last) break;
        if (key) wrote = snprintf(out + used, n - used, "%s%s", used ? "." : "", key);
        else wrote = snprintf(out + used, n - used, "[%zu]", p->at[d].index);
        used = wrote < 0 ? n : used + (size_t)wrote;
    }
}

/* Advances past JSON whitespace (space, tab, CR, LF). */
static void json_skip_space(JsonParser *p) {
    while (p->pos < p->n) {
        char c = p->text[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

/* Frees everything a node owns (not the node itself, which lives in its parent's array). */
static void json_free_children(Json *node) {
    if (node->type == JSON_STRING) free(node->string);
    if (node->type == JSON_ARRAY || node->type == JSON_OBJECT) {
        for (size_t i = 0; i < node->length; i++) {
            json_free_children(&node->items[i]);
            if (node->keys) free(node->keys[i]);
        }
        free(node->items);
        free(node->keys);
    }
}

/* Frees a tree returned by json_parse.  NULL is allowed. */
static void json_free(Json *root) {
    if (!root) return;
    json_free_children(root);
    free(root);
}

/* Reads exactly four hex digits at the current position into *value.  Returns 1, or 0 with an
   error if fewer than four hex digits follow. */
static int json_read_hex4(JsonParser *p, unsigned *value) {
    if (p->n - p->pos < 4) return json_fail(p, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->text[p->pos + (size_t)i];
        unsigned digit;
        if (c >= '0' && c <= '9') digit = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') digit = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') digit = (unsigned)(c - 'A' + 10);
        else return json_fail(p, "invalid hex digit in \\u escape");
        v = v * 16 + digit;
    }
    p->pos += 4;
    *value = v;
    return 1;
}


/* Parses a string (an object's key when `is_key`) whose opening quote is at the current
   position.  On success stores a fresh NUL-terminated buffer in *out and its byte length in
   *out_length and returns 1; on error (\u0000 included) returns 0 with nothing allocated.
   Decoding never grows the text (an escape of k bytes yields at most k bytes), so one buffer
   of the raw span's size suffices. */
static int json_parse_string(JsonParser *p, char **out, size_t *out_length, int is_key) {
    p->pos++; /* opening quote */
    size_t start = p->pos, end = start;
    while (end < p->n && p->text[end] != '"') {
        if (p->text[end] == '\\') end++; /* the escaped byte cannot close the string */
        end++;
    }
    if (end >= p->n) return json_fail(p, "unterminated string");
    char *buffer = malloc(end - start + 1);
    if (!buffer) return json_fail(p, "out of memory");
    size_t length = 0;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->text[p->pos];
        if (c < 0x20) { free(buffer); return json_fail(p, "control character in string"); }
        if (c != '\\') { buffer[length++] = (char)c; p->pos++; continue; }
        size_t escape_at = p->pos++;
        char escape = p->text[p->pos++]; /* exists: the scan above never ends on a backslash */
        switch (escape) {
        case '"': buffer[length++] = '"'; break;
        case '\\': buffer[length++] = '\\'; break;
        case '/': buffer[length++] = '/'; break;
        case 'b': buffer[length++] = '\b'; break;
        case 'f': buffer[length++] = '\f'; break;
        case 'n': buffer[length++] = '\n'; break;
        case 'r': buffer[length++] = '\r'; break;
        case 't': buffer[length++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (!json_read_hex4(p, &cp)) { free(buffer); return 0; }
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                free(buffer);
                return json_fail(p, "lone low surrogate in \\u escape");
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned low;
                if (end - p->pos < 6 || p->text[p->pos] != '\\' || p->text[p->pos + 1] != 'u') {
                    free(buffer);
                    return json_fail(p, "lone high surrogate in \\u escape");
                }
                p->pos += 2;
                if (!json_read_hex4(p, &low)) { free(buffer); return 0; }
                if (low < 0xDC00 || low > 0xDFFF) {
                    free(buffer);
                    return json_fail(p, "high surrogate not followed by a low surrogate");
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            if (cp == 0) {   /* the path of a key ends with the part before the NUL */
                char path[256];
                buffer[length] = '\0';
                json_path(p, is_key ? p->depth - 1 : p->depth, is_key ? buffer : NULL, path, sizeof path);
                p->pos = escape_at;
                if (is_key) json_refuse(p, "key \"%s\\u0000...\" holds a NUL character", path);
                else json_refuse(p, "the value of \"%s\", \"%.60s\\u0000...\", holds a NUL character", path, buffer);
                free(buffer);
                return 0;
            }
            length += utf8_encode(buffer + length, cp);
            break;
        }
        default:
            p->pos--;
            free(buffer);
            return json_fail(p, "invalid escape '\\%c'", escape);
        }
    }
    p->pos = end + 1;
    buffer[length] = '\0';
    *out = buffer;
    *out_length = length;
    return 1;
}

/* Parses a number at the current position, checking the strict JSON grammar
   -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? and then converting with strtod on a
   NUL-terminated copy.  Returns 1 and stores the value, or 0 with an error. */
static int json_parse_number(JsonParser *p, double *value) {
    const char *s = p->text;
    size_t start = p->pos, i = p->pos, n = p->n;
    if (i < n && s[i] == '-') i++;
    if (i < n && s[i] == '0') i++;
    else if (i < n && s[i] >= '1' && s[i] <= '9') { while (i < n && s[i] >= '0' && s[i] <= '9') i++; }
    else { p->pos = i; return json_fail(p, "invalid number"); }
    if (i < n && s[i] == '.') {
        i++;
        if (i >= n || s[i] < '0' || s[i] > '9') { p->pos = i; return json_fail(p, "expected digit after '.'"); }
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= n || s[i] < '0' || s[i] > '9') { p->pos = i; return json_fail(p, "expected digit in exponent"); }
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    size_t length = i - start;
    char small[64];
    char *copy = length < sizeof small ? small : malloc(length + 1);
    if (!copy) return json_fail(p, "out of memory");
    memcpy(copy, s + start, length);
    copy[length] = '\0';
    *value = strtod(copy, NULL);
    if (copy != small) free(copy);
    p->pos = i;
    return 1;
}

/* Checks that the literal `word` (true/false/null) is at the current position and skips it. */
static int json_expect_word(JsonParser *p, const char *word) {
    size_t length = strlen(word);
    if (p->n - p->pos < length || memcmp(p->text + p->pos, word, length) != 0)
        return json_fail(p, "invalid literal, expected '%s'", word);
    p->pos += length;
    return 1;
}

static int json_parse_value(JsonParser *p, Json *out);

/* Grows the child arrays of a container being built so that one more member fits.  `keys` is
   NULL for arrays.  Returns 1, or 0 with an error on allocation failure (the old arrays stay
   valid and owned by the caller). */
static int json_reserve(JsonParser *p, Json **items, char ***keys, size_t count, size_t *capacity) {
    if (count < *capacity) return 1;
    size_t grown = *capacity ? *capacity * 2 : 8;
    if (grown > SIZE_MAX / sizeof(Json)) return json_fail(p, "out of memory");
    Json *new_items = realloc(*items, grown * sizeof(Json));
    if (!new_items) return json_fail(p, "out of memory");
    *items = new_items;
    if (keys) {
        char **new_keys = realloc(*keys, grown * sizeof(char *));
        if (!new_keys) return json_fail(p, "out of memory");
        *keys = new_keys;
    }
    *capacity = grown;
    return 1;
}

/* Adds `key` (`length` bytes), the key of member `count` of an object whose earlier keys are
   keys[0..count), to the object's hash *slots (member index + 1 by key hash, 0 = empty; *mask
   + 1 slots, grown to stay at most half full).  Returns 1, or 0 with an error naming the key
   path when an earlier key is the same. */
static int json_add_key(JsonParser *p, char *const *keys, size_t count, const char *key, size_t length,
                        size_t **slots, size_t *mask) {
    if (!*slots || 2 * (count + 1) > *mask + 1) {
        size_t size = *slots ? 2 * (*mask + 1) : 16;
        size_t *grown = size <= SIZE_MAX / sizeof *grown ? calloc(size, sizeof *grown) : NULL;
        if (!grown) return json_fail(p, "out of memory");
        for (size_t i = 0; i < count; i++) {
            size_t s = hash_bytes(keys[i], strlen(keys[i])) & (size - 1);
            while (grown[s]) s = (s + 1) & (size - 1);
            grown[s] = i + 1;
        }
        free(*slots);
        *slots = grown;
        *mask = size - 1;
    }
    size_t s = hash_bytes(key, length) & *mask;
    for (; (*slots)[s]; s = (s + 1) & *mask)
        if (!strcmp(keys[(*slots)[s] - 1], key)) {
            char path[256];
            json_path(p, p->depth - 1, key, path, sizeof path);
            return json_refuse(p, "key \"%s\" appears twice", path);
        }
    (*slots)[s] = count + 1;
    return 1;
}

/* Parses an array or object whose opening bracket is at the current position into *out.
   On error everything parsed so far is freed and 0 is returned. */
static int json_parse_container(JsonParser *p, Json *out) {
    int is_object = p->text[p->pos] == '{';
    char closer = is_object ? '}' : ']';
    if (++p->depth > JSON_MAX_DEPTH) return json_fail(p, "nesting deeper than %d", JSON_MAX_DEPTH);
    p->pos++;
    /* Build inside *out as we go so that one json_free_children cleans up any failure. */
    out->type = is_object ? JSON_OBJECT : JSON_ARRAY;
    size_t capacity = 0, *slots = NULL, mask = 0;   /* slots, mask: the hash of an object's keys */
    json_skip_space(p);
    if (p->pos < p->n && p->text[p->pos] == closer) {
        p->pos++;
        p->depth--;
        return 1;
    }
    for (;;) {
        if (!json_reserve(p, &out->items, is_object ? &out->keys : NULL, out->length, &capacity))
            goto fail;
        char *key = NULL;
        if (is_object) {
            json_skip_space(p);
            if (p->pos >= p->n || p->text[p->pos] != '"') { json_fail(p, "expected string key"); goto fail; }
            size_t key_length, key_at = p->pos;
            if (!json_parse_string(p, &key, &key_length, 1)) goto fail;
            size_t after_key = p->pos;
            p->pos = key_at;   /* a repeated key is reported where it starts */
            if (!json_add_key(p, out->keys, out->length, key, key_length, &slots, &mask)) { free(key); goto fail; }
            p->pos = after_key;
            json_skip_space(p);
            if (p->pos >= p->n || p->text[p->pos] != ':') { free(key); json_fail(p, "expected ':'"); goto fail; }
            p->pos++;
        }
        p->at[p->depth - 1].key = key;
        p->at[p->depth - 1].index = out->length;
        Json *item = &out->items[out->length];
        memset(item, 0, sizeof *item);
        if (!json_parse_value(p, item)) { free(key); goto fail; }
        if (is_object) out->keys[out->length] = key;
        out->length++;
        json_skip_space(p);
        if (p->pos >= p->n) { json_fail(p, "unexpected end of input, expected ',' or '%c'", closer); goto fail; }
        char c = p->text[p->pos];
        if (c == closer) { p->pos++; break; }
        if (c != ',') { json_fail(p, "expected ',' or '%c'", closer); goto fail; }
        p->pos++;
    }
    free(slots);
    p->depth--;
    return 1;
fail:
    free(slots);
    json_free_children(out);
    memset(out, 0, sizeof *out);
    return 0;
}

/* Parses one value (after optional whitespace) into *out, which must be zeroed.  Returns 1, or
   0 with an error and *out owning nothing. */
static int json_parse_value(JsonParser *p, Json *out) {
    json_skip_space(p);
    if (p->pos >= p->n) return json_fail(p, "unexpected end of input, expected a value");
    char c = p->text[p->pos];
    switch (c) {
    case '{': case '[':
        return json_parse_container(p, out);
    case '"':
        out->type = JSON_STRING;
        return json_parse_string(p, &out->string, &out->length, 0);
    case 't':
        out->type = JSON_BOOL;
        out->number = 1;
        return json_expect_word(p, "true");
    case 'f':
        out->type = JSON_BOOL;
        return json_expect_word(p, "false");
    case 'n':
        out->type = JSON_NULL;
        return json_expect_word(p, "null");
    default:
        if (c == '-' || (c >= '0' && c <= '9')) {
            out->type = JSON_NUMBER;
            return json_parse_number(p, &out->number);
        }
        return json_fail(p, "unexpected character, expected a value");
    }
}

/* Parses `n` bytes of JSON (not necessarily NUL-terminated).  Returns a tree owned by the
   caller (free with json_free), or NULL with "not valid JSON: line L, column C: what" or
   "what (line L, column C)" (a repeated key, \u0000) in err[errlen] (err may be NULL), for the caller
   to print after the name of the file.  Anything but whitespace after the value is an error. */
static Json *json_parse(const char *text, size_t n, char *err, size_t errlen) {
    JsonParser parser = { .text = text, .n = n, .err = err, .errlen = errlen };
    if (err && errlen) err[0] = '\0';
    Json *root = calloc(1, sizeof *root);
    if (!root) { json_fail(&parser, "out of memory"); return NULL; }
    if (!text && n) { json_fail(&parser, "no input"); free(root); return NULL; }
    if (!json_parse_value(&parser, root)) { free(root); return NULL; }
    json_skip_space(&parser);
    if (parser.pos != n) {
        json_fail(&parser, "unexpected trailing characters");
        json_free(root);
        return NULL;
    }
    return root;
}

/* Returns member `key` of object `obj`, or NULL if absent or `obj` is NULL or not an object
   (json_parse refuses an object that repeats a key, so there is one at most, and a key that
   holds \u0000, so C strings compare whole keys).  Linear search: meant for small config
   objects. */
static const Json *json_get(const Json *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < obj->length; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

/* Read and parse a JSON file, or fatal naming the file and the position of the error. */
static Json *load_json_file(const char *path) {
    size_t size;
    char *text = read_file(path, &size);
    if (!text) fatal("cannot read %s: %s", path, errno == EINVAL ? "not a regular file" : strerror(errno));
    char err[400];
    Json *root = json_parse(text, size, err, sizeof err);
    free(text);
    if (!root) fatal("%s: %s", path, err);
    return root;
}


/* ============================================================================== safetensors */
/* A safetensors file: u64 little-endian header length N, N bytes of JSON
   {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
   then the data; offsets are relative to the end of the header. Every file is mapped read-only
   and every tensor checked against it before anything reads it. */

#define MAX_HEADER_BYTES ((uint64_t)1 << 30)

/* qsort order of tensor pointers by where their data starts. */
static int compare_tensor_start(const void *a, const void *b) {
    const uint8_t *x = (*(const Tensor *const *)a)->data, *y = (*(const Tensor *const *)b)->data;
    return x < y ? -1 : x > y;
}

/* Parse the header of a mapped safetensors file of `size` bytes. Appends its tensors to
   *tensors (growing *count / *cap); `file` is recorded in each. Returns NULL on success or a
   message (static storage in err) naming what is wrong. */
static const char *safetensors_parse(const uint8_t *map, size_t size, int file, Tensor **tensors,
                                     size_t *count, size_t *cap, char *err, size_t errlen) {
    if (size < 8) { snprintf(err, errlen, "file is %zu bytes, shorter than the 8-byte header length", size); return err; }
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = header_len << 8 | map[i];
    if (header_len > size - 8 || header_len > MAX_HEADER_BYTES) {
        snprintf(err, errlen, "header length %llu does not fit in the file (%zu bytes)",
                 (unsigned long long)header_len, size);
        return err;
    }
    char jerr[400];
    Json *root = json_parse((const char *)map + 8, header_len, jerr, sizeof jerr);
    if (!root) { snprintf(err, errlen, "header: %s", jerr); return err; }
    if (root->type != JSON_OBJECT) { json_free(root); snprintf(err, errlen, "header is not a JSON object"); return err; }
    const uint8_t *data = map + 8 + header_len;
    size_t data_size = size - 8 - header_len;
    size_t first = *count;
    for (size_t i = 0; i < root->length; i++) {
        const char *name = root->keys[i];
        const Json *entry = &root->items[i];
        if (!strcmp(name, "__metadata__")) continue;
        const Json *dtype = json_get(entry, "dtype"), *shape = json_get(entry, "shape"),
                   *offsets = json_get(entry, "data_offsets");
        if (!dtype || dtype->type != JSON_STRING || !shape || shape->type != JSON_ARRAY || !offsets ||
            offsets->type != JSON_ARRAY || offsets->length != 2) {
            snprintf(err, errlen, "tensor %s: needs \"dtype\", \"shape\" and two \"data_offsets\"", name);
            goto fail;
        }
        Tensor t = {0};
        t.file = file;
        t.dtype = DT_COUNT;
        for (int d = 0; d < DT_COUNT; d++)
            if (!strcmp(dtype->string, dtype_names[d])) t.dtype = (DType)d;
        if (t.dtype == DT_COUNT) { snprintf(err, errlen, "tensor %s: unknown dtype %s", name, dtype->string); goto fail; }
        if (shape->length > 4) { snprintf(err, errlen, "tensor %s: %zu dimensions (at most 4)", name, shape->length); goto fail; }
        t.ndim = (int)shape->length;
        size_t elements = 1;
        for (int d = 0; d < t.ndim; d++) {
            double v = shape->items[d].number;
            if (shape->items[d].type != JSON_NUMBER || v < 0 || v != floor(v) || v > 9.0e15) {
                snprintf(err, errlen, "tensor %s: bad shape entry", name);
                goto fail;
            }
            t.shape[d] = (int64_t)v;
            if (t.shape[d] && elements > SIZE_MAX / 16 / (size_t)t.shape[d]) {
                snprintf(err, errlen, "tensor %s: shape product overflows", name);
                goto fail;
            }
            elements *= (size_t)t.shape[d];
        }
        t.nbytes = elements * dtype_sizes[t.dtype];
        double begin = offsets->items[0].number, end = offsets->items[1].number;
        if (offsets->items[0].type != JSON_NUMBER || offsets->items[1].type != JSON_NUMBER || begin < 0 ||
            begin != floor(begin) || end != floor(end) || end < begin || end > (double)data_size) {
            snprintf(err, errlen, "tensor %s: data_offsets [%.0f, %.0f] outside the data (%zu bytes)", name,
                     begin, end, data_size);
            goto fail;
        }
        if ((size_t)(end - begin) != t.nbytes) {
            snprintf(err, errlen, "tensor %s: data_offsets span %.0f bytes but %s x shape needs %zu", name,
                     end - begin, dtype_names[t.dtype], t.nbytes);
            goto fail;
        }
        t.data = data + (size_t)begin;
        t.name = xstrdup(name);
        if (*count == *cap) {
            *cap = *cap ? *cap * 2 : 1024;
            Tensor *grown = realloc(*tensors, *cap * sizeof(Tensor));
            if (!grown) fatal("out of memory reading a safetensors header");
            *tensors = grown;
        }
        (*tensors)[(*count)++] = t;
    }
    {   /* no two tensors of this file may share bytes */
        size_t n = *count - first;
        const Tensor **sorted = xcalloc(n, sizeof *sorted);
        for (size_t i = 0; i < n; i++) sorted[i] = &(*tensors)[first + i];
        qsort(sorted, n, sizeof *sorted, compare_tensor_start);
        for (size_t i = 1; i < n; i++)
            if ((const uint8_t *)sorted[i - 1]->data + sorted[i - 1]->nbytes > (const uint8_t *)sorted[i]->data) {
                snprintf(err, errlen, "tensors %s and %s overlap", sorted[i - 1]->name, sorted[i]->name);
                free(sorted);
                goto fail;
            }
        free(sorted);
    }
    json_free(root);
    return NULL;
fail:
    json_free(root);
    return err;
}


/* Build the name -> tensor hash table; fatal on a name that appears twice (in any files). */
static void index_tensors(Model *m) {
    m->index_size = 16;
    while (m->index_size < m->n_tensors * 2) m->index_size *= 2;
    m->index = xcalloc(m->index_size, sizeof(size_t));
    for (size_t i = 0; i < m->n_tensors; i++) {
        size_t slot = hash_bytes(m->tensors[i].name, strlen(m->tensors[i].name)) & (m->index_size - 1);
        while (m->index[slot]) {
            const Tensor *other = &m->tensors[m->index[slot] - 1];
            if (!strcmp(other->name, m->tensors[i].name))
                fatal("tensor %s appears twice: in %s and in %s", other->name, m->files[other->file].path,
                      m->files[m->tensors[i].file].path);
            slot = (slot + 1) & (m->index_size - 1);
        }
        m->index[slot] = i + 1;
    }
}

/* The tensor named by the printf-style format, or NULL. */
static const Tensor *find_tensor(const Model *m, const char *fmt, ...) {
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    for (size_t slot = hash_bytes(name, strlen(name)) & (m->index_size - 1); m->index[slot]; slot = (slot + 1) & (m->index_size - 1))
        if (!strcmp(m->tensors[m->index[slot] - 1].name, name)) return &m->tensors[m->index[slot] - 1];
    return NULL;
}

/* "[a, b, c]" for messages. */
static void shape_string(const int64_t *shape, int ndim, char *out, size_t n) {
    size_t used = (size_t)snprintf(out, n, "[");
    for (int d = 0; d < ndim && used < n; d++)
        used += (size_t)snprintf(out + used, n - used, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (used < n) snprintf(out + used, n - used, "]");
}

/* Fatal unless tensor t has exactly this shape (ndim dims; a scalar may also be [1]). */
static void expect_shape(const Model *m, const Tensor *t, int ndim, const int64_t *shape) {
    int ok = t->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++) ok = t->shape[d] == shape[d];
    if (ndim == 0 && t->ndim == 1 && t->shape[0] == 1) ok = 1;
    if (!ok) {
        char want[96], got[96];
        shape_string(shape, ndim, want, sizeof want);
        shape_string(t->shape, t->ndim, got, sizeof got);
        fatal("%s: tensor %s has shape %s, expected %s from config.json", m->files[t->file].path, t->name, got, want);
    }
}

/* Fatal, naming file and tensor, unless t has one of the n_allowed dtypes. */
static void expect_dtype(const Model *m, const Tensor *t, int n_allowed, const DType *allowed) {
    for (int i = 0; i < n_allowed; i++)
        if (t->dtype == allowed[i]) return;
    fatal("%s: tensor %s has dtype %s, which is not supported there", m->files[t->file].path, t->name,
          dtype_names[t->dtype]);
}

/* ============================================================================== config.json */
/* config.json is read as transformers' DeepseekV4Config reads it, legacy keys included:
   compress_ratios (per layer 0 = sliding only, 4 = CSA, 128 = HCA), compress_rate_csa / _hca,
   num_hash_layers, qk_rope_head_dim and rope_scaling, beside the newer layer_types /
   compress_rates / mlp_layer_types / partial_rotary_factor / rope_parameters. Absent optional
   keys take transformers' defaults; every value is range-checked, legacy ones too, and a legacy
   key beside its newer one must agree with it (transformers would silently prefer one). Keys
   whose value nvfp4 does not implement are refused, naming the key. */

#define REQUIRED (-1)   /* config_int fallback of a key that must be present */

/* Integer `key` of a config object, between 0 and 1e9; `fallback` when absent (REQUIRED:
   fatal). path names the file in messages. */
static int config_int(const Json *root, const char *path, const char *key, int fallback) {
    const Json *v = json_get(root, key);
    if (!v || v->type == JSON_NULL) {
        if (fallback == REQUIRED) fatal("%s: required key \"%s\" is missing", path, key);
        return fallback;
    }
    if (v->type != JSON_NUMBER || v->number != floor(v->number) || v->number < 0 || v->number > 1e9)
        fatal("%s: \"%s\" must be an integer between 0 and 1000000000", path, key);
    return (int)v->number;
}

/* Number `key` of a config object (finite), `fallback` when absent. */
static float config_float(const Json *root, const char *path, const char *key, double fallback) {
    const Json *v = json_get(root, key);
    if (!v || v->type == JSON_NULL) return (float)fallback;
    if (v->type != JSON_NUMBER || !isfinite(v->number) || fabs(v->number) > FLT_MAX)
        fatal("%s: \"%s\" must be a finite number", path, key);
    return (float)v->number;
}

/* Whether a config object has `key` with a value other than null. */
static int config_has(const Json *obj, const char *key) {
    const Json *v = json_get(obj, key);
    return v && v->type != JSON_NULL;
}

/* Number `key` of a config object that must be greater than 0 (an eps, a limit, a scale, a
   theta), `fallback` when absent. null is refused rather than read as the default: transformers'
   typed config refuses it, and its YaRN reads a null attention_factor as "derive it". */
static float config_positive(const Json *obj, const char *path, const char *key, double fallback) {
    const Json *v = json_get(obj, key);
    if (v && v->type == JSON_NULL) fatal("%s: \"%s\" is null, must be a number greater than 0", path, key);
    float x = config_float(obj, path, key, fallback);
    if (!(x > 0)) fatal("%s: \"%s\" is %g, must be greater than 0", path, key, (double)x);
    return x;
}

/* Key `s` as compared for a misspelling: its ASCII letters lowercased and its digits, every
   other byte dropped ("Rope_Scal[[[[ing" and "rope-scaling" -> "ropescaling"), into out[64].
   Returns the length, 64 when it is longer than any key nvfp4 knows. */
static size_t key_folded(const char *s, char *out) {
    size_t n = 0;
    for (; *s && n < 64; s++) {
        char ch = *s >= 'A' && *s <= 'Z' ? (char)(*s + 32) : *s;
        if ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9')) out[n++] = ch;
    }
    return n;
}

/* Whether a[la] and b[lb] are at most one edit apart: one character inserted, deleted or
   replaced, or two adjacent ones swapped. */
static int one_edit_apart(const char *a, size_t la, const char *b, size_t lb) {
    if (la < lb) return one_edit_apart(b, lb, a, la);
    if (la - lb > 1) return 0;
    size_t i = 0;
    while (i < lb && a[i] == b[i]) i++;
    if (i == lb) return 1;
    if (la > lb) return !memcmp(a + i + 1, b + i, lb - i);   /* a has one more character */
    if (!memcmp(a + i + 1, b + i + 1, la - i - 1)) return 1;  /* one replaced */
    return i + 1 < la && a[i] == b[i + 1] && a[i + 1] == b[i] && !memcmp(a + i + 2, b + i + 2, la - i - 2);
}

/* Warn about each key of object `obj` (named by `where` in the message) that is neither one
   nvfp4 reads (`known`) nor one it leaves alone on purpose (`ignored`, may be NULL; both lists
   NULL-terminated) but that is one edit from a key it reads, letters' case, '_' and stray
   punctuation aside: a misspelled "rope_scaling" would otherwise silently drop YaRN. Other
   unknown keys are left alone, as transformers leaves them. */
static void warn_misspelled_keys(const Json *obj, const char *where, const char *const *known, const char *const *ignored) {
    for (size_t i = 0; obj && obj->type == JSON_OBJECT && i < obj->length; i++) {
        const char *key = obj->keys[i];
        int listed = 0;
        for (const char *const *k = known; *k && !listed; k++) listed = !strcmp(key, *k);
        for (const char *const *k = ignored; k && *k && !listed; k++) listed = !strcmp(key, *k);
        char folded[64], other[64];
        size_t n = key_folded(key, folded);
        for (const char *const *k = known; *k && !listed && n < 64; k++)
            if (one_edit_apart(folded, n, other, key_folded(*k, other))) {
                warn("%s: unknown key \"%s\" is ignored; did you mean \"%s\"?", where, key, *k);
                break;
            }
    }
}

/* The keys of config.json that nvfp4 reads: at the top level, in a rope dict (rope_scaling,
   rope_parameters and its main and compress sides) and in compress_rates. */
static const char *const config_keys[] = {
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
    "o_groups", "o_lora_rank", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "hc_sinkhorn_iters", "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "bos_token_id", "eos_token_id",
    "hc_eps", "rms_norm_eps", "routed_scaling_factor", "swiglu_limit", "rope_theta", "compress_rope_theta", "scoring_func",
    "hidden_act", "attention_bias", "mlp_bias", "norm_topk_prob", "tie_word_embeddings", "num_key_value_heads", "hc_mult",
    "qk_rope_head_dim", "partial_rotary_factor", "rope_parameters", "rope_scaling", "max_position_embeddings",
    "compress_rates", "compress_rate_csa", "compress_rate_hca", "layer_types", "compress_ratios",
    "num_nextn_predict_layers", "num_hash_layers", "mlp_layer_types", NULL};
static const char *const config_ignored[] = {   /* transformers' and V3's keys that change nothing here */
    "architectures", "torch_dtype", "dtype", "transformers_version", "quantization_config", "initializer_range", "use_cache",
    "pad_token_id", "attention_dropout", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", NULL};
static const char *const rope_keys[] = {
    "rope_type", "type", "main", "compress", "rope_theta", "partial_rotary_factor", "factor", "beta_fast", "beta_slow",
    "original_max_position_embeddings", "attention_factor", "mscale", "mscale_all_dim", "truncate", NULL};
static const char *const compress_rate_keys[] = {"compressed_sparse_attention", "heavily_compressed_attention", NULL};

/* The RoPE settings a rope dict describes: the bases of the main and compress ropes, and YaRN
   on the compress rope. */
typedef struct {
    float theta, compress_theta;
    int yarn;
    float factor, beta_fast, beta_slow, original_max, scale;
} RopeSettings;

/* Whether rope dict `rope` (named by `where` in messages) is YaRN rather than the default rope.
   Its rope_type and the legacy type must agree when both are given. */
static int rope_is_yarn(const Json *rope, const char *where) {
    const Json *kind = json_get(rope, "rope_type"), *legacy = json_get(rope, "type");
    if (kind && legacy && (kind->type != JSON_STRING || legacy->type != JSON_STRING || strcmp(kind->string, legacy->string)))
        fatal("%s: rope_type and type disagree", where);
    if (!kind) kind = legacy;
    if (kind && (kind->type != JSON_STRING || (strcmp(kind->string, "yarn") && strcmp(kind->string, "default"))))
        fatal("%s: rope type %s is not supported (only yarn and default)", where,
              kind->type == JSON_STRING ? kind->string : "(not a string)");
    return kind && !strcmp(kind->string, "yarn");
}

/* The RoPE settings of rope dict `rope`, config key `key`, starting from c's top-level thetas.
   Flat (legacy rope_scaling, or a flat rope_parameters) it describes the compress rope, with
   attention_factor 1. As rope_parameters {"main": .., "compress": ..} each side may carry its
   own rope_theta (which must agree with rope_theta / compress_rope_theta when both are given)
   and its partial_rotary_factor (which must give c's rope dims), and, as in transformers, an
   absent YaRN attention_factor is derived from the factor (mscale). Fatal on anything else. */
static RopeSettings parse_rope(const Config *c, const Json *root, const Json *rope, const char *key, const char *path) {
    RopeSettings r = {c->rope_theta, c->compress_rope_theta, 0, 0, 0, 0, 0, 1.0f};
    char whole[512], side[2][600];   /* "path: key", "path: key.main", "path: key.compress" */
    const char *where = whole;       /* the dict being read, for messages */
    snprintf(whole, sizeof whole, "%s: %s", path, key);
    if (rope->type != JSON_OBJECT) fatal("%s must be an object", where);
    warn_misspelled_keys(rope, where, rope_keys, NULL);
    const Json *sides[2] = {json_get(rope, "main"), json_get(rope, "compress")};
    int nested = sides[0] || sides[1];
    if (nested) {
        if (!sides[0] || sides[0]->type != JSON_OBJECT || !sides[1] || sides[1]->type != JSON_OBJECT)
            fatal("%s needs both \"main\" and \"compress\" as objects", where);
        const char *names[2] = {"main", "compress"}, *top[2] = {"rope_theta", "compress_rope_theta"};
        float *theta[2] = {&r.theta, &r.compress_theta};
        for (int i = 0; i < 2; i++) {   /* transformers reads the rope dims of each side from it */
            snprintf(side[i], sizeof side[i], "%s.%s", where, names[i]);
            warn_misspelled_keys(sides[i], side[i], rope_keys, NULL);
            const Json *f = json_get(sides[i], "partial_rotary_factor");
            if (!f || f->type != JSON_NUMBER || (int)(c->head_dim * f->number) != c->rope_dim)
                fatal("%s needs partial_rotary_factor %g (rope dims %d of head_dim %d)", side[i],
                      (double)c->rope_dim / c->head_dim, c->rope_dim, c->head_dim);
            if (!config_has(sides[i], "rope_theta")) continue;
            float t = config_positive(sides[i], side[i], "rope_theta", 0);
            if (config_has(root, top[i]) && t != *theta[i])
                fatal("%s: %s (%g) and %s.%s.rope_theta (%g) disagree", path, top[i], (double)*theta[i], key, names[i],
                      (double)t);
            *theta[i] = t;
        }
        if (rope_is_yarn(sides[0], side[0])) fatal("%s must be the default rope", side[0]);
        where = side[1];
        rope = sides[1];
    }
    r.yarn = rope_is_yarn(rope, where);
    if (!r.yarn) return r;
    if (!config_has(rope, "original_max_position_embeddings")) fatal("%s: YaRN needs original_max_position_embeddings", where);
    r.original_max = config_positive(rope, where, "original_max_position_embeddings", 0);
    r.factor = config_positive(rope, where, "factor",
                               config_positive(root, path, "max_position_embeddings", 1048576) / r.original_max);
    r.beta_fast = config_positive(rope, where, "beta_fast", 32);
    r.beta_slow = config_positive(rope, where, "beta_slow", 1);
    if (r.beta_fast < r.beta_slow)
        fatal("%s: YaRN beta_fast (%g) is below beta_slow (%g)", where, (double)r.beta_fast, (double)r.beta_slow);
    if (r.compress_theta == 1) fatal("%s: YaRN needs a compress rope_theta other than 1", where);
    if (json_get(rope, "mscale") || json_get(rope, "mscale_all_dim"))
        fatal("%s: YaRN mscale / mscale_all_dim are not supported", where);
    const Json *truncate = json_get(rope, "truncate");
    if (truncate && (truncate->type != JSON_BOOL || !truncate->number))
        fatal("%s: YaRN truncate must be true (the only one nvfp4 implements)", where);
    float mscale = r.factor <= 1 ? 1.0f : 0.1f * logf(r.factor) + 1.0f;
    r.scale = config_positive(rope, where, "attention_factor", nested ? mscale : 1.0);
    return r;
}

/* The first RoPE setting in which a and b differ, or NULL when they agree. */
static const char *rope_difference(const RopeSettings *a, const RopeSettings *b) {
    struct { const char *name; float a, b; } fields[] = {
        {"the rope type", (float)a->yarn, (float)b->yarn}, {"the main rope_theta", a->theta, b->theta},
        {"the compress rope_theta", a->compress_theta, b->compress_theta}, {"factor", a->factor, b->factor},
        {"beta_fast", a->beta_fast, b->beta_fast}, {"beta_slow", a->beta_slow, b->beta_slow},
        {"original_max_position_embeddings", a->original_max, b->original_max},
        {"attention_factor", a->scale, b->scale}};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        if (fields[i].a != fields[i].b) return fields[i].name;
    return NULL;
}

/* RoPE: "main" (sliding-only layers) is plain; "compress" (CSA/HCA layers) may be YaRN. Read
   from rope_parameters and the legacy rope_scaling (as in transformers, rope_scaling wins);
   both given must agree. */
static void parse_ropes(Config *c, const Json *root, const char *path) {
    RopeSettings r = {c->rope_theta, c->compress_rope_theta, 0, 0, 0, 0, 0, 1.0f};
    int newer = config_has(root, "rope_parameters");
    if (newer) r = parse_rope(c, root, json_get(root, "rope_parameters"), "rope_parameters", path);
    if (config_has(root, "rope_scaling")) {
        RopeSettings legacy = parse_rope(c, root, json_get(root, "rope_scaling"), "rope_scaling", path);
        const char *differs = newer ? rope_difference(&legacy, &r) : NULL;
        if (differs) fatal("%s: rope_scaling and rope_parameters disagree on %s", path, differs);
        r = legacy;
    }
    c->rope_theta = r.theta;
    c->compress_rope_theta = r.compress_theta;
    c->yarn = r.yarn;
    c->yarn_factor = r.factor;
    c->yarn_beta_fast = r.beta_fast;
    c->yarn_beta_slow = r.beta_slow;
    c->yarn_original_max = r.original_max;
    c->rope_scale = r.scale;
}

/* Rope dims: partial_rotary_factor x head_dim, or the legacy qk_rope_head_dim (head_dim / 8 when
   neither is given); both given must agree. */
static void parse_rope_dims(Config *c, const Json *root, const char *path) {
    c->rope_dim = config_int(root, path, "qk_rope_head_dim", c->head_dim / 8);
    if (config_has(root, "partial_rotary_factor")) {
        const Json *f = json_get(root, "partial_rotary_factor");
        if (f->type != JSON_NUMBER || !(f->number > 0 && f->number <= 1))
            fatal("%s: partial_rotary_factor must be a number in (0, 1]", path);
        int dims = (int)(c->head_dim * f->number);
        if (config_has(root, "qk_rope_head_dim") && dims != c->rope_dim)
            fatal("%s: qk_rope_head_dim (%d) and partial_rotary_factor (%g, %d of head_dim %d) disagree", path,
                  c->rope_dim, f->number, dims, c->head_dim);
        c->rope_dim = dims;
    }
    if (c->rope_dim <= 0 || c->rope_dim % 2 || c->rope_dim > c->head_dim || c->rope_dim > c->index_dim)
        fatal("%s: rope dims %d must be even and at most head_dim (%d) and index_head_dim (%d)", path, c->rope_dim,
              c->head_dim, c->index_dim);
}

/* The attention kind and compression rate of every layer. Kinds from layer_types, or from the
   legacy compress_ratios (0 = sliding only, 4 = CSA, 128 = HCA, transformers' mapping; it may
   also list the MTP layers), or else transformers' default schedule; rates from compress_rates
   or the legacy compress_rate_csa / compress_rate_hca. Legacy and newer keys both given must
   agree, and so must a ratio in compress_ratios with the rate of its kind. */
static void parse_attention_layers(Config *c, const Json *root, const char *path) {
    static const char *kinds[3] = {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"};
    static const char *legacy_rates[3] = {NULL, "compress_rate_csa", "compress_rate_hca"};
    const Json *rates = json_get(root, "compress_rates");
    if (config_has(root, "compress_rates") && rates->type != JSON_OBJECT) fatal("%s: compress_rates must be an object", path);
    char where[PATH_MAX + 32];
    snprintf(where, sizeof where, "%s: compress_rates", path);
    warn_misspelled_keys(rates, where, compress_rate_keys, NULL);
    int rate[3] = {0, 4, 128};
    const char *rate_key[3] = {NULL, "compress_rates", "compress_rates"};
    for (int k = 1; k < 3; k++) {
        int newer = config_int(rates, path, kinds[k], rate[k]);
        rate[k] = config_int(root, path, legacy_rates[k], newer);
        if (config_has(root, legacy_rates[k])) rate_key[k] = legacy_rates[k];
        if (config_has(rates, kinds[k]) && rate[k] != newer)
            fatal("%s: %s (%d) and compress_rates.%s (%d) disagree", path, legacy_rates[k], rate[k], kinds[k], newer);
        if (rate[k] < 1 || rate[k] > 1024)
            fatal("%s: %s gives the %s compression rate %d, must be between 1 and 1024", path, rate_key[k], kinds[k],
                  rate[k]);
    }
    const Json *types = json_get(root, "layer_types"), *ratios = json_get(root, "compress_ratios");
    int has_types = config_has(root, "layer_types"), has_ratios = config_has(root, "compress_ratios");
    int mtp = config_int(root, path, "num_nextn_predict_layers", 0);
    AttnKind legacy[MAX_LAYERS];
    if (has_ratios) {
        if (ratios->type != JSON_ARRAY) fatal("%s: compress_ratios must be an array", path);
        if (ratios->length != (size_t)c->n_layers && ratios->length != (size_t)c->n_layers + (size_t)mtp)
            fatal("%s: compress_ratios has %zu entries for %d layers", path, ratios->length, c->n_layers);
        for (size_t l = 0; l < ratios->length; l++) {
            double r = ratios->items[l].type == JSON_NUMBER ? ratios->items[l].number : -1;
            if (r != 0 && r != 4 && r != 128) fatal("%s: compress_ratios[%zu] must be 0, 4 or 128", path, l);
            if (l < (size_t)c->n_layers) legacy[l] = r == 0 ? ATTN_SLIDING : r == 4 ? ATTN_CSA : ATTN_HCA;
        }
    }
    if (has_types) {
        if (types->type != JSON_ARRAY) fatal("%s: layer_types must be an array", path);
        if (types->length != (size_t)c->n_layers)
            fatal("%s: layer_types has %zu entries for %d layers", path, types->length, c->n_layers);
        for (int l = 0; l < c->n_layers; l++) {
            const Json *t = &types->items[l];
            const char *s = t->type == JSON_STRING ? t->string : "";
            if (!strcmp(s, kinds[0])) c->attn_kind[l] = ATTN_SLIDING;
            else if (!strcmp(s, kinds[1])) c->attn_kind[l] = ATTN_CSA;
            else if (!strcmp(s, kinds[2])) c->attn_kind[l] = ATTN_HCA;
            else fatal("%s: layer_types[%d] is not a DeepSeek V4 attention type", path, l);
            if (has_ratios && legacy[l] != c->attn_kind[l])
                fatal("%s: layer_types[%d] (%s) and compress_ratios[%d] (%g) disagree", path, l, s, l, ratios->items[l].number);
        }
    } else if (has_ratios) {
        memcpy(c->attn_kind, legacy, (size_t)c->n_layers * sizeof *legacy);
    } else {
        for (int l = 0; l < c->n_layers; l++)
            c->attn_kind[l] = l < 2 ? ATTN_HCA : (l - 2) % 2 ? ATTN_CSA : ATTN_HCA;
    }
    for (int l = 0; l < c->n_layers; l++) {
        int k = c->attn_kind[l] == ATTN_CSA ? 1 : c->attn_kind[l] == ATTN_HCA ? 2 : 0;
        c->compress_ratio[l] = rate[k];
        if (has_ratios && ratios->items[l].number != rate[k])
            fatal("%s: compress_ratios[%d] is %g but the %s compression rate is %d (%s)", path, l,
                  ratios->items[l].number, kinds[k], rate[k], rate_key[k]);
    }
}

/* Hash-routed layers: mlp_layer_types ("hash_moe" layers first, then "moe"), or the legacy
   num_hash_layers (the first layers; 3 when neither is given); both given must agree. */
static void parse_hash_layers(Config *c, const Json *root, const char *path) {
    int legacy = config_int(root, path, "num_hash_layers", 3);
    c->n_hash_layers = legacy < c->n_layers ? legacy : c->n_layers;
    if (!config_has(root, "mlp_layer_types")) return;
    const Json *mlp = json_get(root, "mlp_layer_types");
    if (mlp->type != JSON_ARRAY) fatal("%s: mlp_layer_types must be an array", path);
    if (mlp->length != (size_t)c->n_layers) fatal("%s: mlp_layer_types has %zu entries for %d layers", path, mlp->length, c->n_layers);
    int n_hash = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const char *s = mlp->items[l].type == JSON_STRING ? mlp->items[l].string : "";
        int hash = !strcmp(s, "hash_moe");
        if (!hash && strcmp(s, "moe")) fatal("%s: mlp_layer_types[%d] must be \"hash_moe\" or \"moe\"", path, l);
        if (hash && l != n_hash) fatal("%s: hash_moe layers must come first", path);
        n_hash += hash;
    }
    if (config_has(root, "num_hash_layers") && n_hash != c->n_hash_layers)
        fatal("%s: num_hash_layers (%d) and mlp_layer_types (%d hash_moe layers) disagree", path, legacy, n_hash);
    c->n_hash_layers = n_hash;
}

/* Fill c from the parsed config.json (path for messages); fatal on anything unusable. */
static void parse_config(Config *c, const Json *root, const char *path) {
    memset(c, 0, sizeof *c);
    if (root->type != JSON_OBJECT) fatal("%s: not a JSON object", path);
    warn_misspelled_keys(root, path, config_keys, config_ignored);
    const Json *type = json_get(root, "model_type");
    const char *model_type = type && type->type == JSON_STRING ? type->string : NULL;
    if (!model_type) fatal("%s: model_type is missing, expected \"deepseek_v4\"", path);
    if (strcmp(model_type, "deepseek_v4")) fatal("%s: model_type is \"%s\", expected \"deepseek_v4\"", path, model_type);
    c->vocab_size = config_int(root, path, "vocab_size", REQUIRED);
    c->hidden_size = config_int(root, path, "hidden_size", REQUIRED);
    c->n_layers = config_int(root, path, "num_hidden_layers", REQUIRED);
    c->n_heads = config_int(root, path, "num_attention_heads", REQUIRED);
    c->head_dim = config_int(root, path, "head_dim", 512);
    c->q_lora_rank = config_int(root, path, "q_lora_rank", 1024);
    c->o_groups = config_int(root, path, "o_groups", 8);
    c->o_lora_rank = config_int(root, path, "o_lora_rank", 1024);
    c->n_experts = config_int(root, path, "n_routed_experts", REQUIRED);
    c->n_shared_experts = config_int(root, path, "n_shared_experts", 1);
    c->topk = config_int(root, path, "num_experts_per_tok", REQUIRED);
    c->moe_inter = config_int(root, path, "moe_intermediate_size", REQUIRED);
    c->sinkhorn_iters = config_int(root, path, "hc_sinkhorn_iters", 20);
    c->sliding_window = config_int(root, path, "sliding_window", 128);
    c->index_heads = config_int(root, path, "index_n_heads", 64);
    c->index_dim = config_int(root, path, "index_head_dim", 128);
    c->index_topk = config_int(root, path, "index_topk", 512);
    c->bos_id = config_int(root, path, "bos_token_id", 0);
    c->hc_eps = config_positive(root, path, "hc_eps", 1e-6);
    c->rms_eps = config_positive(root, path, "rms_norm_eps", 1e-6);
    c->routed_scaling = config_positive(root, path, "routed_scaling_factor", 1.5);
    c->swiglu_limit = config_positive(root, path, "swiglu_limit", 10.0);   /* 0 does not turn transformers' clamp off */
    c->rope_theta = config_positive(root, path, "rope_theta", 10000.0);
    c->compress_rope_theta = config_positive(root, path, "compress_rope_theta", 160000.0);

    const Json *eos = json_get(root, "eos_token_id");
    if (eos && eos->type == JSON_ARRAY) {
        if (eos->length == 0 || eos->length > 8) fatal("%s: eos_token_id must list 1 to 8 ids", path);
        for (size_t i = 0; i < eos->length; i++) {
            const Json *id = &eos->items[i];
            if (id->type != JSON_NUMBER || id->number != floor(id->number) || id->number < 0 || id->number >= c->vocab_size)
                fatal("%s: eos_token_id[%zu] must be a token id below vocab_size (%d)", path, i, c->vocab_size);
            c->eos_ids[c->n_eos++] = (int)id->number;
        }
    } else c->eos_ids[c->n_eos++] = config_int(root, path, "eos_token_id", 1);
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] >= c->vocab_size) fatal("%s: eos_token_id %d is not below vocab_size (%d)", path, c->eos_ids[i], c->vocab_size);
    if (c->bos_id >= c->vocab_size) fatal("%s: bos_token_id %d is not below vocab_size (%d)", path, c->bos_id, c->vocab_size);

    const char *checks[][2] = {{"scoring_func", "sqrtsoftplus"}, {"hidden_act", "silu"}};
    for (int i = 0; i < 2; i++) {
        const Json *v = json_get(root, checks[i][0]);
        if (v && (v->type != JSON_STRING || strcmp(v->string, checks[i][1])))
            fatal("%s: %s must be \"%s\" (the only one nvfp4 implements)", path, checks[i][0], checks[i][1]);
    }
    struct { const char *key; int value; const char *why; } flags[] = {   /* booleans transformers reads */
        {"attention_bias", 0, "DeepSeek V4 has no biases there"},
        {"mlp_bias", 0, "DeepSeek V4 has no biases there"},
        {"norm_topk_prob", 1, "nvfp4 always scales the chosen experts' weights to sum to 1"},
        {"tie_word_embeddings", 0, "nvfp4 reads the output projection from head.weight, never from embed.weight"}};
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++) {
        const Json *v = json_get(root, flags[i].key);
        if (v && (v->type != JSON_BOOL || v->number != flags[i].value))
            fatal("%s: %s must be %s; %s", path, flags[i].key, flags[i].value ? "true" : "false", flags[i].why);
    }
    if (config_int(root, path, "num_key_value_heads", 1) != 1) fatal("%s: num_key_value_heads must be 1 (V4 shares one K=V latent)", path);
    if (c->n_shared_experts != 1) fatal("%s: n_shared_experts is %d; DeepSeek V4 has exactly 1", path, c->n_shared_experts);
    int hc_mult = config_int(root, path, "hc_mult", HC);
    if (hc_mult != HC) fatal("%s: hc_mult is %d; nvfp4 supports %d", path, hc_mult, HC);

    /* positive sizes and the relations between them */
    struct { const char *name; int value; } positive[] = {
        {"vocab_size", c->vocab_size}, {"hidden_size", c->hidden_size}, {"num_hidden_layers", c->n_layers},
        {"num_attention_heads", c->n_heads}, {"head_dim", c->head_dim}, {"q_lora_rank", c->q_lora_rank},
        {"o_groups", c->o_groups}, {"o_lora_rank", c->o_lora_rank}, {"n_routed_experts", c->n_experts},
        {"num_experts_per_tok", c->topk}, {"moe_intermediate_size", c->moe_inter},
        {"hc_sinkhorn_iters", c->sinkhorn_iters}, {"sliding_window", c->sliding_window},
        {"index_n_heads", c->index_heads}, {"index_head_dim", c->index_dim}, {"index_topk", c->index_topk}};
    for (size_t i = 0; i < sizeof positive / sizeof *positive; i++)
        if (positive[i].value <= 0 || positive[i].value > (1 << 24))
            fatal("%s: %s is %d, must be between 1 and %d", path, positive[i].name, positive[i].value, 1 << 24);
    int64_t products[][3] = {   /* sizes the engine multiplies: each product must fit an int */
        {c->n_heads, c->head_dim, 1}, {c->index_heads, c->index_dim, 1}, {c->o_groups, c->o_lora_rank, 1},
        {HC, c->hidden_size, (2 + HC) * HC}, {c->vocab_size, c->hidden_size, 1}, {2, c->head_dim, 1},
        {2, c->index_dim, 1}, {c->vocab_size, c->topk, 1}};
    for (size_t i = 0; i < sizeof products / sizeof *products; i++)
        if (products[i][0] * products[i][1] * products[i][2] > INT32_MAX)
            fatal("%s: sizes %lld x %lld are too large", path, (long long)products[i][0], (long long)products[i][1]);
    if (c->n_layers > MAX_LAYERS) fatal("%s: num_hidden_layers is %d, at most %d supported", path, c->n_layers, MAX_LAYERS);
    if (c->topk > c->n_experts) fatal("%s: num_experts_per_tok (%d) exceeds n_routed_experts (%d)", path, c->topk, c->n_experts);
    if (c->n_heads % c->o_groups) fatal("%s: num_attention_heads (%d) is not a multiple of o_groups (%d)", path, c->n_heads, c->o_groups);

    parse_rope_dims(c, root, path);
    parse_ropes(c, root, path);
    parse_attention_layers(c, root, path);
    parse_hash_layers(c, root, path);
}

/* =============================================================================== tokenizer */
/* A byte-level BPE tokenizer that loads a Hugging Face tokenizer.json and reproduces what the
   `tokenizers` library (Rust) encodes for the DeepSeek V3/V4 tokenizer. Its entry points:

     int  tokenizer_load_json(Tokenizer *t, const Json *root, char *err, size_t errlen);
     int  tokenizer_load_file(Tokenizer *t, const char *path, char *err, size_t errlen);
     void tokenizer_free(Tokenizer *t);
     int  tokenizer_encode(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids);
     int  tokenizer_encode_plain(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids);
     const char *tokenizer_token_bytes(const Tokenizer *t, int id, size_t *len);
     int  tokenizer_find(const Tokenizer *t, const char *token);
     size_t utf8_stream_push(Utf8Stream *s, const char *bytes, size_t n, char *out);
     size_t utf8_stream_flush(Utf8Stream *s, char *out);

   Encoding follows the library's pipeline:
     1. Added tokens (all of them, special or not) are cut out of the raw text first: at each
        position the longest added token starting there wins.  Like the library this runs in two
        passes, first the tokens marked "normalized": false, then the "normalized": true ones in
        the text left between.  Each added token becomes its own id.
     2. The pieces in between go through the pre-tokenizer: a list of regex splits with
        "Isolated" behaviour (every match and every gap between matches becomes a piece), each
        split applied to each piece of the previous one.  The regexes are not interpreted; the
        few known patterns are recognised by their exact text and run by hand-written matchers
        with the leftmost-first alternation and backtracking semantics of Oniguruma.
     3. Each piece is spelled with the GPT-2 ByteLevel alphabet (one printable character per
        byte) and merged by BPE: repeatedly the adjacent pair with the lowest merge rank, the
        leftmost of equals, becomes one symbol.
   Text is arbitrary bytes.  Valid UTF-8 characters are classified by their Unicode class; each
   byte of an invalid sequence counts as one character with no class.  Byte-level BPE then
   encodes every byte, so decoding the ids always gives back the exact input bytes.

   Supported files: model "BPE" (merges as "a b" strings or ["a", "b"] pairs, byte_fallback
   false, no dropout, no subword prefix/suffix, optional ignore_merges); normalizer absent or an
   empty Sequence; pre-tokenizer a ByteLevel with use_regex true (GPT-2), or a Sequence of
   Splits with known patterns (the DeepSeek ones) ending in ByteLevel; decoder ByteLevel.  The
   post-processor is ignored: no BOS is added (the caller prepends it).  Anything else is
   refused with a message naming it. */

/* ---------- Unicode classes ---------- */

/* The only character properties the pre-tokenizer regexes ask about.  They never overlap. */
enum UnicodeClass {
    CLASS_OTHER, CLASS_L, CLASS_M, CLASS_N, CLASS_P, CLASS_S, CLASS_SPACE
};

/* Entry = (first code point << 3) | UnicodeClass; the run lasts until the next entry. The
   table, generated by tools/gen_unicode.py, is at the end of this file. */
static const uint32_t unicode_class_runs[2324];


/* Returns the UnicodeClass of code point `cp` (CLASS_OTHER for INVALID_CHAR) by binary search
   for the last run that starts at or before it. */
static int unicode_class(uint32_t cp) {
    size_t lo = 0, hi = sizeof unicode_class_runs / sizeof *unicode_class_runs;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if ((unicode_class_runs[mid] >> 3) <= cp) lo = mid; else hi = mid;
    }
    return cp >= INVALID_CHAR ? CLASS_OTHER : (int)(unicode_class_runs[lo] & 7);
}


/* A character of a piece: its code point (or INVALID_CHAR), class and length in bytes. */
typedef struct { uint32_t cp; int cls; size_t length; } Char;

/* Returns the character at byte offset `i` of s[0..n); at the end (i >= n) a Char of length 0
   with code point INVALID_CHAR, so matchers can peek past the end without special cases. */
static Char char_at(const unsigned char *s, size_t n, size_t i) {
    Char c = { INVALID_CHAR, CLASS_OTHER, 0 };
    if (i >= n) return c;
    c.length = utf8_decode(s + i, n - i, &c.cp);
    c.cls = unicode_class(c.cp);
    return c;
}

/* ---------- Pre-tokenizer patterns ---------- */

/* The exact regex texts of tokenizer.json (after JSON unescaping) that select each pattern. */
static const struct { const char *regex; Pattern pattern; } known_patterns[] = {
    { "\\p{N}{1,3}", PATTERN_DIGITS },
    { "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+", PATTERN_CJK },
    { "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
      "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+", PATTERN_DEEPSEEK },
};

/* Returns the end of the run of characters starting at byte `i` whose class is in `class_mask`
   (a bit per UnicodeClass); `i` itself if there is none. */
static size_t run_of_classes(const unsigned char *s, size_t n, size_t i, unsigned class_mask) {
    for (;;) {
        Char c = char_at(s, n, i);
        if (c.length == 0 || !(class_mask >> c.cls & 1)) return i;
        i += c.length;
    }
}

#define MASK(cls) (1u << (cls))

/* Matches the whitespace alternatives shared by the DeepSeek and GPT-2 patterns,
   `\s+(?!\S)|\s+`, preceded for DeepSeek (`with_newlines`) by `\s*[\r\n]+`.  Returns the end
   of the match at byte `i`, or `i` if none.
   \s*[\r\n]+ : after backtracking, the match ends just after the last CR/LF of the run.
   \s+(?!\S)  : the whole run if it reaches the end of the piece, else all but its last
                character (which is then followed by whitespace), if that leaves any. */
static size_t match_spaces(const unsigned char *s, size_t n, size_t i, int with_newlines) {
    size_t end = run_of_classes(s, n, i, MASK(CLASS_SPACE));
    if (end == i) return i;
    if (with_newlines) {
        size_t last_newline_end = i;
        for (size_t k = i; k < end; k++)  /* CR and LF bytes never occur inside other characters */
            if (s[k] == '\r' || s[k] == '\n') last_newline_end = k + 1;
        if (last_newline_end > i) return last_newline_end;
    }
    if (end == n) return end;
    size_t last_start = end - 1;  /* back up over the last character (whitespace is <= 3 bytes) */
    while ((s[last_start] & 0xC0) == 0x80) last_start--;
    return last_start > i ? last_start : end;
}

/* \p{N}{1,3} at byte `i`: up to three number characters.  Returns the end, or `i`. */
static size_t match_digits(const unsigned char *s, size_t n, size_t i) {
    size_t end = i;
    for (int count = 0; count < 3; count++) {
        Char c = char_at(s, n, end);
        if (c.length == 0 || c.cls != CLASS_N) break;
        end += c.length;
    }
    return end;
}

/* Whether `cp` is in [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff] (CJK ideographs, kana). */
static int is_cjk(uint32_t cp) {
    return (cp >= 0x4E00 && cp <= 0x9FA5) || (cp >= 0x3040 && cp <= 0x30FF);
}

/* [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+ at byte `i`.  Returns the end, or `i`. */
static size_t match_cjk(const unsigned char *s, size_t n, size_t i) {
    for (;;) {
        Char c = char_at(s, n, i);
        if (c.length == 0 || !is_cjk(c.cp)) return i;
        i += c.length;
    }
}

/* Whether ASCII byte `b` is a letter [A-Za-z]. */
static int is_ascii_letter(unsigned char b) {
    return (b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z');
}

/* The DeepSeek pattern at byte `i`; returns the end of the match, or `i`.  Alternatives, first
   success wins:
     [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+   ASCII punctuation + ASCII letters
     [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+               optional lead + letters/marks
      ?[\p{P}\p{S}]+[\r\n]*                             optional space + punctuation/symbols
     \s*[\r\n]+ | \s+(?!\S) | \s+                       whitespace (match_spaces) */
static size_t match_deepseek(const unsigned char *s, size_t n, size_t i) {
    Char first = char_at(s, n, i);
    Char second = char_at(s, n, i + first.length);
    /* The 32 ASCII punctuation characters are exactly the ASCII characters of class P or S. */
    if (first.cp < 0x80 && (first.cls == CLASS_P || first.cls == CLASS_S) &&
        i + 1 < n && is_ascii_letter(s[i + 1])) {
        size_t end = i + 1;
        while (end < n && is_ascii_letter(s[end])) end++;
        return end;
    }
    unsigned letters = MASK(CLASS_L) | MASK(CLASS_M);
    int first_is_lead = first.cp != '\r' && first.cp != '\n' && first.cls != CLASS_L &&
                        first.cls != CLASS_P && first.cls != CLASS_S;
    if (first_is_lead && second.length && (letters >> second.cls & 1))
        return run_of_classes(s, n, i + first.length, letters);
    if (letters >> first.cls & 1) return run_of_classes(s, n, i, letters);
    unsigned punctuation = MASK(CLASS_P) | MASK(CLASS_S);
    size_t start = first.cp == ' ' && second.length && (punctuation >> second.cls & 1) ? i + 1 : i;
    size_t end = run_of_classes(s, n, start, punctuation);
    if (end > start) {
        while (end < n && (s[end] == '\r' || s[end] == '\n')) end++;
        return end;
    }
    return match_spaces(s, n, i, 1);
}

/* The GPT-2 pattern at byte `i`; returns the end of the match, or `i`.  Alternatives:
     's|'t|'re|'ve|'m|'ll|'d |  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+ */
static size_t match_gpt2(const unsigned char *s, size_t n, size_t i) {
    static const char *const contractions[] = { "s", "t", "re", "ve", "m", "ll", "d" };
    if (s[i] == '\'') {
        for (size_t k = 0; k < sizeof contractions / sizeof *contractions; k++) {
            size_t length = strlen(contractions[k]);
            if (n - i - 1 >= length && memcmp(s + i + 1, contractions[k], length) == 0)
                return i + 1 + length;
        }
    }
    Char first = char_at(s, n, i);
    Char second = char_at(s, n, i + first.length);
    unsigned other = ~(MASK(CLASS_SPACE) | MASK(CLASS_L) | MASK(CLASS_N));
    const unsigned classes[] = { MASK(CLASS_L), MASK(CLASS_N), other };
    for (size_t k = 0; k < 3; k++) {
        size_t start = first.cp == ' ' && second.length && (classes[k] >> second.cls & 1) ? i + 1 : i;
        size_t end = run_of_classes(s, n, start, classes[k]);
        if (end > start) return end;
    }
    return match_spaces(s, n, i, 0);
}

/* Runs `pattern` at byte `i` of s[0..n) (i < n); returns the end of the match, or `i` if the
   pattern does not match there.  No pattern can match the empty string. */
static size_t pattern_match(Pattern pattern, const unsigned char *s, size_t n, size_t i) {
    switch (pattern) {
    case PATTERN_DIGITS: return match_digits(s, n, i);
    case PATTERN_CJK: return match_cjk(s, n, i);
    case PATTERN_DEEPSEEK: return match_deepseek(s, n, i);
    case PATTERN_GPT2: return match_gpt2(s, n, i);
    }
    return i;
}

#define TOKENIZER_MAX_ID (1 << 22)   /* refuse ids beyond this: no real vocabulary comes close */

/* ---------- Hash tables ---------- */



/* Returns the smallest power of two >= 2 * count (at least 16), or 0 if that would overflow a
   table of `slot_size`-byte slots. */
static size_t table_size_for(size_t count, size_t slot_size) {
    size_t size = 16;
    while (size / 2 < count) {
        if (size > SIZE_MAX / 4 / slot_size) return 0;
        size *= 2;
    }
    return size;
}

/* Returns the vocab id spelled s[0..n), or -1. */
static int vocab_lookup(const Tokenizer *t, const char *s, size_t n) {
    for (size_t slot = hash_bytes(s, n) & t->vocab_mask;; slot = (slot + 1) & t->vocab_mask) {
        int id = t->vocab_slots[slot];
        if (id < 0) return -1;
        const TokenInfo *info = &t->tokens[id];
        if (info->spelling_length == n && memcmp(t->spellings + info->spelling_offset, s, n) == 0)
            return id;
    }
}

/* Returns the merge slot of the pair (left, right): the one holding it, or the empty slot
   where it belongs. */
static MergeSlot *merge_slot(const Tokenizer *t, int left, int right) {
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (size_t slot = hash_bytes(&pair, sizeof pair) & t->merge_mask;; slot = (slot + 1) & t->merge_mask) {
        MergeSlot *m = &t->merge_slots[slot];
        if (m->rank < 0 || m->pair == pair) return m;
    }
}

/* ---------- Loading ---------- */

/* Writes "what" to err (printf-style) and returns -1. */
static int tokenizer_error(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(err, errlen, fmt, args);
        va_end(args);
    }
    return -1;
}

/* Appends n bytes to a growing buffer (*buffer, *size bytes used, *capacity allocated) and
   stores where they went in *offset.  Returns 0, or -1 when out of memory. */
static int append_bytes(char **buffer, size_t *size, size_t *capacity, const void *data, size_t n,
                        size_t *offset) {
    if (n > *capacity - *size) {
        size_t grown = *capacity ? *capacity : 4096;
        while (n > grown - *size) {
            if (grown > SIZE_MAX / 2) return -1;
            grown *= 2;
        }
        char *bigger = realloc(*buffer, grown);
        if (!bigger) return -1;
        *buffer = bigger;
        *capacity = grown;
    }
    if (n) memcpy(*buffer + *size, data, n);
    *offset = *size;
    *size += n;
    return 0;
}

/* Fills the GPT-2 ByteLevel alphabet and its reverse: bytes that are printable Latin-1
   characters ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) stand for themselves; the other 68 bytes get
   the characters 256, 257, ... in order. */
static void init_byte_level(Tokenizer *t) {
    uint32_t next_extra = 256;
    for (int c = 0; c < 256 + 68; c++) t->char_bytes[c] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        t->byte_chars[b] = printable ? (uint32_t)b : next_extra++;
        t->char_bytes[t->byte_chars[b]] = (short)b;
    }
}


/* Converts a ByteLevel spelling back to bytes, as the ByteLevel decoder does: every character
   maps back to its byte; if any character is not in the alphabet the spelling's own UTF-8 is
   used unchanged.  Writes at most n bytes to out and returns the count. */
static size_t byte_level_decode(const Tokenizer *t, const char *spelling, size_t n, char *out) {
    size_t count = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_decode((const unsigned char *)spelling + i, n - i, &cp);
        int byte = cp < 256 + 68 ? t->char_bytes[cp] : -1;
        if (byte < 0) { memcpy(out, spelling, n); return n; }
        out[count++] = (char)byte;
    }
    return count;
}

/* Reads a JSON number that must be an integer id in [0, TOKENIZER_MAX_ID).  Returns it or -1. */
static int json_id(const Json *value) {
    if (!value || value->type != JSON_NUMBER) return -1;
    double v = value->number;
    if (!(v >= 0 && v < TOKENIZER_MAX_ID) || v != (double)(int)v) return -1;
    return (int)v;
}

/* Whether `value` is absent, null or false (an option left off). */
static int json_is_off(const Json *value) {
    return !value || value->type == JSON_NULL || (value->type == JSON_BOOL && value->number == 0);
}

/* Whether `value` is a string equal to `text`. */
static int json_is_string(const Json *value, const char *text) {
    return value && value->type == JSON_STRING && strcmp(value->string, text) == 0;
}

/* Type name of a normalizer/pre-tokenizer/decoder object, for messages. */
static const char *json_type_name(const Json *object) {
    const Json *type = json_get(object, "type");
    return type && type->type == JSON_STRING ? type->string : "(no type)";
}

/* Checks a ByteLevel pre-tokenizer and, if it has use_regex (the default), appends the GPT-2
   pattern.  Returns 0, or -1 with a message. */
static int load_byte_level(Tokenizer *t, const Json *step, char *err, size_t errlen) {
    const Json *prefix = json_get(step, "add_prefix_space"), *use_regex = json_get(step, "use_regex");
    if (!prefix || !json_is_off(prefix))   /* absent means true */
        return tokenizer_error(err, errlen, "pre_tokenizer ByteLevel with add_prefix_space is unsupported");
    if (!use_regex || !json_is_off(use_regex)) t->patterns[t->n_patterns++] = PATTERN_GPT2;
    return 0;
}

/* Checks the pre-tokenizer and fills t->patterns.  Accepted: ByteLevel, or a Sequence of
   Splits (known regex, Isolated, not inverted) ending in ByteLevel.  Returns 0, or -1. */
static int load_pre_tokenizer(Tokenizer *t, const Json *pre, char *err, size_t errlen) {
    if (!pre || pre->type != JSON_OBJECT)
        return tokenizer_error(err, errlen, "missing pre_tokenizer (only ByteLevel ones are supported)");
    if (json_is_string(json_get(pre, "type"), "ByteLevel")) return load_byte_level(t, pre, err, errlen);
    if (!json_is_string(json_get(pre, "type"), "Sequence"))
        return tokenizer_error(err, errlen, "unsupported pre_tokenizer '%s'", json_type_name(pre));
    const Json *steps = json_get(pre, "pretokenizers");
    if (!steps || steps->type != JSON_ARRAY || steps->length == 0)
        return tokenizer_error(err, errlen, "pre_tokenizer Sequence without pretokenizers");
    for (size_t i = 0; i < steps->length; i++) {
        const Json *step = &steps->items[i];
        int last = i + 1 == steps->length;
        if (json_is_string(json_get(step, "type"), "ByteLevel") && last)
            return load_byte_level(t, step, err, errlen);
        if (!json_is_string(json_get(step, "type"), "Split") || last)
            return tokenizer_error(err, errlen, "unsupported pre_tokenizer step %zu '%s' (expected "
                                   "Splits followed by ByteLevel)", i, json_type_name(step));
        const Json *regex = json_get(json_get(step, "pattern"), "Regex");
        if (!regex || regex->type != JSON_STRING)
            return tokenizer_error(err, errlen, "pre_tokenizer Split %zu has no Regex pattern", i);
        if (!json_is_string(json_get(step, "behavior"), "Isolated") || !json_is_off(json_get(step, "invert")))
            return tokenizer_error(err, errlen, "pre_tokenizer Split %zu: only behavior Isolated "
                                   "without invert is supported", i);
        size_t k = 0, known = sizeof known_patterns / sizeof *known_patterns;
        while (k < known && !(strlen(known_patterns[k].regex) == regex->length &&
                              memcmp(known_patterns[k].regex, regex->string, regex->length) == 0))
            k++;
        if (k == known)
            return tokenizer_error(err, errlen, "pre_tokenizer Split %zu: unsupported regex '%.80s'",
                                   i, regex->string);
        if (t->n_patterns == TOKENIZER_MAX_PATTERNS - 1)
            return tokenizer_error(err, errlen, "pre_tokenizer has too many Splits");
        t->patterns[t->n_patterns++] = known_patterns[k].pattern;
    }
    return 0; /* not reached: the last step either returned or failed */
}

/* Checks the parts of the file around the model: normalizer, pre-tokenizer, decoder.  Returns
   0, or -1 with a message. */
static int load_pipeline(Tokenizer *t, const Json *root, char *err, size_t errlen) {
    const Json *normalizer = json_get(root, "normalizer");
    if (normalizer && normalizer->type != JSON_NULL) {
        const Json *list = json_get(normalizer, "normalizers");
        if (!json_is_string(json_get(normalizer, "type"), "Sequence") || !list ||
            list->type != JSON_ARRAY || list->length != 0)
            return tokenizer_error(err, errlen, "unsupported normalizer '%s' (only none or an "
                                   "empty Sequence)", json_type_name(normalizer));
    }
    if (load_pre_tokenizer(t, json_get(root, "pre_tokenizer"), err, errlen)) return -1;
    const Json *decoder = json_get(root, "decoder");
    if (!json_is_string(json_get(decoder, "type"), "ByteLevel"))
        return tokenizer_error(err, errlen, "unsupported decoder '%s' (only ByteLevel)",
                               decoder ? json_type_name(decoder) : "(none)");
    return 0;
}

/* Checks the model's options.  Returns 0, or -1 with a message. */
static int load_model_options(Tokenizer *t, const Json *model, char *err, size_t errlen) {
    if (!model || model->type != JSON_OBJECT) return tokenizer_error(err, errlen, "missing model");
    if (!json_is_string(json_get(model, "type"), "BPE"))
        return tokenizer_error(err, errlen, "unsupported model type '%s' (only BPE)", json_type_name(model));
    if (!json_is_off(json_get(model, "byte_fallback")))
        return tokenizer_error(err, errlen, "model.byte_fallback is unsupported");
    const Json *dropout = json_get(model, "dropout");
    if (!json_is_off(dropout) && !(dropout->type == JSON_NUMBER && dropout->number == 0))
        return tokenizer_error(err, errlen, "model.dropout is unsupported");
    static const char *const affixes[] = { "continuing_subword_prefix", "end_of_word_suffix" };
    for (int k = 0; k < 2; k++) {
        const Json *affix = json_get(model, affixes[k]);
        if (!json_is_off(affix) && !(affix->type == JSON_STRING && affix->length == 0))
            return tokenizer_error(err, errlen, "model.%s is unsupported", affixes[k]);
    }
    t->ignore_merges = !json_is_off(json_get(model, "ignore_merges"));
    return 0;
}

/* Finds the largest id in model.vocab and added_tokens, checking every id on the way, and
   allocates t->tokens.  Returns 0, or -1 with a message. */
static int load_ids(Tokenizer *t, const Json *vocab, const Json *added, char *err, size_t errlen) {
    int max_id = -1;
    for (size_t i = 0; i < vocab->length; i++) {
        int id = json_id(&vocab->items[i]);
        if (id < 0) return tokenizer_error(err, errlen, "model.vocab: token '%.60s' has an invalid id", vocab->keys[i]);
        if (id > max_id) max_id = id;
    }
    for (size_t i = 0; added && i < added->length; i++) {
        int id = json_id(json_get(&added->items[i], "id"));
        if (id < 0) return tokenizer_error(err, errlen, "added_tokens[%zu]: invalid id", i);
        if (id > max_id) max_id = id;
    }
    t->n_ids = max_id + 1;
    t->tokens = calloc((size_t)t->n_ids + 1, sizeof *t->tokens); /* +1: never calloc(0) */
    if (!t->tokens) return tokenizer_error(err, errlen, "out of memory");
    return 0;
}

/* Loads model.vocab: spellings, the spelling hash and each id's decoded bytes.  Refuses
   duplicate spellings or ids.  Returns 0, or -1 with a message. */
static int load_vocab(Tokenizer *t, const Json *vocab, size_t *bytes_capacity, char *err, size_t errlen) {
    size_t slots = table_size_for(vocab->length, sizeof(int)), spellings_capacity = 0;
    if (!slots) return tokenizer_error(err, errlen, "out of memory");
    t->vocab_slots = malloc(slots * sizeof(int));
    if (!t->vocab_slots) return tokenizer_error(err, errlen, "out of memory");
    memset(t->vocab_slots, 0xFF, slots * sizeof(int));
    t->vocab_mask = slots - 1;
    for (size_t i = 0; i < vocab->length; i++) {
        const char *spelling = vocab->keys[i];
        size_t length = strlen(spelling);
        int id = json_id(&vocab->items[i]);
        TokenInfo *info = &t->tokens[id];
        if (info->in_vocab) return tokenizer_error(err, errlen, "model.vocab: id %d is used twice", id);
        char *decoded = malloc(length + 1);
        if (!decoded) return tokenizer_error(err, errlen, "out of memory");
        size_t decoded_length = byte_level_decode(t, spelling, length, decoded);
        int failed = append_bytes(&t->spellings, &t->spellings_size, &spellings_capacity, spelling,
                                  length, &info->spelling_offset) ||
                     append_bytes(&t->bytes, &t->bytes_size, bytes_capacity, decoded, decoded_length,
                                  &info->bytes_offset);
        free(decoded);
        if (failed) return tokenizer_error(err, errlen, "out of memory");
        info->spelling_length = length;
        info->bytes_length = decoded_length;
        info->in_vocab = info->defined = 1;
        size_t slot = hash_bytes(spelling, length) & t->vocab_mask;
        while (t->vocab_slots[slot] >= 0) slot = (slot + 1) & t->vocab_mask;
        t->vocab_slots[slot] = id;
    }
    for (int b = 0; b < 256; b++) {
        char spelling[2];
        t->byte_ids[b] = vocab_lookup(t, spelling, utf8_encode(spelling, t->byte_chars[b]));
        if (t->byte_ids[b] < 0)
            return tokenizer_error(err, errlen, "model.vocab lacks the ByteLevel symbol of byte 0x%02X", b);
    }
    return 0;
}

/* Splits a merge into its two spellings: "a b" (exactly one space) or ["a", "b"].  The
   results point into the JSON.  Returns 0, or -1 if malformed. */
static int merge_parts(const Json *merge, const char **left, size_t *left_length,
                       const char **right, size_t *right_length) {
    if (merge->type == JSON_ARRAY) {
        if (merge->length != 2 || merge->items[0].type != JSON_STRING || merge->items[1].type != JSON_STRING)
            return -1;
        *left = merge->items[0].string, *left_length = merge->items[0].length;
        *right = merge->items[1].string, *right_length = merge->items[1].length;
        return 0;
    }
    if (merge->type != JSON_STRING) return -1;
    const char *space = memchr(merge->string, ' ', merge->length);
    if (!space) return -1;
    *left = merge->string, *left_length = (size_t)(space - merge->string);
    *right = space + 1, *right_length = merge->length - *left_length - 1;
    return memchr(*right, ' ', *right_length) ? -1 : 0;
}

/* Loads model.merges into the merge hash: rank = position in the list; a pair listed twice
   keeps its later rank, as the library does.  Both parts and their concatenation must be in
   the vocab.  Returns 0, or -1 with a message. */
static int load_merges(Tokenizer *t, const Json *merges, char *err, size_t errlen) {
    if (merges->length >= INT32_MAX) return tokenizer_error(err, errlen, "model.merges: too many merges");
    size_t slots = table_size_for(merges->length, sizeof(MergeSlot));
    if (!slots) return tokenizer_error(err, errlen, "out of memory");
    t->merge_slots = malloc(slots * sizeof(MergeSlot));
    if (!t->merge_slots) return tokenizer_error(err, errlen, "out of memory");
    for (size_t s = 0; s < slots; s++) t->merge_slots[s].rank = -1;
    t->merge_mask = slots - 1;
    char *joined = NULL;   /* the two spellings concatenated */
    size_t joined_capacity = 0;
    int status = 0;
    for (size_t rank = 0; rank < merges->length && status == 0; rank++) {
        const char *left, *right;
        size_t left_length, right_length;
        if (merge_parts(&merges->items[rank], &left, &left_length, &right, &right_length)) {
            status = tokenizer_error(err, errlen, "model.merges[%zu] is not \"a b\" or [\"a\", \"b\"]", rank);
            break;
        }
        int left_id = vocab_lookup(t, left, left_length), right_id = vocab_lookup(t, right, right_length);
        if (left_id < 0 || right_id < 0) {
            const char *missing = left_id < 0 ? left : right;
            size_t missing_length = left_id < 0 ? left_length : right_length;
            status = tokenizer_error(err, errlen, "model.merges[%zu] names '%.*s' which is not in the vocab",
                                     rank, (int)(missing_length < 60 ? missing_length : 60), missing);
            break;
        }
        if (left_length + right_length > joined_capacity) {
            char *bigger = realloc(joined, left_length + right_length);
            if (!bigger) { status = tokenizer_error(err, errlen, "out of memory"); break; }
            joined = bigger;
            joined_capacity = left_length + right_length;
        }
        memcpy(joined, left, left_length);
        memcpy(joined + left_length, right, right_length);
        int merged = vocab_lookup(t, joined, left_length + right_length);
        if (merged < 0) {
            status = tokenizer_error(err, errlen, "model.merges[%zu]: '%.*s' + '%.*s' is not in the vocab",
                                     rank, (int)(left_length < 40 ? left_length : 40), left,
                                     (int)(right_length < 40 ? right_length : 40), right);
            break;
        }
        MergeSlot *slot = merge_slot(t, left_id, right_id);
        slot->pair = (uint64_t)(uint32_t)left_id << 32 | (uint32_t)right_id;
        slot->rank = (int)rank;
        slot->merged = merged;
    }
    free(joined);
    return status;
}

/* qsort order of added tokens: (normalized, first byte, length descending, id), so that the
   candidates at a position are contiguous and the longest comes first. */
static int compare_added(const void *a, const void *b) {
    const AddedToken *x = a, *y = b;
    if (x->normalized != y->normalized) return x->normalized - y->normalized;
    if (x->first_byte != y->first_byte) return x->first_byte - y->first_byte;
    if (x->bytes_length != y->bytes_length) return x->bytes_length > y->bytes_length ? -1 : 1;
    return x->id - y->id;
}

/* Loads added_tokens: their contents become the decoded bytes of their ids (overriding the
   vocab), and the sorted match table.  Refuses empty contents, the lstrip, rstrip and
   single_word options, an id given twice, and an added token the vocab disagrees with (the
   library takes an added token's id from the vocab when its content is there, so the file
   would mean two things): its id spelled otherwise in the vocab, or its content in the vocab
   under another id.  Returns 0, or -1 with a message. */
static int load_added(Tokenizer *t, const Json *added, size_t *bytes_capacity, char *err, size_t errlen) {
    if (!added || added->length == 0) return 0;
    t->added = calloc(added->length, sizeof *t->added);
    if (!t->added) return tokenizer_error(err, errlen, "out of memory");
    for (size_t i = 0; i < added->length; i++) {
        const Json *entry = &added->items[i];
        const Json *content = json_get(entry, "content");
        if (!content || content->type != JSON_STRING || content->length == 0)
            return tokenizer_error(err, errlen, "added_tokens[%zu]: missing or empty content", i);
        static const char *const options[] = { "lstrip", "rstrip", "single_word" };
        for (int k = 0; k < 3; k++)
            if (!json_is_off(json_get(entry, options[k])))
                return tokenizer_error(err, errlen, "added token '%.60s' uses %s, which is unsupported",
                                       content->string, options[k]);
        AddedToken *token = &t->added[t->n_added++];
        token->id = json_id(json_get(entry, "id"));
        const TokenInfo *known = &t->tokens[token->id];
        int vocab_id = vocab_lookup(t, content->string, content->length);
        if (known->in_vocab && vocab_id != token->id) {
            size_t n = known->spelling_length < 60 ? known->spelling_length : 60;
            return tokenizer_error(err, errlen, "added token '%.60s' has id %d, which model.vocab gives to '%.*s'",
                                   content->string, token->id, (int)n, t->spellings + known->spelling_offset);
        }
        if (vocab_id >= 0 && vocab_id != token->id)
            return tokenizer_error(err, errlen, "added token '%.60s' has id %d but model.vocab gives it id %d",
                                   content->string, token->id, vocab_id);
        if (known->defined && !known->in_vocab)
            return tokenizer_error(err, errlen, "added_tokens: id %d is given twice", token->id);
        token->normalized = !json_is_off(json_get(entry, "normalized"));
        token->bytes_length = content->length;
        token->first_byte = (unsigned char)content->string[0];
        if (append_bytes(&t->bytes, &t->bytes_size, bytes_capacity, content->string, content->length,
                         &token->bytes_offset))
            return tokenizer_error(err, errlen, "out of memory");
        TokenInfo *info = &t->tokens[token->id];
        info->bytes_offset = token->bytes_offset;
        info->bytes_length = token->bytes_length;
        info->defined = 1;
    }
    qsort(t->added, t->n_added, sizeof *t->added, compare_added);
    /* added_start[pass][b] = the first token whose (normalized, first byte) >= (pass, b). */
    size_t k = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int b = 0; b <= 256; b++) {
            while (k < t->n_added && (t->added[k].normalized < pass ||
                                      (t->added[k].normalized == pass && t->added[k].first_byte < b)))
                k++;
            t->added_start[pass][b] = k;
        }
    return 0;
}

/* Frees everything a Tokenizer owns and zeroes it.  Safe on a zeroed or failed Tokenizer. */
static void tokenizer_free(Tokenizer *t) {
    free(t->tokens);
    free(t->spellings);
    free(t->bytes);
    free(t->vocab_slots);
    free(t->merge_slots);
    free(t->added);
    memset(t, 0, sizeof *t);
}

/* Loads a tokenizer from the parsed tokenizer.json `root` (which the caller still owns and may
   free afterwards).  Returns 0, or -1 with a message in err[errlen] and *t left empty. */
static int tokenizer_load_json(Tokenizer *t, const Json *root, char *err, size_t errlen) {
    memset(t, 0, sizeof *t);
    init_byte_level(t);
    if (!root || root->type != JSON_OBJECT) return tokenizer_error(err, errlen, "not a JSON object");
    const Json *model = json_get(root, "model");
    if (load_model_options(t, model, err, errlen) || load_pipeline(t, root, err, errlen)) goto fail;
    const Json *vocab = json_get(model, "vocab"), *merges = json_get(model, "merges");
    const Json *added = json_get(root, "added_tokens");
    if (!vocab || vocab->type != JSON_OBJECT) { tokenizer_error(err, errlen, "model.vocab is not an object"); goto fail; }
    if (!merges || merges->type != JSON_ARRAY) { tokenizer_error(err, errlen, "model.merges is not an array"); goto fail; }
    if (added && added->type == JSON_NULL) added = NULL;
    if (added && added->type != JSON_ARRAY) { tokenizer_error(err, errlen, "added_tokens is not an array"); goto fail; }
    size_t bytes_capacity = 0;
    if (load_ids(t, vocab, added, err, errlen) || load_vocab(t, vocab, &bytes_capacity, err, errlen) ||
        load_merges(t, merges, err, errlen) || load_added(t, added, &bytes_capacity, err, errlen))
        goto fail;
    return 0;
fail:
    tokenizer_free(t);
    return -1;
}

/* Reads and loads the tokenizer.json at `path`.  Returns 0, or -1 with "path: what" in err. */
static int tokenizer_load_file(Tokenizer *t, const char *path, char *err, size_t errlen) {
    memset(t, 0, sizeof *t);
    char message[400];
    size_t size;
    char *data = read_file(path, &size);
    if (!data)
        return tokenizer_error(err, errlen, "cannot read %s: %s", path, errno == EINVAL ? "not a regular file" : strerror(errno));
    Json *root = json_parse(data, size, message, sizeof message);
    free(data);
    if (!root) return tokenizer_error(err, errlen, "%s: %s", path, message);
    int status = tokenizer_load_json(t, root, message, sizeof message);
    json_free(root);
    if (status) return tokenizer_error(err, errlen, "%s: %s", path, message);
    return 0;
}

/* ---------- Encoding ---------- */

/* A possible merge of the adjacent symbols at `left` and `right` (byte positions in the piece),
   valid while they still hold `left_id` and `right_id`. */
typedef struct { int rank, left, right, left_id, right_id, merged; } MergeCandidate;

/* Scratch state of one tokenizer_encode call. */
typedef struct {
    const Tokenizer *t;
    int *ids;                    /* output, room for max_ids */
    size_t max_ids, count;       /* count keeps growing past max_ids */
    int *symbol_ids, *next, *prev;   /* BPE symbols of the current piece; -1 id = merged away */
    MergeCandidate *heap;        /* min-heap on (rank, left) */
    size_t heap_size, capacity;  /* capacity: piece bytes the arrays can hold */
    char *spelling;              /* ByteLevel spelling of a piece (ignore_merges only) */
    int failed;                  /* out of memory */
} Encoder;

/* Appends one id to the output (counting it even when there is no room). */
static void emit(Encoder *e, int id) {
    if (e->count < e->max_ids) e->ids[e->count] = id;
    e->count++;
}

/* Makes the scratch arrays hold a piece of n bytes.  Returns 0, or -1 (and sets failed). */
static int reserve_piece(Encoder *e, size_t n) {
    if (n <= e->capacity) return 0;
    size_t capacity = n > 2 * e->capacity ? n : 2 * e->capacity;
    int *symbol_ids = realloc(e->symbol_ids, capacity * sizeof(int));
    if (symbol_ids) e->symbol_ids = symbol_ids;
    int *next = realloc(e->next, capacity * sizeof(int));
    if (next) e->next = next;
    int *prev = realloc(e->prev, capacity * sizeof(int));
    if (prev) e->prev = prev;
    MergeCandidate *heap = realloc(e->heap, capacity * 3 * sizeof(MergeCandidate));
    if (heap) e->heap = heap;
    char *spelling = realloc(e->spelling, capacity * 2);
    if (spelling) e->spelling = spelling;
    if (!symbol_ids || !next || !prev || !heap || !spelling) { e->failed = 1; return -1; }
    e->capacity = capacity;
    return 0;
}

/* Whether candidate a should be merged before b: lower rank, then further left. */
static int candidate_before(const MergeCandidate *a, const MergeCandidate *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->left < b->left;
}

/* Pushes the merge of the symbols at `left` and `right` onto the heap, if the pair has one. */
static void push_candidate(Encoder *e, int left, int right) {
    const MergeSlot *slot = merge_slot(e->t, e->symbol_ids[left], e->symbol_ids[right]);
    if (slot->rank < 0) return;
    MergeCandidate c = { slot->rank, left, right, e->symbol_ids[left], e->symbol_ids[right], slot->merged };
    size_t i = e->heap_size++;
    while (i > 0 && candidate_before(&c, &e->heap[(i - 1) / 2])) {
        e->heap[i] = e->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    e->heap[i] = c;
}

/* Removes and returns the first candidate of the (non-empty) heap. */
static MergeCandidate pop_candidate(Encoder *e) {
    MergeCandidate top = e->heap[0], last = e->heap[--e->heap_size];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= e->heap_size) break;
        if (child + 1 < e->heap_size && candidate_before(&e->heap[child + 1], &e->heap[child])) child++;
        if (!candidate_before(&e->heap[child], &last)) break;
        e->heap[i] = e->heap[child];
        i = child;
    }
    e->heap[i] = last;
    return top;
}

/* Encodes one pre-tokenized piece s[0..n) (n >= 1) with BPE and emits its ids.  Each merge
   pushes at most two candidates, so the heap never exceeds 3n entries. */
static void bpe_piece(Encoder *e, const unsigned char *s, size_t n) {
    const Tokenizer *t = e->t;
    if (n == 1) { emit(e, t->byte_ids[s[0]]); return; }
    if (reserve_piece(e, n)) return;
    if (t->ignore_merges) {
        size_t length = 0;
        for (size_t i = 0; i < n; i++) length += utf8_encode(e->spelling + length, t->byte_chars[s[i]]);
        int id = vocab_lookup(t, e->spelling, length);
        if (id >= 0) { emit(e, id); return; }
    }
    int count = (int)n;
    for (int i = 0; i < count; i++) {
        e->symbol_ids[i] = t->byte_ids[s[i]];
        e->next[i] = i + 1 < count ? i + 1 : -1;
        e->prev[i] = i - 1;
    }
    e->heap_size = 0;
    for (int i = 0; i + 1 < count; i++) push_candidate(e, i, i + 1);
    while (e->heap_size > 0) {
        MergeCandidate c = pop_candidate(e);
        if (e->symbol_ids[c.left] != c.left_id || e->next[c.left] != c.right ||
            e->symbol_ids[c.right] != c.right_id)
            continue; /* stale: one side has changed since it was pushed */
        e->symbol_ids[c.left] = c.merged;
        e->symbol_ids[c.right] = -1;
        e->next[c.left] = e->next[c.right];
        if (e->next[c.left] >= 0) e->prev[e->next[c.left]] = c.left;
        if (e->prev[c.left] >= 0) push_candidate(e, e->prev[c.left], c.left);
        if (e->next[c.left] >= 0) push_candidate(e, c.left, e->next[c.left]);
    }
    for (int i = 0; i >= 0; i = e->next[i]) emit(e, e->symbol_ids[i]);
}

/* Applies pre-tokenizer pattern number `level` to s[0..n): every match and every gap between
   matches goes on to the next level; past the last pattern, to BPE. */
static void pre_tokenize(Encoder *e, int level, const unsigned char *s, size_t n) {
    if (n == 0 || e->failed) return;
    if (level == e->t->n_patterns) { bpe_piece(e, s, n); return; }
    Pattern pattern = e->t->patterns[level];
    size_t gap = 0, i = 0;
    while (i < n) {
        size_t end = pattern_match(pattern, s, n, i);
        if (end > i) {
            pre_tokenize(e, level + 1, s + gap, i - gap);
            pre_tokenize(e, level + 1, s + i, end - i);
            gap = i = end;
        } else {
            uint32_t cp;
            i += utf8_decode(s + i, n - i, &cp);
        }
    }
    pre_tokenize(e, level + 1, s + gap, n - gap);
}

/* Returns the longest added token of `pass` (0: not normalized, 1: normalized) that s[0..n)
   starts with, or NULL. */
static const AddedToken *match_added(const Tokenizer *t, int pass, const unsigned char *s, size_t n) {
    for (size_t k = t->added_start[pass][s[0]]; k < t->added_start[pass][s[0] + 1]; k++) {
        const AddedToken *a = &t->added[k];
        if (a->bytes_length <= n && memcmp(t->bytes + a->bytes_offset, s, a->bytes_length) == 0) return a;
    }
    return NULL;
}

/* Cuts the added tokens of `pass` out of s[0..n), emitting their ids; the text between them
   goes to the next pass, and after the last pass to the pre-tokenizer. */
static void split_added(Encoder *e, int pass, const unsigned char *s, size_t n) {
    if (pass == 2) { pre_tokenize(e, 0, s, n); return; }
    size_t gap = 0, i = 0;
    while (i < n) {
        const AddedToken *a = match_added(e->t, pass, s + i, n - i);
        if (!a) { i++; continue; }
        split_added(e, pass + 1, s + gap, i - gap);
        emit(e, a->id);
        gap = i = i + a->bytes_length;
    }
    split_added(e, pass + 1, s + gap, n - gap);
}

/* Encodes n bytes of text from pass `pass` of split_added on: 0 matches the added tokens, 2
   none of them.  Writes up to max_ids ids and returns how many the text needs (see
   tokenizer_encode). */
static int encode_from(const Tokenizer *t, int pass, const char *text, size_t n, int *ids, int max_ids) {
    if (n > INT32_MAX) return -1;
    Encoder e = { 0 };
    e.t = t;
    e.ids = ids;
    e.max_ids = max_ids > 0 ? (size_t)max_ids : 0;
    if (n) split_added(&e, pass, (const unsigned char *)text, n);
    free(e.symbol_ids);
    free(e.next);
    free(e.prev);
    free(e.heap);
    free(e.spelling);
    return e.failed ? -1 : (int)e.count;
}

/* Encodes n bytes of text (any bytes; no BOS is added), as the library does.  Writes up to
   max_ids ids and returns how many the text needs, which may exceed max_ids (call again with a
   bigger array); ids may be NULL when max_ids is 0.  Returns -1 if the text is longer than
   INT_MAX bytes or memory runs out. */
static int tokenizer_encode(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids) {
    return encode_from(t, 0, text, n, ids, max_ids);
}

/* tokenizer_encode with no added token matched: "<｜User｜>" in the text is encoded as the
   characters it is made of, like any other text, never as the control token (what a user
   types must not be able to open a turn of another role). */
static int tokenizer_encode_plain(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids) {
    return encode_from(t, 2, text, n, ids, max_ids);
}

/* ---------- Decoding ---------- */

/* Returns the bytes that id `id` decodes to (an added token's content, or a vocab token's
   spelling mapped back through ByteLevel) and stores their count in *len; the bytes are not
   NUL-terminated.  Returns NULL (and *len = 0) for an id that is out of range or unused. */
static const char *tokenizer_token_bytes(const Tokenizer *t, int id, size_t *len) {
    *len = 0;
    if (id < 0 || id >= t->n_ids || !t->tokens[id].defined) return NULL;
    *len = t->tokens[id].bytes_length;
    return *len ? t->bytes + t->tokens[id].bytes_offset : "";
}

/* Returns the id of `token`: an added token's content (e.g. "<｜User｜>"), else a vocab entry
   in its ByteLevel spelling (e.g. "Ġhello" for " hello"); -1 if neither. */
static int tokenizer_find(const Tokenizer *t, const char *token) {
    size_t length = strlen(token);
    for (size_t k = 0; k < t->n_added; k++) {
        const AddedToken *a = &t->added[k];
        if (a->bytes_length == length && memcmp(t->bytes + a->bytes_offset, token, length) == 0) return a->id;
    }
    return t->vocab_slots ? vocab_lookup(t, token, length) : -1;
}








/* ============================================================================= command line */

/* What the command line asked for. */
typedef struct {
    const char *model_dir, *prompt, *prompt_file, *dump_logits;   /* NULL when absent */
    const char *perplexity;                                       /* --perplexity FILE, NULL when absent */
    int *ids, n_ids;                                              /* --ids (ids NULL when absent) */
    int n_generate, max_ctx, max_tokens, chat, interactive, tokenize_only, seed_given;
    int special;                                                  /* --special: TEXT_SPECIAL or 0 */
    int cpu, gpu;                                                 /* --cpu, --gpu */
    int threads;                                                  /* -t: CPU threads, 0: the usable cores */
    int bench, bench_layers, bench_position;                      /* --bench, --layers, --position */
    ModelShape bench_shape;                                       /* --model */
    const char *stops[MAX_STOPS];                                 /* --stop, n_stops of them */
    int n_stops;
    float temperature, top_p;
    uint64_t seed;
    const char *system;                                           /* --system TEXT, NULL when absent */
    int no_shift;                                                 /* --no-shift */
    size_t gpu_mem;                                               /* --gpu-mem in bytes, 0 when absent */
    int gpus;                                                     /* --gpus N, 0 when absent (gpu_default_count) */
    int hosts, host;                                              /* --hosts N (0: absent), --host I (-1: absent) */
    const char *nccl_id;                                          /* --nccl-id FILE, NULL when absent */
    int top_k, repeat_last_n;                                     /* --top-k (0: off), --repeat-last-n */
    float min_p, repeat_penalty;                                  /* --min-p (0: off), --repeat-penalty (1: off) */
    const char *expert_profile;                                   /* --expert-profile FILE, NULL when absent */
} Options;

/* The -h text. */
static void usage(FILE *f) {
    fprintf(f,
            "usage: nvfp4 [options] MODEL_DIR [\"prompt\"]\n"
            "Runs a DeepSeek V4 checkpoint (BF16, FP8, MXFP4 and NVFP4 tensors) on a prompt.\n\n"
            "  -p, --prompt TEXT  the prompt (instead of the argument after MODEL_DIR)\n"
            "  -f, --file FILE    read the prompt from FILE, as it is; -f - reads standard input\n"
            "                     (at most %d MiB, the limit of every prompt, --perplexity text and -i line)\n"
            "  -i, --interactive  one turn per line of standard input, until EOF, /exit or Ctrl-C at the\n"
            "                     prompt: plain text the model continues, or with a chat template\n"
            "                     (tokenizer_config.json) or --chat, DeepSeek V4's chat format\n"
            "  -n N               generate at most N tokens (default 256), -1: until EOS or a full\n"
            "                     context; stops earlier at EOS\n"
            "  --stop STRING      end generation when the text holds STRING (not printed); up to %d\n"
            "                     of them, each at most %d bytes\n"
            "  --temp T           sampling temperature, 0 = greedy (default 0.6)\n"
            "  --top-p P          nucleus sampling: keep the most likely tokens up to P, 0 < P <= 1\n"
            "                     (default 0.95)\n"
            "  --top-k K          keep only the K most likely tokens (default 0: all)\n"
            "  --min-p P          keep only tokens at least P times as likely as the most likely,\n"
            "                     0 to 1 (default 0: all)\n"
            "  --repeat-penalty R make the last --repeat-last-n tokens less likely: their logits\n"
            "                     divided by R > 0 (multiplied when negative; default 1: off)\n"
            "  --repeat-last-n N  the tokens --repeat-penalty looks back on (default 64, 0: none);\n"
            "                     these three run on the CPU path only so far\n"
            "  -s, --seed S       random seed for sampling, 0 to 18446744073709551615 (default: from\n"
            "                     the clock, printed when sampling)\n"
            "  -c, --ctx C        maximum context in tokens, prompt included (default 4096)\n"
            "  --chunk T          prefill chunk size: at most T tokens per forward pass (default 128)\n"
            "  --chat             wrap the prompt (-i: every line) in DeepSeek V4's chat format\n"
            "  --system TEXT      the system prompt of the chat format, after BOS\n"
            "  --no-shift         -i: end the conversation when the context is full, instead of\n"
            "                     dropping the oldest turns\n"
            "  --special          read special tokens typed in the text (prompt, -f, -i, --perplexity),\n"
            "                     e.g. <｜User｜>, as those tokens; by default they are plain text\n"
            "  --ids 0,17,42      feed exactly these token ids (nothing prepended) instead of a prompt\n"
            "  --tokenize         print the prompt's ids as they would be fed, comma-separated, and exit\n"
            "  --dump-logits FILE write float32 logits, one row of vocab_size per evaluated position\n"
            "  --perplexity FILE  print the perplexity of the text in FILE (- reads standard input), in\n"
            "                     windows of --ctx tokens, instead of generating\n"
            "  --cpu              run on the CPU even when a GPU is usable\n"
            "  -t, --threads N    CPU threads, 1 to 1024 (default: the cores this process may use);\n"
            "                     the output is the same for every N\n"
            "  --gpu              run on the GPU, or stop with the reason when none is usable\n"
            "                     (default: the GPU when one is usable, else the CPU)\n"
            "  --bench            time the GPU path on V4-Flash's shapes with random weights (no MODEL_DIR)\n"
            "  --model flash|pro  --bench: V4-Flash's shapes (default) or V4-Pro's\n"
            "  --layers N         --bench: layers of the model's pattern (default 8)\n"
            "  --position P       --bench: decode after a prefill of P tokens (default 4096)\n"
            "  --gpu-mem GIB      GPU memory the model may take, in GiB (default: all that is free); the\n"
            "                     routed experts that do not fit are read from page-locked host memory\n"
            "  --expert-profile FILE  place the most used experts on the GPU by FILE's counts, and add\n"
            "                     this run's to it at the end (made when missing)\n"
            "  --gpus N           divide the model over GPUs 0 .. N-1 (1 to 8; default: 1 when the model\n"
            "                     fits GPU 0, else all): each holds 1/N of the routed experts, the\n"
            "                     shared expert, the head and attention, a copy of the rest\n"
            "  --hosts N --host I --nccl-id FILE  divide it over the GPUs of N hosts (one nvfp4 each,\n"
            "                     the same command but I, 0 to N-1), joined by NCCL through FILE, on\n"
            "                     storage they share (host 0 writes it: remove an old one first)\n"
            "  -q, --quiet        print no notes (running on the CPU, loaded, seed, replaced FILE), no\n"
            "                     progress bar and no stats line; warnings and errors are printed\n"
            "  --version          print the version and the git commit it was built from\n"
            "  -h, --help         show this help\n"
            "  --                 end of the options: what follows is MODEL_DIR and the prompt, even\n"
            "                     when it begins with '-'\n"
            "An option's value may follow it (--ctx 512) or be joined with '=' (--ctx=512, -n=8).\n"
            "No option takes a negative number but -n -1. Exit status: 0 done, 1 bad input (model, files, prompt),\n"
            "2 bad command line, 130 interrupted (SIGINT).\n", MAX_PROMPT_MIB, MAX_STOPS, MAX_STOP_BYTES);
}

/* Print "nvfp4: error: ..." and exit with status 2: the command line itself is wrong. */
static void usage_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vmessage("error: ", fmt, ap);
    va_end(ap);
    exit(2);
}

/* Flush stdout and exit 0 (after -h, --version and --tokenize); fatal on a write error. */
static void exit_done(void) {
    write_stdout(NULL, 0, 1);
    exit(0);
}

/* 1 while parse_options reads an option given as --opt=value: its value cannot be an option. */
static int value_joined;

/* The value of `option` (the next argument, or what follows '=' in --opt=value): refused when
   absent, or when it is a separate argument that begins with '-' (no option takes a negative
   number; -f and --perplexity take "-" for standard input). */
static const char *option_value(const char *option, const char *value) {
    if (!value) usage_error("%s needs a value", option);
    int stdin_ok = !strcmp(option, "-f") || !strcmp(option, "--file") || !strcmp(option, "--perplexity");
    if (value[0] == '-' && (value[1] || !stdin_ok) && !value_joined)
        usage_error("%s needs a value, not \"%s\" (a prompt that begins with '-' goes after --, a file as ./%s)", option,
                    value, value);
    return value;
}

/* Read the decimal digits at s into *v: at least one, and nothing else (no sign, space,
   fraction, exponent or hex). Returns the first byte after them, or NULL when there are none or
   the number passes UINT64_MAX. */
static const char *read_whole(const char *s, uint64_t *v) {
    const char *p = s;
    for (*v = 0; *p >= '0' && *p <= '9'; p++) {
        if (*v > (UINT64_MAX - (uint64_t)(*p - '0')) / 10) return NULL;
        *v = *v * 10 + (uint64_t)(*p - '0');
    }
    return p == s ? NULL : p;
}

/* A whole-number option: the whole value must be decimal digits, within [lo, hi]. */
static uint64_t whole_arg(const char *option, const char *value, uint64_t lo, uint64_t hi) {
    uint64_t v;
    const char *end = read_whole(option_value(option, value), &v);
    if (!end || *end || v < lo || v > hi)
        usage_error("%s: \"%s\" is not a whole number from %llu to %llu", option, value, (unsigned long long)lo,
                    (unsigned long long)hi);
    return v;
}

/* A real-number option within [lo, hi] (within (lo, hi] when `above`: lo itself refused), in
   plain decimal notation (digits, a point, an exponent: no sign, space, hex, inf or nan). The
   message states the range as it is accepted. */
static double real_arg(const char *option, const char *value, double lo, double hi, int above) {
    option_value(option, value);
    char *end;
    double v = strtod(value, &end);
    int plain = ((value[0] >= '0' && value[0] <= '9') || value[0] == '.') && strspn(value, "0123456789.eE+-") == strlen(value);
    if (!plain || *end || !(v >= lo && v <= hi) || (above && v == lo))
        usage_error(above ? "%s: \"%s\" is not a number greater than %g and at most %g" : "%s: \"%s\" is not a number from %g to %g",
                    option, value, lo, hi);
    return v;
}

/* A real-number option within [lo, hi] (real_arg). */
static double number_arg(const char *option, const char *value, double lo, double hi) {
    return real_arg(option, value, lo, hi, 0);
}

/* Parse "--ids 0,17,42": comma-separated decimal ids. Returns the count; *ids is allocated.
   Whether each id is in the model's vocabulary is checked once it is loaded (check_ids). */
static int ids_arg(const char *list, int **ids) {
    size_t n = 1;
    for (const char *p = list; *p; p++) n += *p == ',';
    *ids = xcalloc(n, sizeof(int));
    int count = 0;
    for (const char *p = list;; p++) {
        uint64_t v;
        p = read_whole(p, &v);
        if (!p || (*p && *p != ',')) usage_error("--ids: \"%s\" is not a comma-separated list of token ids", list);
        if (v > INT_MAX) usage_error("--ids: \"%s\" holds an id larger than %d", list, INT_MAX);
        (*ids)[count++] = (int)v;
        if (!*p) return count;
    }
}

/* Fatal when one of ids[n] is outside the vocabulary. */
static void check_ids(const int *ids, int n, int vocab) {
    for (int i = 0; i < n; i++)
        if (ids[i] >= vocab) fatal("--ids: token id %d is outside the vocabulary (0..%d)", ids[i], vocab - 1);
}

/* The kinds of run, and the options that have an effect in some of them only: given in another
   kind of run, such an option would be silently ignored, so it is refused (exit 2). `valued`
   options take a value, and are refused when given twice (one value would be dropped). */
enum { RUN_TEXT = 1, RUN_CHAT = 2, RUN_TOKENIZE = 4, RUN_PERPLEXITY = 8, RUN_BENCH = 16 };
static const struct { const char *name, *alias; int runs, valued; } scoped_options[] = {
    {"-n", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--temp", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--top-p", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--top-k", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--min-p", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--repeat-penalty", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--repeat-last-n", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--seed", "-s", RUN_TEXT | RUN_CHAT, 1},
    {"--stop", NULL, RUN_TEXT | RUN_CHAT, 0},
    {"--ctx", "-c", RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY, 1},
    {"--chunk", NULL, RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY, 1},
    {"--dump-logits", NULL, RUN_TEXT | RUN_CHAT, 1},
    {"--perplexity", NULL, RUN_PERPLEXITY, 1},
    {"--chat", NULL, RUN_TEXT | RUN_CHAT | RUN_TOKENIZE, 0},
    {"--special", NULL, RUN_TEXT | RUN_CHAT | RUN_TOKENIZE | RUN_PERPLEXITY, 0},
    {"-i", "--interactive", RUN_CHAT, 0},
    {"--tokenize", NULL, RUN_TOKENIZE, 0},
    {"--cpu", NULL, RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY, 0},
    {"--gpu", NULL, RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY | RUN_BENCH, 0},
    {"-t", "--threads", RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY, 1},
    {"--layers", NULL, RUN_BENCH, 1},
    {"--position", NULL, RUN_BENCH, 1},
    {"--model", NULL, RUN_BENCH, 1},
    {"--system", NULL, RUN_TEXT | RUN_CHAT | RUN_TOKENIZE, 1},
    {"--no-shift", NULL, RUN_CHAT, 0},
    {"--gpu-mem", NULL, RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY | RUN_BENCH, 1},
    {"--expert-profile", NULL, RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY, 1},
    {"--gpus", NULL, RUN_TEXT | RUN_CHAT | RUN_PERPLEXITY | RUN_BENCH, 1},
    {"--hosts", NULL, RUN_TEXT, 1},
    {"--host", NULL, RUN_TEXT, 1},
    {"--nccl-id", NULL, RUN_TEXT, 1},
};

/* Refuse each option of scoped_options given (bit k of `given`) for a kind of run it has no
   effect in (`run`, RUN_*). */
static void check_scoped_options(unsigned given, int run) {
    for (size_t k = 0; k < sizeof scoped_options / sizeof *scoped_options; k++) {
        if (!(given >> k & 1) || scoped_options[k].runs & run) continue;
        const char *why = scoped_options[k].runs == RUN_BENCH ? "without --bench"
                        : run == RUN_BENCH      ? "with --bench, which makes its own model and tokens on the GPU"
                        : scoped_options[k].runs == RUN_CHAT ? "without -i"
                        : run == RUN_PERPLEXITY ? "with --perplexity, which scores its text and generates nothing"
                        : run == RUN_TOKENIZE   ? "with --tokenize, which only prints the prompt's ids"
                                                : "with -i";
        usage_error("%s does nothing %s", scoped_options[k].name, why);
    }
}

/* The command line as Options; usage_error (exit 2) on anything malformed. */
static Options parse_options(int argc, char **argv) {
    Options o = {0};
    o.n_generate = 256;
    o.max_ctx = 4096;
    o.max_tokens = 128;
    o.temperature = 0.6f;
    o.top_p = 0.95f;
    o.repeat_penalty = 1;
    o.repeat_last_n = 64;
    o.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    o.bench_layers = 8;
    o.bench_position = 4096;
    o.host = -1;
    int n_positional = 0, n_prompts = 0, options_ended = 0;
    unsigned given = 0;   /* bit k: scoped_options[k] was given */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (options_ended || a[0] != '-' || !a[1]) {   /* MODEL_DIR, then the prompt ("-" alone is one) */
            if (n_positional == 0 && !*a) usage_error("the model directory name is empty");
            if (n_positional == 0) o.model_dir = a;
            else if (n_positional == 1) o.prompt = a, n_prompts++;
            else usage_error("unexpected argument \"%s\" (quote the prompt; see nvfp4 -h)", a);
            n_positional++;
            continue;
        }
        /* --opt=value (and -n=8): split into the option's name and its value, which the branches
           below then read as if it were the next argument; their i++ is undone after them */
        char name[64];
        const char *equals = strchr(a, '=');
        value_joined = equals && (size_t)(equals - a) < sizeof name;
        if (value_joined) {
            memcpy(name, a, (size_t)(equals - a));
            name[equals - a] = 0;
            a = name, v = equals + 1;
        }
        int at = i;
        for (size_t k = 0; k < sizeof scoped_options / sizeof *scoped_options; k++)
            if (!strcmp(a, scoped_options[k].name) || (scoped_options[k].alias && !strcmp(a, scoped_options[k].alias))) {
                if (given >> k & 1 && scoped_options[k].valued) usage_error("%s is given twice: give it once", a);
                given |= 1u << k;
            }
        if (!strcmp(a, "--")) options_ended = 1;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            if (!value_joined) { usage(stdout); exit_done(); }
        } else if (!strcmp(a, "--version")) {
            if (!value_joined) { printf("nvfp4 %s (commit %s)\n", NVFP4_VERSION, NVFP4_COMMIT); exit_done(); }
        }
        else if (!strcmp(a, "-n")) { o.n_generate = v && !strcmp(v, "-1") ? INT_MAX : (int)whole_arg(a, v, 1, 1 << 30); i++; }
        else if (!strcmp(a, "--stop")) {
            const char *stop = option_value(a, v);
            if (o.n_stops == MAX_STOPS) usage_error("--stop is given more than %d times", MAX_STOPS);
            if (!*stop || strlen(stop) > MAX_STOP_BYTES || utf8_invalid_at(stop, strlen(stop)) < strlen(stop))
                usage_error("--stop: \"%s\" is not 1 to %d bytes of UTF-8 text", stop, MAX_STOP_BYTES);
            o.stops[o.n_stops++] = stop;
            i++;
        }
        else if (!strcmp(a, "--temp")) { o.temperature = (float)number_arg(a, v, 0, 100); i++; }
        else if (!strcmp(a, "--top-p")) { o.top_p = (float)real_arg(a, v, 0, 1, 1); i++; }
        else if (!strcmp(a, "--top-k")) { o.top_k = (int)whole_arg(a, v, 0, 1 << 30); i++; }
        else if (!strcmp(a, "--min-p")) { o.min_p = (float)number_arg(a, v, 0, 1); i++; }
        else if (!strcmp(a, "--repeat-penalty")) { o.repeat_penalty = (float)real_arg(a, v, 0, 100, 1); i++; }
        else if (!strcmp(a, "--repeat-last-n")) { o.repeat_last_n = (int)whole_arg(a, v, 0, REPEAT_LAST_N_MAX); i++; }
        else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) { o.seed = whole_arg(a, v, 0, UINT64_MAX); o.seed_given = 1; i++; }
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) { o.max_ctx = (int)whole_arg(a, v, 1, 1 << 30); i++; }
        else if (!strcmp(a, "--chunk")) { o.max_tokens = (int)whole_arg(a, v, 1, 1 << 20); i++; }
        else if (!strcmp(a, "--ids")) { free(o.ids); o.n_ids = ids_arg(option_value(a, v), &o.ids); n_prompts++; i++; }
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { o.prompt = option_value(a, v); n_prompts++; i++; }
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) { o.prompt_file = option_value(a, v); n_prompts++; i++; }
        else if (!strcmp(a, "--dump-logits")) { o.dump_logits = option_value(a, v); i++; }
        else if (!strcmp(a, "--perplexity")) { o.perplexity = option_value(a, v); i++; }
        else if (!strcmp(a, "-i") || !strcmp(a, "--interactive")) o.interactive = 1;
        else if (!strcmp(a, "--chat")) o.chat = 1;
        else if (!strcmp(a, "--special")) o.special = TEXT_SPECIAL;
        else if (!strcmp(a, "--tokenize")) o.tokenize_only = 1;
        else if (!strcmp(a, "--cpu")) o.cpu = 1;
        else if (!strcmp(a, "--gpu")) o.gpu = 1;
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { o.threads = (int)whole_arg(a, v, 1, 1024); i++; }
        else if (!strcmp(a, "--bench")) o.bench = 1;
        else if (!strcmp(a, "--layers")) { o.bench_layers = (int)whole_arg(a, v, 1, MAX_LAYERS); i++; }
        else if (!strcmp(a, "--position")) { o.bench_position = (int)whole_arg(a, v, 1, 1 << 20); i++; }
        else if (!strcmp(a, "--gpus")) { o.gpus = (int)whole_arg(a, v, 1, GPUS_MAX); i++; }
        else if (!strcmp(a, "--hosts")) { o.hosts = (int)whole_arg(a, v, 1, HOSTS_MAX); i++; }
        else if (!strcmp(a, "--host")) { o.host = (int)whole_arg(a, v, 0, HOSTS_MAX - 1); i++; }
        else if (!strcmp(a, "--nccl-id")) { o.nccl_id = option_value(a, v); i++; }
        else if (!strcmp(a, "--model")) {
            const char *name = option_value(a, v);
            if (!strcmp(name, "flash")) o.bench_shape = SHAPE_FLASH;
            else if (!strcmp(name, "pro")) o.bench_shape = SHAPE_PRO;
            else usage_error("--model takes flash or pro, not '%s'", name);
            i++;
        }
        else if (!strcmp(a, "--system")) { o.system = option_value(a, v); i++; }
        else if (!strcmp(a, "--no-shift")) o.no_shift = 1;
        else if (!strcmp(a, "--gpu-mem")) { o.gpu_mem = (size_t)(real_arg(a, v, 0, 1 << 20, 1) * 1073741824.0); i++; }
        else if (!strcmp(a, "--expert-profile")) { o.expert_profile = option_value(a, v); i++; }
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else usage_error("unknown option %s (see nvfp4 -h)", a);
        if (value_joined && i == at) usage_error("%s takes no value: give %s, not %s", a, a, argv[at]);
        if (value_joined) i = at;   /* the value was joined: the next argument is not the value */
    }
    value_joined = 0;
    int run = o.bench ? RUN_BENCH : o.perplexity ? RUN_PERPLEXITY : o.tokenize_only ? RUN_TOKENIZE : o.interactive ? RUN_CHAT : RUN_TEXT;
    if (o.bench) {
        if (o.model_dir || n_prompts || o.cpu) usage_error("--bench takes no model, prompt or --cpu: it makes its own model on the GPU");
        check_scoped_options(given, run);
        return o;
    }
    if (!o.model_dir) { usage(stderr); exit(2); }
    if (n_prompts > 1) usage_error("give one prompt: an argument, -p, -f or --ids");
    if (o.cpu && o.gpu) usage_error("--cpu and --gpu contradict each other");
    if (o.gpu && o.threads) usage_error("-t sets the CPU's threads: it does nothing with --gpu");
    if (o.perplexity && (n_prompts || o.interactive || o.tokenize_only || o.dump_logits || o.chat))
        usage_error("--perplexity evaluates the text of its file: it takes no prompt, -i, --ids, --tokenize, --dump-logits or --chat");
    if (o.perplexity && o.max_ctx < 2) usage_error("--perplexity needs --ctx 2 or more (a window predicts its tokens from those before)");
    if (o.interactive && (o.ids || o.tokenize_only))
        usage_error("-i chats in text: it takes neither --ids nor --tokenize");
    if (o.interactive && o.prompt_file && !strcmp(o.prompt_file, "-"))
        usage_error("-i reads the conversation from standard input: -f - cannot read the prompt from it too");
    if (!n_prompts && !o.interactive && !o.perplexity) usage_error("no prompt given (nvfp4 MODEL_DIR \"prompt\", -p, -f, --ids or -i)");
    if (o.tokenize_only && o.dump_logits) usage_error("--tokenize evaluates nothing: --dump-logits would have nothing to write");
    if (o.ids && o.chat) usage_error("--ids feeds its ids as they are: --chat cannot wrap them in the chat format");
    if (o.ids && o.special) usage_error("--ids feeds its ids as they are: --special has no text to read special tokens in");
    if (o.hosts > 1 && (o.interactive || o.perplexity || o.tokenize_only))
        usage_error("--hosts runs one prompt on several hosts: not with %s", o.interactive ? "-i" : o.perplexity ? "--perplexity"
                                                                                                 : "--tokenize");
    check_scoped_options(given, run);
    if (o.system && !o.chat && !o.interactive)
        usage_error("--system is a system prompt of the chat format: give --chat too (or -i with a model that has a chat template)");
    if ((o.host >= 0 || o.nccl_id) && o.hosts < 2) usage_error("--host and --nccl-id go with --hosts 2 or more");
    if (o.hosts > 1 && (o.host < 0 || !o.nccl_id))
        usage_error("--hosts %d needs --host I (this host's, 0 to %d) and --nccl-id FILE (on storage every host reads, "
                    "where host 0 leaves what the others join with)", o.hosts, o.hosts - 1);
    if (o.hosts > 1 && o.host >= o.hosts) usage_error("--host %d: the %d hosts are numbered 0 to %d", o.host, o.hosts, o.hosts - 1);
    if (o.hosts > 1 && (o.cpu || o.dump_logits || o.expert_profile))
        usage_error("--hosts divides the model over the GPUs of several hosts: not with %s", o.cpu ? "--cpu"
                    : o.dump_logits ? "--dump-logits (the logits of every row are not gathered across hosts)"
                                    : "--expert-profile (every GPU holds its experts: nothing to place)");
    return o;
}

/* The text in file `path`, or in stdin for "-", read to its end whatever the file is (a FIFO
   or a pipe too) without a fixed buffer; fatal when it cannot be read, holds a NUL byte or is
   larger than MAX_PROMPT_BYTES, both checked as it is read, so that an endless input (-f
   /dev/zero, `yes |`) is refused at once (`what` names the text in the messages: "the
   prompt"). */
static char *read_text(const char *path, const char *what) {
    const char *name = strcmp(path, "-") ? path : "standard input";
    int fd = strcmp(path, "-") ? open(path, O_RDONLY) : 0;
    if (fd < 0) fatal("cannot open %s file %s: %s", what, path, strerror(errno));
    size_t len = 0, capacity = 1 << 16;   /* grows to MAX_PROMPT_BYTES + 1: one byte too many is refused */
    char *text = xcalloc(capacity + 1, 1);
    for (;;) {
        if (len == capacity) {
            size_t grown = 2 * capacity < MAX_PROMPT_BYTES + 1 ? 2 * capacity : MAX_PROMPT_BYTES + 1;
            char *bigger = xcalloc(grown + 1, 1);
            memcpy(bigger, text, len);
            free(text);
            text = bigger;
            capacity = grown;
        }
        ssize_t n = read(fd, text + len, capacity - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fatal("cannot read %s from %s: %s", what, name, strerror(errno));
        if (n == 0) break;
        const char *nul = memchr(text + len, 0, (size_t)n);
        if (nul) fatal("%s in %s holds a NUL byte at offset %zu", what, name, (size_t)(nul - text));
        len += (size_t)n;
        if (len > MAX_PROMPT_BYTES) fatal("%s in %s is larger than the limit of %d MiB", what, name, MAX_PROMPT_MIB);
    }
    if (fd) close(fd);
    return text;
}

/* --hosts: a hash of the command line but --host and its value, and of the prompt's text (a
   file's too): what every host must share (nccl_open_hosts). */
static uint64_t command_hash(int argc, char **argv, const char *prompt) {
    size_t n = prompt ? strlen(prompt) + 1 : 0, at = 0;
    for (int i = 1; i < argc; i++) n += strlen(argv[i]) + 1;
    char *all = xcalloc(n + 1, 1);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) {   /* and its value */
            i++;
            continue;
        }
        if (!strncmp(argv[i], "--host=", 7)) continue;
        at += (size_t)sprintf(all + at, "%s", argv[i]) + 1;   /* NUL-separated */
    }
    if (prompt) at += (size_t)sprintf(all + at, "%s", prompt) + 1;
    uint64_t h = hash_bytes(all, at);
    free(all);
    return h;
}

/* Open standard input, output and error on /dev/null where they are closed (`>&-`), so that no
   file the run opens (the logits file) takes their number and gets the text meant for them. */
static void open_standard_fds(void) {
    for (int fd = 0; fd <= 2; fd++)   /* the lowest free number: fd itself, the ones below being open */
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF && open("/dev/null", O_RDWR) < 0)
            fatal("cannot open /dev/null for the closed descriptor %d: %s", fd, strerror(errno));
}

#ifndef TESTING
int main(int argc, char **argv) {
    double started = now_seconds();
    open_standard_fds();
    Options o = parse_options(argc, argv);
    if (o.bench) {
        bench(o.bench_shape, o.bench_layers, o.bench_position, o.gpu_mem, o.gpus);
        exit_done();
    }
    install_signal_handlers();
    char *file_prompt = o.prompt_file ? read_text(o.prompt_file, "the prompt")
                      : o.perplexity  ? read_text(o.perplexity, "the text") : NULL;   /* the text of --perplexity too */
    const char *prompt = file_prompt ? file_prompt : o.prompt;
    Model model;
    Tokenizer tokenizer;
    int add_bos, *ids = NULL, n_ids = 0;
    if (o.tokenize_only) {   /* no weights are loaded */
        Config config;
        load_config(&config, o.model_dir);
        load_tokenizer(&tokenizer, &add_bos, o.model_dir, &config);
        if (o.ids) check_ids(o.ids, o.n_ids, config.vocab_size);
        n_ids = o.ids ? o.n_ids : prompt_ids_system(&tokenizer, add_bos, config.bos_id, o.system, prompt, (o.chat ? TEXT_CHAT : 0) | o.special, &ids);
        for (int i = 0; i < n_ids; i++) {
            char number[16];
            write_stdout(number, (size_t)snprintf(number, sizeof number, "%s%d", i ? "," : "", o.ids ? o.ids[i] : ids[i]), 0);
        }
        write_stdout("\n", 1, 1);
        exit_done();
    }
    int chat_format = o.chat || (o.interactive && has_chat_template(o.model_dir));   /* -i: plain text, or V4's chat format */
    if (o.system && !chat_format)
        usage_error("--system is a system prompt of the chat format, and %s has no chat template: give --chat too", o.model_dir);
    char why[512];   /* the path: the GPU when usable (unless --cpu), said in one line when not */
    const Backend *run = !o.cpu && gpu_open(why, sizeof why) ? &gpu_backend : &cpu_backend;
    if (o.gpu && run != &gpu_backend) fatal("--gpu: %s", why);
    if ((o.gpu_mem || o.expert_profile || o.gpus || o.hosts > 1) && run != &gpu_backend)
        fatal("%s places the model on the GPU, and %s", o.gpu_mem ? "--gpu-mem" : o.gpus ? "--gpus" : o.hosts > 1 ? "--hosts" :
              "--expert-profile", o.cpu ? "--cpu runs on the CPU" : why);
    if (o.hosts > 1) {   /* this host's GPUs (--gpus, else all), joined with the other hosts' */
        gpu_hosts.count = o.hosts, gpu_hosts.index = o.host;
        if (!o.gpus) CU_CHECK(cu.cuDeviceGetCount(&o.gpus));
        o.gpus = o.gpus < GPUS_MAX ? o.gpus : GPUS_MAX;
    }
    if (o.gpus > 1 && !gpu_open_more(o.gpus, why, sizeof why)) fatal("--gpus %d: %s", o.gpus, why);
    if (o.hosts > 1) {
        nccl_open_hosts(o.nccl_id, command_hash(argc, argv, prompt), &o.seed);   /* host 0's seed: the same tokens */
        if (o.host) {   /* host 0 alone prints */
            int null = open("/dev/null", O_WRONLY);
            if (null < 0 || dup2(null, STDOUT_FILENO) < 0) fatal("cannot send host %d's output to /dev/null: %s", o.host, strerror(errno));
            close(null);
            quiet = 1;
        }
    }
    pool_start(o.threads ? o.threads : usable_cores());   /* the CPU path's threads; the GPU's load copies on them */
    double t0 = now_seconds();
    load_model(&model, o.model_dir);
    const Config *c = &model.config;
    load_tokenizer(&tokenizer, &add_bos, o.model_dir, c);
    if (o.ids) {
        check_ids(o.ids, o.n_ids, c->vocab_size);
        ids = o.ids;
        n_ids = o.n_ids;
    } else if (o.perplexity) {   /* the text alone: perplexity() puts a BOS before each window */
        char what[PATH_MAX + 32];
        snprintf(what, sizeof what, "the text in %s", strcmp(o.perplexity, "-") ? o.perplexity : "standard input");
        n_ids = text_ids(&tokenizer, NULL, 0, prompt, o.special, what, &ids);
        if (n_ids < 2 - add_bos) fatal("%s has %d token: the perplexity needs at least %d", what, n_ids, 2 - add_bos);
    } else if (!o.interactive)
        n_ids = prompt_ids_system(&tokenizer, add_bos, c->bos_id, o.system, prompt, (o.chat ? TEXT_CHAT : 0) | o.special, &ids);

    if (n_ids > o.max_ctx && !o.perplexity) fatal("the prompt has %d tokens, more than the context (--ctx %d)", n_ids, o.max_ctx);
    if (o.max_tokens > o.max_ctx) o.max_tokens = o.max_ctx;
    int all_logits = o.dump_logits || o.perplexity;   /* every row's logits are read on the host */
    FILE *dump = NULL;
    if (o.dump_logits) {   /* every file this run reads, by path */
        static const char *names[] = {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"};
        const char **read = xcalloc((size_t)model.n_files + 5, sizeof *read);
        int n_read = 0;
        for (int i = 0; i < model.n_files; i++) read[n_read++] = model.files[i].path;
        for (int i = 0; i < 4; i++) read[n_read++] = path_join(o.model_dir, names[i]);
        if (o.prompt_file && strcmp(o.prompt_file, "-")) read[n_read++] = o.prompt_file;
        check_dump_target(o.dump_logits, o.model_dir, read, n_read);
        for (int i = 0; i < 4; i++) free((char *)read[model.n_files + i]);
        free(read);
        dump = open_dump(o.dump_logits);
    }
    Sampler sampler = {.temperature = o.temperature, .top_p = o.top_p, .rng = o.seed ? o.seed : 0x9E3779B97F4A7C15ull,
                       .order = xcalloc((size_t)c->vocab_size, sizeof(int)), .probs = xcalloc((size_t)c->vocab_size, sizeof(float)),
                       .top_k = o.top_k, .min_p = o.min_p, .repeat_penalty = o.repeat_penalty,
                       .repeat_last_n = o.repeat_last_n, .recent = xcalloc((size_t)o.repeat_last_n + 1, sizeof(int))};
    char where[512];
    gpu_budget.device_cap = o.gpu_mem;
    gpu_budget.gpus = o.gpus;   /* 0: gpu_backend_load chooses */
    uint64_t *profile = o.expert_profile ? read_expert_profile(o.expert_profile, c->n_layers, c->n_experts) : NULL;
    gpu_budget.profile = profile;
    State *state = run->load(&model, o.max_tokens, o.max_ctx, all_logits, sampler.rng, where, sizeof where);
    Stats stats = {.load_s = now_seconds() - t0, .windows = -1};
    if (!o.cpu && run != &gpu_backend) say("running on the CPU: %s", why);   /* once the run is accepted */
    int big = model.weight_bytes >= 1e9;
    say("loaded %s (%d layers, %.2f %s of weights)%s in %.2f s", o.model_dir, c->n_layers,
        model.weight_bytes / (big ? 1e9 : 1e6), big ? "GB" : "MB", where, stats.load_s);
    if (!o.seed_given && !o.perplexity && o.temperature > 0)   /* greedy decoding draws nothing */
        say("seed %llu (--seed %llu repeats this run)", (unsigned long long)o.seed, (unsigned long long)o.seed);
    memcpy(stop_strings, o.stops, sizeof o.stops);
    n_stop_strings = o.n_stops;
    if (o.perplexity) perplexity(run, &model, state, ids, n_ids, add_bos ? c->bos_id : -1, &stats);
    else if (o.interactive)
        chat(run, &model, state, &tokenizer, &sampler, prompt, (chat_format ? TEXT_CHAT : 0) | o.special, o.system, add_bos,
             !o.no_shift, o.n_generate, dump, &stats);
    else generate(run, &model, state, &tokenizer, &sampler, ids, n_ids, o.n_generate, dump, &stats, NULL);
    stats.total_s = now_seconds() - started;
    print_stats(&stats, run->name);
    if (o.expert_profile) {   /* the earlier runs' counts and this one's */
        size_t n = (size_t)c->n_layers * c->n_experts;
        uint64_t *hits = xcalloc(n, sizeof *hits);
        gpu_expert_hits(hits, c->n_layers, c->n_experts);
        for (size_t i = 0; profile && i < n; i++) hits[i] += profile[i];
        write_expert_profile(o.expert_profile, c->n_layers, c->n_experts, hits);
        free(hits);
    }
    free(profile);
    if (stats.stop == STOP_INTERRUPT) exit(130);   /* atexit removes the temporary logits file */
    if (dump) finish_dump(dump, o.dump_logits);
    write_stdout(NULL, 0, 1);
    free(sampler.order);
    free(sampler.probs);
    free(sampler.recent);
    free(ids);
    free(file_prompt);
    run->unload(state);
    pool_stop();
    tokenizer_free(&tokenizer);
    free_model(&model);
    return 0;
}
#endif

/* ========================================================================= Unicode classes */
/* Generated by tools/gen_unicode.py from Unicode 16.0.0; do not edit.
   Entry = (first code point << 3) | UnicodeClass; the run lasts until the next entry. */
static const uint32_t unicode_class_runs[2324] = {
    0x0,0x4e,0x70,0x106,0x10c,0x125,0x12c,0x15d,0x164,0x183,0x1d4,0x1e5,
    0x1fc,0x209,0x2dc,0x2f5,0x2fc,0x305,0x309,0x3dc,0x3e5,0x3ec,0x3f5,0x3f8,
    0x42e,0x430,0x506,0x50c,0x515,0x53c,0x545,0x551,0x55c,0x565,0x568,0x575,
    0x593,0x5a5,0x5a9,0x5b4,0x5c5,0x5cb,0x5d1,0x5dc,0x5e3,0x5fc,0x601,0x6bd,
    0x6c1,0x7bd,0x7c1,0x1615,0x1631,0x1695,0x1701,0x172d,0x1761,0x176d,0x1771,0x177d,
    0x1802,0x1b81,0x1bad,0x1bb1,0x1bc0,0x1bd1,0x1bf4,0x1bf9,0x1c00,0x1c25,0x1c31,0x1c3c,
    0x1c41,0x1c58,0x1c61,0x1c68,0x1c71,0x1d10,0x1d19,0x1fb5,0x1fb9,0x2415,0x241a,0x2451,
    0x2980,0x2989,0x2ab8,0x2ac9,0x2ad4,0x2b01,0x2c4c,0x2c58,0x2c6d,0x2c80,0x2c8a,0x2df4,
    0x2dfa,0x2e04,0x2e0a,0x2e1c,0x2e22,0x2e34,0x2e3a,0x2e40,0x2e81,0x2f58,0x2f79,0x2f9c,
    0x2fa8,0x3035,0x304c,0x305d,0x3064,0x3075,0x3082,0x30dc,0x30e0,0x30ec,0x3101,0x325a,
    0x3303,0x3354,0x3371,0x3382,0x3389,0x36a4,0x36a9,0x36b2,0x36e8,0x36f5,0x36fa,0x3729,
    0x373a,0x374d,0x3752,0x3771,0x3783,0x37d1,0x37ed,0x37f9,0x3804,0x3870,0x3881,0x388a,
    0x3891,0x3982,0x3a58,0x3a69,0x3d32,0x3d89,0x3d90,0x3e03,0x3e51,0x3f5a,0x3fa1,0x3fb5,
    0x3fbc,0x3fd1,0x3fd8,0x3fea,0x3ff5,0x4001,0x40b2,0x40d1,0x40da,0x4121,0x412a,0x4141,
    0x414a,0x4170,0x4184,0x41f8,0x4201,0x42ca,0x42e0,0x42f4,0x42f8,0x4301,0x4358,0x4381,
    0x4445,0x4449,0x4478,0x44ba,0x4501,0x4652,0x4710,0x471a,0x4821,0x49d2,0x49e9,0x49f2,
    0x4a81,0x4a8a,0x4ac1,0x4b12,0x4b24,0x4b33,0x4b84,0x4b89,0x4c0a,0x4c20,0x4c29,0x4c68,
    0x4c79,0x4c88,0x4c99,0x4d48,0x4d51,0x4d88,0x4d91,0x4d98,0x4db1,0x4dd0,0x4de2,0x4de9,
    0x4df2,0x4e28,0x4e3a,0x4e48,0x4e5a,0x4e71,0x4e78,0x4eba,0x4ec0,0x4ee1,0x4ef0,0x4ef9,
    0x4f12,0x4f20,0x4f33,0x4f81,0x4f95,0x4fa3,0x4fd5,0x4fe1,0x4fec,0x4ff2,0x4ff8,0x500a,
    0x5020,0x5029,0x5058,0x5079,0x5088,0x5099,0x5148,0x5151,0x5188,0x5191,0x51a0,0x51a9,
    0x51b8,0x51c1,0x51d0,0x51e2,0x51e8,0x51f2,0x5218,0x523a,0x5248,0x525a,0x5270,0x528a,
    0x5290,0x52c9,0x52e8,0x52f1,0x52f8,0x5333,0x5382,0x5391,0x53aa,0x53b4,0x53b8,0x540a,
    0x5420,0x5429,0x5470,0x5479,0x5490,0x5499,0x5548,0x5551,0x5588,0x5591,0x55a0,0x55a9,
    0x55d0,0x55e2,0x55e9,0x55f2,0x5630,0x563a,0x5650,0x565a,0x5670,0x5681,0x5688,0x5701,
    0x5712,0x5720,0x5733,0x5784,0x578d,0x5790,0x57c9,0x57d2,0x5800,0x580a,0x5820,0x5829,
    0x5868,0x5879,0x5888,0x5899,0x5948,0x5951,0x5988,0x5991,0x59a0,0x59a9,0x59d0,0x59e2,
    0x59e9,0x59f2,0x5a28,0x5a3a,0x5a48,0x5a5a,0x5a70,0x5aaa,0x5ac0,0x5ae1,0x5af0,0x5af9,
    0x5b12,0x5b20,0x5b33,0x5b85,0x5b89,0x5b93,0x5bc0,0x5c12,0x5c19,0x5c20,0x5c29,0x5c58,
    0x5c71,0x5c88,0x5c91,0x5cb0,0x5cc9,0x5cd8,0x5ce1,0x5ce8,0x5cf1,0x5d00,0x5d19,0x5d28,
    0x5d41,0x5d58,0x5d71,0x5dd0,0x5df2,0x5e18,0x5e32,0x5e48,0x5e52,0x5e70,0x5e81,0x5e88,
    0x5eba,0x5ec0,0x5f33,0x5f9d,0x5fd8,0x6002,0x6029,0x6068,0x6071,0x6088,0x6091,0x6148,
    0x6151,0x61d0,0x61e2,0x61e9,0x61f2,0x6228,0x6232,0x6248,0x6252,0x6270,0x62aa,0x62b8,
    0x62c1,0x62d8,0x62e9,0x62f0,0x6301,0x6312,0x6320,0x6333,0x6380,0x63bc,0x63c3,0x63fd,
    0x6401,0x640a,0x6424,0x6429,0x6468,0x6471,0x6488,0x6491,0x6548,0x6551,0x65a0,0x65a9,
    0x65d0,0x65e2,0x65e9,0x65f2,0x6628,0x6632,0x6648,0x6652,0x6670,0x66aa,0x66b8,0x66e9,
    0x66f8,0x6701,0x6712,0x6720,0x6733,0x6780,0x6789,0x679a,0x67a0,0x6802,0x6821,0x6868,
    0x6871,0x6888,0x6891,0x69da,0x69e9,0x69f2,0x6a28,0x6a32,0x6a48,0x6a52,0x6a71,0x6a7d,
    0x6a80,0x6aa1,0x6aba,0x6ac3,0x6af9,0x6b12,0x6b20,0x6b33,0x6bcd,0x6bd1,0x6c00,0x6c0a,
    0x6c20,0x6c29,0x6cb8,0x6cd1,0x6d90,0x6d99,0x6de0,0x6de9,0x6df0,0x6e01,0x6e38,0x6e52,
    0x6e58,0x6e7a,0x6ea8,0x6eb2,0x6eb8,0x6ec2,0x6f00,0x6f33,0x6f80,0x6f92,0x6fa4,0x6fa8,
    0x7009,0x718a,0x7191,0x71a2,0x71d8,0x71fd,0x7201,0x723a,0x727c,0x7283,0x72d4,0x72e0,
    0x7409,0x7418,0x7421,0x7428,0x7431,0x7458,0x7461,0x7520,0x7529,0x7530,0x7539,0x758a,
    0x7591,0x75a2,0x75e9,0x75f0,0x7601,0x7628,0x7631,0x7638,0x7642,0x7678,0x7683,0x76d0,
    0x76e1,0x7700,0x7801,0x780d,0x7824,0x789d,0x78a4,0x78ad,0x78c2,0x78d5,0x7903,0x79a5,
    0x79aa,0x79b5,0x79ba,0x79c5,0x79ca,0x79d4,0x79f2,0x7a01,0x7a40,0x7a49,0x7b68,0x7b8a,
    0x7c2c,0x7c32,0x7c41,0x7c6a,0x7cc0,0x7cca,0x7de8,0x7df5,0x7e32,0x7e3d,0x7e68,0x7e75,
    0x7e84,0x7ead,0x7ecc,0x7ed8,0x8001,0x815a,0x81f9,0x8203,0x8254,0x8281,0x82b2,0x82d1,
    0x82f2,0x8309,0x8312,0x8329,0x833a,0x8371,0x838a,0x83a9,0x8412,0x8471,0x847a,0x8483,
    0x84d2,0x84f5,0x8501,0x8630,0x8639,0x8640,0x8669,0x8670,0x8681,0x87dc,0x87e1,0x9248,
    0x9251,0x9270,0x9281,0x92b8,0x92c1,0x92c8,0x92d1,0x92f0,0x9301,0x9448,0x9451,0x9470,
    0x9481,0x9588,0x9591,0x95b0,0x95c1,0x95f8,0x9601,0x9608,0x9611,0x9630,0x9641,0x96b8,
    0x96c1,0x9888,0x9891,0x98b0,0x98c1,0x9ad8,0x9aea,0x9b04,0x9b4b,0x9be8,0x9c01,0x9c85,
    0x9cd0,0x9d01,0x9fb0,0x9fc1,0x9ff0,0xa004,0xa009,0xb36d,0xb374,0xb379,0xb406,0xb409,
    0xb4dc,0xb4e8,0xb501,0xb75c,0xb773,0xb789,0xb7c8,0xb801,0xb892,0xb8b0,0xb8f9,0xb992,
    0xb9ac,0xb9b8,0xba01,0xba92,0xbaa0,0xbb01,0xbb68,0xbb71,0xbb88,0xbb92,0xbba0,0xbc01,
    0xbda2,0xbea4,0xbeb9,0xbec4,0xbedd,0xbee1,0xbeea,0xbef0,0xbf03,0xbf50,0xbf83,0xbfd0,
    0xc004,0xc05a,0xc070,0xc07a,0xc083,0xc0d0,0xc101,0xc3c8,0xc401,0xc42a,0xc439,0xc54a,
    0xc551,0xc558,0xc581,0xc7b0,0xc801,0xc8f8,0xc902,0xc960,0xc982,0xc9e0,0xca05,0xca08,
    0xca24,0xca33,0xca81,0xcb70,0xcb81,0xcba8,0xcc01,0xcd60,0xcd81,0xce50,0xce83,0xced8,
    0xcef5,0xd001,0xd0ba,0xd0e0,0xd0f4,0xd101,0xd2aa,0xd2f8,0xd302,0xd3e8,0xd3fa,0xd403,
    0xd450,0xd483,0xd4d0,0xd504,0xd539,0xd544,0xd570,0xd582,0xd678,0xd802,0xd829,0xd9a2,
    0xda29,0xda68,0xda74,0xda83,0xdad4,0xdb0d,0xdb5a,0xdba5,0xdbec,0xdc02,0xdc19,0xdd0a,
    0xdd71,0xdd83,0xddd1,0xdf32,0xdfa0,0xdfe4,0xe001,0xe122,0xe1c0,0xe1dc,0xe203,0xe250,
    0xe269,0xe283,0xe2d1,0xe3f4,0xe401,0xe458,0xe481,0xe5d8,0xe5e9,0xe604,0xe640,0xe682,
    0xe69c,0xe6a2,0xe749,0xe76a,0xe771,0xe7a2,0xe7a9,0xe7ba,0xe7d1,0xe7d8,0xe801,0xee02,
    0xf001,0xf8b0,0xf8c1,0xf8f0,0xf901,0xfa30,0xfa41,0xfa70,0xfa81,0xfac0,0xfac9,0xfad0,
    0xfad9,0xfae0,0xfae9,0xfaf0,0xfaf9,0xfbf0,0xfc01,0xfda8,0xfdb1,0xfded,0xfdf1,0xfdfd,
    0xfe11,0xfe28,0xfe31,0xfe6d,0xfe81,0xfea0,0xfeb1,0xfee0,0xfeed,0xff01,0xff6d,0xff80,
    0xff91,0xffa8,0xffb1,0xffed,0xfff8,0x10006,0x10058,0x10084,0x10146,0x10150,0x1017e,0x10184,
    0x10225,0x1022c,0x10295,0x1029c,0x102fe,0x10300,0x10383,0x10389,0x10390,0x103a3,0x103d5,0x103ec,
    0x103f9,0x10403,0x10455,0x1046c,0x10478,0x10481,0x104e8,0x10505,0x10608,0x10682,0x10788,0x10805,
    0x10811,0x1081d,0x10839,0x10845,0x10851,0x108a5,0x108a9,0x108b5,0x108c9,0x108f5,0x10921,0x1092d,
    0x10931,0x1093d,0x10941,0x1094d,0x10951,0x10975,0x10979,0x109d5,0x109e1,0x10a05,0x10a29,0x10a55,
    0x10a71,0x10a7d,0x10a83,0x10c19,0x10c2b,0x10c55,0x10c60,0x10c85,0x11844,0x11865,0x1194c,0x1195d,
    0x12150,0x12205,0x12258,0x12303,0x124e5,0x12753,0x12805,0x13b44,0x13bb3,0x13ca5,0x13e2c,0x13e3d,
    0x13f34,0x13f85,0x14c1c,0x14ccd,0x14ec4,0x14ee5,0x14fe4,0x14ff5,0x15ba0,0x15bb5,0x15cb0,0x15cbd,
    0x16001,0x1672d,0x16759,0x1677a,0x16791,0x167a0,0x167cc,0x167eb,0x167f4,0x16801,0x16930,0x16939,
    0x16940,0x16969,0x16970,0x16981,0x16b40,0x16b79,0x16b84,0x16b88,0x16bfa,0x16c01,0x16cb8,0x16d01,
    0x16d38,0x16d41,0x16d78,0x16d81,0x16db8,0x16dc1,0x16df8,0x16e01,0x16e38,0x16e41,0x16e78,0x16e81,
    0x16eb8,0x16ec1,0x16ef8,0x16f02,0x17004,0x17179,0x17184,0x17285,0x17294,0x172f0,0x17405,0x174d0,
    0x174dd,0x177a0,0x17805,0x17eb0,0x17f85,0x18006,0x1800c,0x18025,0x18029,0x1803b,0x18044,0x18095,
    0x180a4,0x18105,0x1810b,0x18152,0x18184,0x18189,0x181b5,0x181c3,0x181d9,0x181ec,0x181f5,0x18200,
    0x18209,0x184b8,0x184ca,0x184dd,0x184e9,0x18504,0x18509,0x187dc,0x187e1,0x18800,0x18829,0x18980,
    0x18989,0x18c78,0x18c85,0x18c93,0x18cb5,0x18d01,0x18e05,0x18f30,0x18f7d,0x18f81,0x19005,0x190f8,
    0x19103,0x19155,0x19243,0x19285,0x1928b,0x19305,0x19403,0x19455,0x1958b,0x19605,0x1a001,0x26e05,
    0x27001,0x52468,0x52485,0x52638,0x52681,0x527f4,0x52801,0x5306c,0x53081,0x53103,0x53151,0x53160,
    0x53201,0x5337a,0x5339c,0x533a2,0x533f4,0x533f9,0x534f2,0x53501,0x53733,0x53782,0x53794,0x537c0,
    0x53805,0x538b9,0x53905,0x53911,0x53c4d,0x53c59,0x53e70,0x53e81,0x53e90,0x53e99,0x53ea0,0x53ea9,
    0x53ee8,0x53f91,0x54012,0x54019,0x54032,0x54039,0x5405a,0x54061,0x5411a,0x54145,0x54162,0x54168,
    0x54183,0x541b5,0x541d0,0x54201,0x543a4,0x543c0,0x54402,0x54411,0x545a2,0x54630,0x54674,0x54683,
    0x546d0,0x54702,0x54791,0x547c4,0x547d9,0x547e4,0x547e9,0x547fa,0x54803,0x54851,0x54932,0x54974,
    0x54981,0x54a3a,0x54aa0,0x54afc,0x54b01,0x54be8,0x54c02,0x54c21,0x54d9a,0x54e0c,0x54e70,0x54e79,
    0x54e83,0x54ed0,0x54ef4,0x54f01,0x54f2a,0x54f31,0x54f83,0x54fd1,0x54ff8,0x55001,0x5514a,0x551b8,
    0x55201,0x5521a,0x55221,0x55262,0x55270,0x55283,0x552d0,0x552e4,0x55301,0x553bd,0x553d1,0x553da,
    0x553f1,0x55582,0x55589,0x55592,0x555a9,0x555ba,0x555c9,0x555f2,0x55601,0x5560a,0x55611,0x55618,
    0x556d9,0x556f4,0x55701,0x5575a,0x55784,0x55791,0x557aa,0x557b8,0x55809,0x55838,0x55849,0x55878,
    0x55889,0x558b8,0x55901,0x55938,0x55941,0x55978,0x55981,0x55add,0x55ae1,0x55b55,0x55b60,0x55b81,
    0x55f1a,0x55f5c,0x55f62,0x55f70,0x55f83,0x55fd0,0x56001,0x6bd20,0x6bd81,0x6be38,0x6be59,0x6bfe0,
    0x7c801,0x7d370,0x7d381,0x7d6d0,0x7d801,0x7d838,0x7d899,0x7d8c0,0x7d8e9,0x7d8f2,0x7d8f9,0x7d94d,
    0x7d951,0x7d9b8,0x7d9c1,0x7d9e8,0x7d9f1,0x7d9f8,0x7da01,0x7da10,0x7da19,0x7da28,0x7da31,0x7dd95,
    0x7de18,0x7de99,0x7e9f4,0x7ea05,0x7ea81,0x7ec80,0x7ec91,0x7ee40,0x7ee7d,0x7ee80,0x7ef81,0x7efe5,
    0x7f002,0x7f084,0x7f0d0,0x7f102,0x7f184,0x7f298,0x7f2a4,0x7f315,0x7f31c,0x7f325,0x7f338,0x7f344,
    0x7f34d,0x7f354,0x7f360,0x7f381,0x7f3a8,0x7f3b1,0x7f7e8,0x7f80c,0x7f825,0x7f82c,0x7f85d,0x7f864,
    0x7f883,0x7f8d4,0x7f8e5,0x7f8fc,0x7f909,0x7f9dc,0x7f9f5,0x7f9fc,0x7fa05,0x7fa09,0x7fadc,0x7fae5,
    0x7faec,0x7faf5,0x7fafc,0x7fb31,0x7fdf8,0x7fe11,0x7fe40,0x7fe51,0x7fe80,0x7fe91,0x7fec0,0x7fed1,
    0x7fee8,0x7ff05,0x7ff38,0x7ff45,0x7ff78,0x7ffe5,0x7fff0,0x80001,0x80060,0x80069,0x80138,0x80141,
    0x801d8,0x801e1,0x801f0,0x801f9,0x80270,0x80281,0x802f0,0x80401,0x807d8,0x80804,0x80818,0x8083b,
    0x809a0,0x809bd,0x80a03,0x80bcd,0x80c53,0x80c65,0x80c78,0x80c85,0x80ce8,0x80d05,0x80d08,0x80e85,
    0x80fea,0x80ff0,0x81401,0x814e8,0x81501,0x81688,0x81702,0x8170b,0x817e0,0x81801,0x81903,0x81920,
    0x81969,0x81a0b,0x81a11,0x81a53,0x81a58,0x81a81,0x81bb2,0x81bd8,0x81c01,0x81cf0,0x81cfc,0x81d01,
    0x81e20,0x81e41,0x81e84,0x81e8b,0x81eb0,0x82001,0x824f0,0x82503,0x82550,0x82581,0x826a0,0x826c1,
    0x827e0,0x82801,0x82940,0x82981,0x82b20,0x82b7c,0x82b81,0x82bd8,0x82be1,0x82c58,0x82c61,0x82c98,
    0x82ca1,0x82cb0,0x82cb9,0x82d10,0x82d19,0x82d90,0x82d99,0x82dd0,0x82dd9,0x82de8,0x82e01,0x82fa0,
    0x83001,0x839b8,0x83a01,0x83ab0,0x83b01,0x83b40,0x83c01,0x83c30,0x83c39,0x83d88,0x83d91,0x83dd8,
    0x84001,0x84030,0x84041,0x84048,0x84051,0x841b0,0x841b9,0x841c8,0x841e1,0x841e8,0x841f9,0x842b0,
    0x842bc,0x842c3,0x84301,0x843bd,0x843cb,0x84401,0x844f8,0x8453b,0x84580,0x84701,0x84798,0x847a1,
    0x847b0,0x847db,0x84801,0x848b3,0x848e0,0x848fc,0x84901,0x849d0,0x849fc,0x84a00,0x84c01,0x84dc0,
    0x84de3,0x84df1,0x84e03,0x84e80,0x84e93,0x85001,0x8500a,0x85020,0x8502a,0x85038,0x85062,0x85081,
    0x850a0,0x850a9,0x850c0,0x850c9,0x851b0,0x851c2,0x851d8,0x851fa,0x85203,0x85248,0x85284,0x852c8,
    0x85301,0x853eb,0x853fc,0x85401,0x854eb,0x85500,0x85601,0x85645,0x85649,0x8572a,0x85738,0x8575b,
    0x85784,0x857b8,0x85801,0x859b0,0x859cc,0x85a01,0x85ab0,0x85ac3,0x85b01,0x85b98,0x85bc3,0x85c01,
    0x85c90,0x85ccc,0x85ce8,0x85d4b,0x85d80,0x86001,0x86248,0x86401,0x86598,0x86601,0x86798,0x867d3,
    0x86801,0x86922,0x86940,0x86983,0x869d0,0x86a03,0x86a51,0x86b30,0x86b4a,0x86b74,0x86b79,0x86c30,
    0x86c75,0x86c80,0x87303,0x873f8,0x87401,0x87550,0x8755a,0x8756c,0x87570,0x87581,0x87590,0x87611,
    0x87628,0x877e2,0x87801,0x878eb,0x87939,0x87940,0x87981,0x87a32,0x87a8b,0x87aac,0x87ad0,0x87b81,
    0x87c12,0x87c34,0x87c50,0x87d81,0x87e2b,0x87e60,0x87f01,0x87fb8,0x88002,0x88019,0x881c2,0x8823c,
    0x88270,0x88293,0x88382,0x88389,0x8839a,0x883a9,0x883b0,0x883fa,0x88419,0x88582,0x885dc,0x885e8,
    0x885f4,0x88612,0x88618,0x88681,0x88748,0x88783,0x887d0,0x88802,0x88819,0x8893a,0x889a8,0x889b3,
    0x88a04,0x88a21,0x88a2a,0x88a39,0x88a40,0x88a81,0x88b9a,0x88ba4,0x88bb1,0x88bb8,0x88c02,0x88c19,
    0x88d9a,0x88e09,0x88e2c,0x88e4a,0x88e6c,0x88e72,0x88e83,0x88ed1,0x88edc,0x88ee1,0x88eec,0x88f00,
    0x88f0b,0x88fa8,0x89001,0x89090,0x89099,0x89162,0x891c4,0x891f2,0x891f9,0x8920a,0x89210,0x89401,
    0x89438,0x89441,0x89448,0x89451,0x89470,0x89479,0x894f0,0x894f9,0x8954c,0x89550,0x89581,0x896fa,
    0x89758,0x89783,0x897d0,0x89802,0x89820,0x89829,0x89868,0x89879,0x89888,0x89899,0x89948,0x89951,
    0x89988,0x89991,0x899a0,0x899a9,0x899d0,0x899da,0x899e9,0x899f2,0x89a28,0x89a3a,0x89a48,0x89a5a,
    0x89a70,0x89a81,0x89a88,0x89aba,0x89ac0,0x89ae9,0x89b12,0x89b20,0x89b32,0x89b68,0x89b82,0x89ba8,
    0x89c01,0x89c50,0x89c59,0x89c60,0x89c71,0x89c78,0x89c81,0x89db0,0x89db9,0x89dc2,0x89e08,0x89e12,
    0x89e18,0x89e2a,0x89e30,0x89e3a,0x89e58,0x89e62,0x89e89,0x89e92,0x89e99,0x89ea4,0x89eb0,0x89ebc,
    0x89ec8,0x89f0a,0x89f18,0x8a001,0x8a1aa,0x8a239,0x8a25c,0x8a283,0x8a2d4,0x8a2e0,0x8a2ec,0x8a2f2,
    0x8a2f9,0x8a310,0x8a401,0x8a582,0x8a621,0x8a634,0x8a639,0x8a640,0x8a683,0x8a6d0,0x8ac01,0x8ad7a,
    0x8adb0,0x8adc2,0x8ae0c,0x8aec1,0x8aee2,0x8aef0,0x8b001,0x8b182,0x8b20c,0x8b221,0x8b228,0x8b283,
    0x8b2d0,0x8b304,0x8b368,0x8b401,0x8b55a,0x8b5c1,0x8b5cc,0x8b5d0,0x8b603,0x8b650,0x8b683,0x8b720,
    0x8b801,0x8b8d8,0x8b8ea,0x8b960,0x8b983,0x8b9e4,0x8b9fd,0x8ba01,0x8ba38,0x8c001,0x8c162,0x8c1dc,
    0x8c1e0,0x8c501,0x8c703,0x8c798,0x8c7f9,0x8c838,0x8c849,0x8c850,0x8c861,0x8c8a0,0x8c8a9,0x8c8b8,
    0x8c8c1,0x8c982,0x8c9b0,0x8c9ba,0x8c9c8,0x8c9da,0x8c9f9,0x8ca02,0x8ca09,0x8ca12,0x8ca24,0x8ca38,
    0x8ca83,0x8cad0,0x8cd01,0x8cd40,0x8cd51,0x8ce8a,0x8cec0,0x8ced2,0x8cf09,0x8cf14,0x8cf19,0x8cf22,
    0x8cf28,0x8d001,0x8d00a,0x8d059,0x8d19a,0x8d1d1,0x8d1da,0x8d1fc,0x8d23a,0x8d240,0x8d281,0x8d28a,
    0x8d2e1,0x8d452,0x8d4d4,0x8d4e9,0x8d4f4,0x8d518,0x8d581,0x8d7c8,0x8d804,0x8d850,0x8de01,0x8df0c,
    0x8df10,0x8df83,0x8dfd0,0x8e001,0x8e048,0x8e051,0x8e17a,0x8e1b8,0x8e1c2,0x8e201,0x8e20c,0x8e230,
    0x8e283,0x8e368,0x8e384,0x8e391,0x8e480,0x8e492,0x8e540,0x8e54a,0x8e5b8,0x8e801,0x8e838,0x8e841,
    0x8e850,0x8e859,0x8e98a,0x8e9b8,0x8e9d2,0x8e9d8,0x8e9e2,0x8e9f0,0x8e9fa,0x8ea31,0x8ea3a,0x8ea40,
    0x8ea83,0x8ead0,0x8eb01,0x8eb30,0x8eb39,0x8eb48,0x8eb51,0x8ec52,0x8ec78,0x8ec82,0x8ec90,0x8ec9a,
    0x8ecc1,0x8ecc8,0x8ed03,0x8ed50,0x8f701,0x8f79a,0x8f7bc,0x8f7c8,0x8f802,0x8f811,0x8f81a,0x8f821,
    0x8f888,0x8f891,0x8f9a2,0x8f9d8,0x8f9f2,0x8fa1c,0x8fa83,0x8fad2,0x8fad8,0x8fd81,0x8fd88,0x8fe03,
    0x8fead,0x8ff90,0x8fffc,0x90001,0x91cd0,0x92003,0x92378,0x92384,0x923a8,0x92401,0x92a20,0x97c81,
    0x97f8c,0x97f98,0x98001,0x9a180,0x9a202,0x9a209,0x9a23a,0x9a2b0,0x9a301,0xa1fd8,0xa2001,0xa3238,
    0xb0801,0xb08f2,0xb0983,0xb09d0,0xb4001,0xb51c8,0xb5201,0xb52f8,0xb5303,0xb5350,0xb5374,0xb5381,
    0xb55f8,0xb5603,0xb5650,0xb5681,0xb5770,0xb5782,0xb57ac,0xb57b0,0xb5801,0xb5982,0xb59bc,0xb59e5,
    0xb5a01,0xb5a24,0xb5a2d,0xb5a30,0xb5a83,0xb5ad0,0xb5adb,0xb5b10,0xb5b19,0xb5bc0,0xb5be9,0xb5c80,
    0xb6a01,0xb6b6c,0xb6b83,0xb6bd0,0xb7201,0xb7403,0xb74bc,0xb74d8,0xb7801,0xb7a58,0xb7a7a,0xb7a81,
    0xb7a8a,0xb7c40,0xb7c7a,0xb7c99,0xb7d00,0xb7f01,0xb7f14,0xb7f19,0xb7f22,0xb7f28,0xb7f82,0xb7f90,
    0xb8001,0xc3fc0,0xc4001,0xc66b0,0xc67f9,0xc6848,0xd7f81,0xd7fa0,0xd7fa9,0xd7fe0,0xd7fe9,0xd7ff8,
    0xd8001,0xd8918,0xd8991,0xd8998,0xd8a81,0xd8a98,0xd8aa9,0xd8ab0,0xd8b21,0xd8b40,0xd8b81,0xd97e0,
    0xde001,0xde358,0xde381,0xde3e8,0xde401,0xde448,0xde481,0xde4d0,0xde4e5,0xde4ea,0xde4fc,0xde500,
    0xe6005,0xe6783,0xe67d0,0xe6805,0xe75a0,0xe7802,0xe7970,0xe7982,0xe7a38,0xe7a85,0xe7e20,0xe8005,
    0xe87b0,0xe8805,0xe8938,0xe894d,0xe8b2a,0xe8b55,0xe8b6a,0xe8b98,0xe8bda,0xe8c1d,0xe8c2a,0xe8c65,
    0xe8d52,0xe8d75,0xe8f58,0xe9005,0xe9212,0xe922d,0xe9230,0xe9603,0xe96a0,0xe9703,0xe97a0,0xe9805,
    0xe9ab8,0xe9b03,0xe9bc8,0xea001,0xea2a8,0xea2b1,0xea4e8,0xea4f1,0xea500,0xea511,0xea518,0xea529,
    0xea538,0xea549,0xea568,0xea571,0xea5d0,0xea5d9,0xea5e0,0xea5e9,0xea620,0xea629,0xea830,0xea839,
    0xea858,0xea869,0xea8a8,0xea8b1,0xea8e8,0xea8f1,0xea9d0,0xea9d9,0xea9f8,0xeaa01,0xeaa28,0xeaa31,
    0xeaa38,0xeaa51,0xeaa88,0xeaa91,0xeb530,0xeb541,0xeb60d,0xeb611,0xeb6dd,0xeb6e1,0xeb7dd,0xeb7e1,
    0xeb8ad,0xeb8b1,0xeb9ad,0xeb9b1,0xeba7d,0xeba81,0xebb7d,0xebb81,0xebc4d,0xebc51,0xebd4d,0xebd51,
    0xebe1d,0xebe21,0xebe60,0xebe73,0xec005,0xed002,0xed1bd,0xed1da,0xed36d,0xed3aa,0xed3b5,0xed422,
    0xed42d,0xed43c,0xed460,0xed4da,0xed500,0xed50a,0xed580,0xef801,0xef8f8,0xef929,0xef958,0xf0002,
    0xf0038,0xf0042,0xf00c8,0xf00da,0xf0110,0xf011a,0xf0128,0xf0132,0xf0158,0xf0181,0xf0370,0xf047a,
    0xf0480,0xf0801,0xf0968,0xf0982,0xf09b9,0xf09f0,0xf0a03,0xf0a50,0xf0a71,0xf0a7d,0xf0a80,0xf1481,
    0xf1572,0xf1578,0xf1601,0xf1762,0xf1783,0xf17d0,0xf17fd,0xf1800,0xf2681,0xf2762,0xf2783,0xf27d0,
    0xf2e81,0xf2f72,0xf2f81,0xf2f8b,0xf2fd8,0xf2ffc,0xf3000,0xf3f01,0xf3f38,0xf3f41,0xf3f60,0xf3f69,
    0xf3f78,0xf3f81,0xf3ff8,0xf4001,0xf4628,0xf463b,0xf4682,0xf46b8,0xf4801,0xf4a22,0xf4a59,0xf4a60,
    0xf4a83,0xf4ad0,0xf4af4,0xf4b00,0xf638b,0xf6565,0xf656b,0xf6585,0xf658b,0xf65a8,0xf680b,0xf6975,
    0xf697b,0xf69f0,0xf7001,0xf7020,0xf7029,0xf7100,0xf7109,0xf7118,0xf7121,0xf7128,0xf7139,0xf7140,
    0xf7149,0xf7198,0xf71a1,0xf71c0,0xf71c9,0xf71d0,0xf71d9,0xf71e0,0xf7211,0xf7218,0xf7239,0xf7240,
    0xf7249,0xf7250,0xf7259,0xf7260,0xf7269,0xf7280,0xf7289,0xf7298,0xf72a1,0xf72a8,0xf72b9,0xf72c0,
    0xf72c9,0xf72d0,0xf72d9,0xf72e0,0xf72e9,0xf72f0,0xf72f9,0xf7300,0xf7309,0xf7318,0xf7321,0xf7328,
    0xf7339,0xf7358,0xf7361,0xf7398,0xf73a1,0xf73c0,0xf73c9,0xf73e8,0xf73f1,0xf73f8,0xf7401,0xf7450,
    0xf7459,0xf74e0,0xf7509,0xf7520,0xf7529,0xf7550,0xf7559,0xf75e0,0xf7785,0xf7790,0xf8005,0xf8160,
    0xf8185,0xf84a0,0xf8505,0xf8578,0xf858d,0xf8600,0xf860d,0xf8680,0xf868d,0xf87b0,0xf8803,0xf886d,
    0xf8d70,0xf8f35,0xf9018,0xf9085,0xf91e0,0xf9205,0xf9248,0xf9285,0xf9290,0xf9305,0xf9330,0xf9805,
    0xfb6c0,0xfb6e5,0xfb768,0xfb785,0xfb7e8,0xfb805,0xfbbb8,0xfbbdd,0xfbed0,0xfbf05,0xfbf60,0xfbf85,
    0xfbf88,0xfc005,0xfc060,0xfc085,0xfc240,0xfc285,0xfc2d0,0xfc305,0xfc440,0xfc485,0xfc570,0xfc585,
    0xfc5e0,0xfc605,0xfc610,0xfc805,0xfd2a0,0xfd305,0xfd370,0xfd385,0xfd3e8,0xfd405,0xfd450,0xfd47d,
    0xfd638,0xfd675,0xfd6e8,0xfd6fd,0xfd750,0xfd785,0xfd7c8,0xfd805,0xfdc98,0xfdca5,0xfdf83,0xfdfd0,
    0x100001,0x153700,0x153801,0x15b9d0,0x15ba01,0x15c0f0,0x15c101,0x167510,0x167581,0x175f08,0x175f81,0x1772f0,
    0x17c001,0x17d0f0,0x180001,0x189a58,0x189a81,0x191d80,0x700802,0x700f80,
};
