/* nvfp4.c: a minimal DeepSeek V4 inference engine in one C file.
 *
 *   ./nvfp4 MODEL_DIR "prompt" [options]        (./nvfp4 -h lists the options)
 *
 * Reading order: errors and small helpers; JSON; number formats; safetensors; config.json;
 * weights; the CPU forward pass (the reference every GPU kernel is checked against); decoding
 * state; tokenizer; sampler; generation; command line. test.c includes this file with TESTING
 * defined to reach every static function.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nvfp4.h"

/* =========================================================================== errors, helpers */

/* Print "nvfp4: error: ..." and exit with status 1. Every bad input ends here, with a message
   that names what is wrong and where. */
static void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fatal(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fputs("nvfp4: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
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

/* Read a whole file into a NUL-terminated buffer; *size gets its length. Returns NULL (errno
   set) when the file cannot be opened or read. */
static char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 65536 + 1 > cap) {
            cap = (len + 65536 + 1) * 2;
            char *grown = realloc(buf, cap);
            if (!grown) fatal("out of memory reading %s", path);
            buf = grown;
        }
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0) break;
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) { free(buf); errno = EIO; return NULL; }
    buf[len] = 0;
    *size = len;
    return buf;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ==================================================================================== JSON */
/* A small DOM parser for RFC 8259 JSON, used for config.json, tokenizer.json and safetensors
   headers.  The whole document becomes a tree of Json nodes; arrays and objects hold their
   children in one contiguous `items` array (objects also hold a parallel `keys` array), so a
   128k-member object costs one allocation for the values and one per key string.

   Input is `n` bytes that need not be NUL-terminated.  Any malformed input yields NULL and a
   message "line L, column C: what" -- never a crash, never a read past `n`.  Nesting deeper than
   JSON_MAX_DEPTH is refused so hostile input cannot exhaust the stack.  Strings decode \uXXXX
   escapes (surrogate pairs included, lone surrogates refused) to UTF-8; raw bytes >= 0x80 are
   copied as they are, without UTF-8 validation. */

#define JSON_MAX_DEPTH 64

typedef struct {
    const char *text;     /* the whole document */
    size_t n;             /* its length in bytes */
    size_t pos;           /* next unread byte */
    int depth;            /* arrays/objects currently open */
    char *err;            /* message buffer supplied by the caller */
    size_t errlen;
    int failed;           /* set once the first error has been recorded */
} JsonParser;

/* Records the first error as "line L, column C: message" for the current position (columns
   count bytes, starting at 1).  Later errors are ignored so the root cause is reported.
   Always returns 0 so callers can write `return json_fail(...)`. */
static int json_fail(JsonParser *p, const char *fmt, ...) {
    if (p->failed) return 0;
    p->failed = 1;
    if (!p->err || p->errlen == 0) return 0;
    size_t line = 1, column = 1;
    for (size_t i = 0; i < p->pos && i < p->n; i++) {
        if (p->text[i] == '\n') { line++; column = 1; } else column++;
    }
    int used = snprintf(p->err, p->errlen, "line %zu, column %zu: ", line, column);
    if (used >= 0 && (size_t)used < p->errlen) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(p->err + used, p->errlen - (size_t)used, fmt, args);
        va_end(args);
    }
    return 0;
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

/* Writes code point `cp` (at most 0x10FFFF) as UTF-8 to `out`; returns the byte count (1-4). */
static size_t json_put_utf8(char *out, unsigned cp) {
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

/* Parses a string whose opening quote is at the current position.  On success stores a fresh
   NUL-terminated buffer in *out and its byte length in *out_length and returns 1; on error
   returns 0 with nothing allocated.  Decoding never grows the text (an escape of k bytes
   yields at most k bytes), so one buffer of the raw span's size suffices. */
static int json_parse_string(JsonParser *p, char **out, size_t *out_length) {
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
        p->pos++;
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
            length += json_put_utf8(buffer + length, cp);
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

/* Parses an array or object whose opening bracket is at the current position into *out.
   On error everything parsed so far is freed and 0 is returned. */
static int json_parse_container(JsonParser *p, Json *out) {
    int is_object = p->text[p->pos] == '{';
    char closer = is_object ? '}' : ']';
    if (++p->depth > JSON_MAX_DEPTH) return json_fail(p, "nesting deeper than %d", JSON_MAX_DEPTH);
    p->pos++;
    /* Build inside *out as we go so that one json_free_children cleans up any failure. */
    out->type = is_object ? JSON_OBJECT : JSON_ARRAY;
    size_t capacity = 0;
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
            size_t key_length;
            if (!json_parse_string(p, &key, &key_length)) goto fail;
            json_skip_space(p);
            if (p->pos >= p->n || p->text[p->pos] != ':') { free(key); json_fail(p, "expected ':'"); goto fail; }
            p->pos++;
        }
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
    p->depth--;
    return 1;
fail:
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
        return json_parse_string(p, &out->string, &out->length);
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
   caller (free with json_free), or NULL with "line L, column C: what" in err[errlen] (err may
   be NULL).  Anything but whitespace after the value is an error. */
static Json *json_parse(const char *text, size_t n, char *err, size_t errlen) {
    JsonParser parser = { text, n, 0, 0, err, errlen, 0 };
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

/* Returns member `key` of object `obj`, or NULL if absent or `obj` is NULL or not an object.
   With duplicate keys the first one wins.  Linear search: meant for small config objects.
   Keys are compared as C strings, so a key containing \u0000 only matches up to that byte. */
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
    if (!text) fatal("cannot read %s: %s", path, strerror(errno));
    char err[256];
    Json *root = json_parse(text, size, err, sizeof err);
    free(text);
    if (!root) fatal("%s is not valid JSON: %s", path, err);
    return root;
}


/* =========================================================================== number formats */
/* Every quantized weight is decoded to float here. The formats:
     BF16      the top 16 bits of an IEEE float32
     F8 E4M3   sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff = NaN
     F8 E8M0   a power of two: 2^(byte - 127)             (block scale of FP8 and MXFP4)
     E2M1      4 bits: sign (bit 3) and one of 0, .5, 1, 1.5, 2, 3, 4, 6 (two per byte, low
               nibble = even column)                         (MXFP4 and NVFP4 weights)     */
static const float e2m1_values[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};

static float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float e4m3_to_float(uint8_t byte) {
    int sign = byte >> 7, exponent = (byte >> 3) & 15, mantissa = byte & 7;
    float magnitude;
    if (exponent == 15 && mantissa == 7) magnitude = NAN;
    else if (exponent == 0) magnitude = ldexpf((float)mantissa, -9);   /* subnormal: m/8 * 2^-6 */
    else magnitude = ldexpf(1.0f + mantissa / 8.0f, exponent - 7);
    return sign ? -magnitude : magnitude;
}

static float e8m0_to_float(uint8_t byte) {
    return byte == 255 ? NAN : ldexpf(1.0f, (int)byte - 127);
}

/* Element i of a small BF16 or F32 tensor (norm weights, biases, hc parameters) as float. */
static float tensor_float(const Tensor *t, size_t i) {
    if (t->dtype == DT_F32) return ((const float *)t->data)[i];
    return bf16_to_float(((const uint16_t *)t->data)[i]);
}

/* Decode row r of W into out[cols] (float32, exact: every format's values are exact in it). */
static void linear_row(const Linear *w, int r, float *out) {
    size_t cols = (size_t)w->cols, base = (size_t)r * cols;
    switch (w->format) {
    case FMT_F32:
        memcpy(out, (const float *)w->weight + base, cols * sizeof(float));
        break;
    case FMT_BF16:
        for (size_t c = 0; c < cols; c++) out[c] = bf16_to_float(((const uint16_t *)w->weight)[base + c]);
        break;
    case FMT_FP8: {
        const uint8_t *q = (const uint8_t *)w->weight + base;
        size_t scale_cols = (cols + 127) / 128, srow = (size_t)(r / 128) * scale_cols;
        for (size_t c = 0; c < cols; c++) {
            float s = w->scale_is_f32 ? ((const float *)w->scale)[srow + c / 128]
                                      : e8m0_to_float(((const uint8_t *)w->scale)[srow + c / 128]);
            out[c] = e4m3_to_float(q[c]) * s;
        }
        break;
    }
    case FMT_MXFP4:
    case FMT_NVFP4: {
        const uint8_t *q = (const uint8_t *)w->weight + base / 2;
        int group = w->format == FMT_MXFP4 ? 32 : 16;
        const uint8_t *scales = (const uint8_t *)w->scale + (size_t)r * (cols / group);
        for (size_t c = 0; c < cols; c++) {
            float s = w->format == FMT_MXFP4 ? e8m0_to_float(scales[c / group])
                                             : e4m3_to_float(scales[c / group]) * w->global_scale;
            out[c] = e2m1_values[(q[c / 2] >> (4 * (c & 1))) & 15] * s;
        }
        break;
    }
    }
}

/* ============================================================================== safetensors */
/* A safetensors file: u64 little-endian header length N, N bytes of JSON
   {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
   then the data; offsets are relative to the end of the header. Every file is mapped read-only
   and every tensor checked against it before anything reads it. */
static const char *dtype_names[DT_COUNT] = {"BF16", "F32", "F8_E4M3", "F8_E8M0", "U8", "I8", "I64", "F16"};
static const size_t dtype_sizes[DT_COUNT] = {2, 4, 1, 1, 1, 1, 8, 2};

#define MAX_HEADER_BYTES ((uint64_t)1 << 30)

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
    char jerr[200];
    Json *root = json_parse((const char *)map + 8, header_len, jerr, sizeof jerr);
    if (!root) { snprintf(err, errlen, "header is not valid JSON: %s", jerr); return err; }
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

static uint64_t hash_name(const char *s) {
    uint64_t h = 1469598103934665603ull;   /* FNV-1a */
    while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull;
    return h;
}

/* Build the name -> tensor hash table; fatal on a name that appears twice (in any files). */
static void index_tensors(Model *m) {
    m->index_size = 16;
    while (m->index_size < m->n_tensors * 2) m->index_size *= 2;
    m->index = xcalloc(m->index_size, sizeof(size_t));
    for (size_t i = 0; i < m->n_tensors; i++) {
        size_t slot = hash_name(m->tensors[i].name) & (m->index_size - 1);
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
static const Tensor *find_tensor(const Model *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const Tensor *find_tensor(const Model *m, const char *fmt, ...) {
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    for (size_t slot = hash_name(name) & (m->index_size - 1); m->index[slot]; slot = (slot + 1) & (m->index_size - 1))
        if (!strcmp(m->tensors[m->index[slot] - 1].name, name)) return &m->tensors[m->index[slot] - 1];
    return NULL;
}

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

static void expect_dtype(const Model *m, const Tensor *t, int n_allowed, const DType *allowed) {
    for (int i = 0; i < n_allowed; i++)
        if (t->dtype == allowed[i]) return;
    fatal("%s: tensor %s has dtype %s, which is not supported there", m->files[t->file].path, t->name,
          dtype_names[t->dtype]);
}

/* A BF16 or F32 tensor of the given shape (n = ndim, then the sizes), or fatal. */
static Tensor float_tensor(const Model *m, const char *name, int ndim, ...) {
    const Tensor *t = find_tensor(m, "%s", name);
    if (!t) fatal("tensor %s is missing from the checkpoint", name);
    int64_t shape[4];
    va_list ap;
    va_start(ap, ndim);
    for (int d = 0; d < ndim; d++) shape[d] = va_arg(ap, int64_t);
    va_end(ap);
    static const DType floats[] = {DT_BF16, DT_F32};
    expect_dtype(m, t, 2, floats);
    expect_shape(m, t, ndim, shape);
    return *t;
}

/* The linear layer `base` ("layers.3.attn.wq_a") of shape [rows, cols]. Its format follows from
   the dtype of base.weight and its companions:
     BF16 / F32 weight                                  plain
     F8_E4M3 weight + scale (E8M0 or F32) or weight_scale_inv (F32), per 128x128 block   FP8
     U8 / I8 weight [rows, cols/2] + weight_scale (F8_E4M3 per 16) + weight_scale_2     NVFP4
     U8 / I8 weight [rows, cols/2] + scale (F8_E8M0 per 32)                             MXFP4 */
static Linear load_linear(const Model *m, const char *base, int rows, int cols) {
    Linear w = {0};
    w.rows = rows;
    w.cols = cols;
    const Tensor *t = find_tensor(m, "%s.weight", base);
    if (!t) fatal("tensor %s.weight is missing from the checkpoint", base);
    const char *path = m->files[t->file].path;
    w.weight = t->data;
    if (t->dtype == DT_BF16 || t->dtype == DT_F32) {
        w.format = t->dtype == DT_BF16 ? FMT_BF16 : FMT_F32;
        expect_shape(m, t, 2, (int64_t[]){rows, cols});
    } else if (t->dtype == DT_F8_E4M3) {
        w.format = FMT_FP8;
        expect_shape(m, t, 2, (int64_t[]){rows, cols});
        const Tensor *s = find_tensor(m, "%s.scale", base);
        if (!s) s = find_tensor(m, "%s.weight_scale_inv", base);
        if (!s) fatal("%s: FP8 tensor %s.weight has no %s.scale or %s.weight_scale_inv", path, base, base, base);
        static const DType scale_types[] = {DT_F8_E8M0, DT_F32};
        expect_dtype(m, s, 2, scale_types);
        expect_shape(m, s, 2, (int64_t[]){(rows + 127) / 128, (cols + 127) / 128});
        w.scale = s->data;
        w.scale_is_f32 = s->dtype == DT_F32;
    } else if (t->dtype == DT_U8 || t->dtype == DT_I8) {
        if (cols % 32) fatal("%s: 4-bit tensor %s.weight has %d columns, not a multiple of 32", path, base, cols);
        expect_shape(m, t, 2, (int64_t[]){rows, cols / 2});
        const Tensor *nv = find_tensor(m, "%s.weight_scale", base), *mx = find_tensor(m, "%s.scale", base);
        if (nv) {
            w.format = FMT_NVFP4;
            static const DType e4m3[] = {DT_F8_E4M3}, f32[] = {DT_F32};
            expect_dtype(m, nv, 1, e4m3);
            expect_shape(m, nv, 2, (int64_t[]){rows, cols / 16});
            const Tensor *global = find_tensor(m, "%s.weight_scale_2", base);
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

/* ============================================================================== config.json */
/* config.json is read as transformers' DeepseekV4Config reads it, legacy keys included:
   compress_ratios (per layer 0 = sliding only, 4 = CSA, 128 = HCA), num_hash_layers,
   qk_rope_head_dim and rope_scaling, beside the newer layer_types / compress_rates /
   mlp_layer_types / partial_rotary_factor / rope_parameters. Absent optional keys take
   transformers' defaults; every value is range-checked. */

/* Integer `key` of the config object, `fallback` when absent (fallback < -1: required). */
static int config_int(const Json *root, const char *path, const char *key, long fallback) {
    const Json *v = json_get(root, key);
    if (!v || v->type == JSON_NULL) {
        if (fallback < -1) fatal("%s: required key \"%s\" is missing", path, key);
        return (int)fallback;
    }
    if (v->type != JSON_NUMBER || v->number != floor(v->number) || v->number < -1 || v->number > 1e9)
        fatal("%s: \"%s\" must be a non-negative integer", path, key);
    return (int)v->number;
}

static float config_float(const Json *root, const char *path, const char *key, double fallback) {
    const Json *v = json_get(root, key);
    if (!v || v->type == JSON_NULL) return (float)fallback;
    if (v->type != JSON_NUMBER || !isfinite(v->number)) fatal("%s: \"%s\" must be a number", path, key);
    return (float)v->number;
}

#define REQUIRED (-2)

/* Fill c from the parsed config.json (path for messages); fatal on anything unusable. */
static void parse_config(Config *c, const Json *root, const char *path) {
    memset(c, 0, sizeof *c);
    if (root->type != JSON_OBJECT) fatal("%s: not a JSON object", path);
    const Json *type = json_get(root, "model_type");
    if (!type || type->type != JSON_STRING || strcmp(type->string, "deepseek_v4"))
        fatal("%s: model_type is %s%s%s, expected \"deepseek_v4\"", path, type && type->type == JSON_STRING ? "\"" : "",
              type && type->type == JSON_STRING ? type->string : "missing", type && type->type == JSON_STRING ? "\"" : "");
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
    c->hc_mult = config_int(root, path, "hc_mult", 4);
    c->sinkhorn_iters = config_int(root, path, "hc_sinkhorn_iters", 20);
    c->sliding_window = config_int(root, path, "sliding_window", 128);
    c->index_heads = config_int(root, path, "index_n_heads", 64);
    c->index_dim = config_int(root, path, "index_head_dim", 128);
    c->index_topk = config_int(root, path, "index_topk", 512);
    c->bos_id = config_int(root, path, "bos_token_id", 0);
    c->hc_eps = config_float(root, path, "hc_eps", 1e-6);
    c->rms_eps = config_float(root, path, "rms_norm_eps", 1e-6);
    c->routed_scaling = config_float(root, path, "routed_scaling_factor", 1.5);
    c->swiglu_limit = config_float(root, path, "swiglu_limit", 10.0);
    c->rope_theta = config_float(root, path, "rope_theta", 10000.0);
    c->compress_rope_theta = config_float(root, path, "compress_rope_theta", 160000.0);

    const Json *eos = json_get(root, "eos_token_id");
    if (!eos || eos->type == JSON_NULL) c->eos_ids[c->n_eos++] = 1;
    else if (eos->type == JSON_ARRAY) {
        for (size_t i = 0; i < eos->length && c->n_eos < 8; i++) {
            if (eos->items[i].type != JSON_NUMBER) fatal("%s: eos_token_id must hold integers", path);
            c->eos_ids[c->n_eos++] = (int)eos->items[i].number;
        }
    } else c->eos_ids[c->n_eos++] = config_int(root, path, "eos_token_id", 1);

    const char *checks[][2] = {{"scoring_func", "sqrtsoftplus"}, {"hidden_act", "silu"}};
    for (int i = 0; i < 2; i++) {
        const Json *v = json_get(root, checks[i][0]);
        if (v && (v->type != JSON_STRING || strcmp(v->string, checks[i][1])))
            fatal("%s: %s must be \"%s\" (the only one nvfp4 implements)", path, checks[i][0], checks[i][1]);
    }
    if (config_int(root, path, "num_key_value_heads", 1) != 1) fatal("%s: num_key_value_heads must be 1 (V4 shares one K=V latent)", path);
    if (c->n_shared_experts != 1) fatal("%s: n_shared_experts is %d; DeepSeek V4 has exactly 1", path, c->n_shared_experts);
    if (c->hc_mult != 4) fatal("%s: hc_mult is %d; nvfp4 supports 4", path, c->hc_mult);

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
    if (c->n_layers > MAX_LAYERS) fatal("%s: num_hidden_layers is %d, at most %d supported", path, c->n_layers, MAX_LAYERS);
    if (c->topk > c->n_experts) fatal("%s: num_experts_per_tok (%d) exceeds n_routed_experts (%d)", path, c->topk, c->n_experts);
    if (c->n_heads % c->o_groups) fatal("%s: num_attention_heads (%d) is not a multiple of o_groups (%d)", path, c->n_heads, c->o_groups);

    /* rope dims: qk_rope_head_dim (legacy) or partial_rotary_factor */
    const Json *rope_dim = json_get(root, "qk_rope_head_dim");
    const Json *factor = json_get(root, "partial_rotary_factor");
    if (rope_dim && rope_dim->type != JSON_NULL) c->rope_dim = config_int(root, path, "qk_rope_head_dim", 0);
    else if (factor && factor->type == JSON_NUMBER) c->rope_dim = (int)(c->head_dim * factor->number);
    else c->rope_dim = c->head_dim / 8;
    if (c->rope_dim <= 0 || c->rope_dim % 2 || c->rope_dim > c->head_dim || c->rope_dim > c->index_dim)
        fatal("%s: rope dims %d must be even and at most head_dim (%d) and index_head_dim (%d)", path, c->rope_dim,
              c->head_dim, c->index_dim);

    /* YaRN on the compress rope: rope_scaling (legacy) or rope_parameters (flat or {main, compress}) */
    const Json *rope = json_get(root, "rope_scaling");
    if (!rope || rope->type == JSON_NULL) {
        rope = json_get(root, "rope_parameters");
        const Json *compress = rope ? json_get(rope, "compress") : NULL;
        if (compress) rope = compress;
    }
    if (rope && rope->type == JSON_OBJECT) {
        const Json *kind = json_get(rope, "rope_type");
        if (!kind) kind = json_get(rope, "type");
        if (kind && (kind->type != JSON_STRING || (strcmp(kind->string, "yarn") && strcmp(kind->string, "default"))))
            fatal("%s: rope type %s is not supported (only yarn and default)", path,
                  kind->type == JSON_STRING ? kind->string : "(not a string)");
        c->yarn = kind && !strcmp(kind->string, "yarn");
        if (c->yarn) {
            float attention_factor = config_float(rope, path, "attention_factor", 1.0);
            if (attention_factor != 1.0f) fatal("%s: YaRN attention_factor %g is not supported (V4 uses 1)", path, attention_factor);
            c->yarn_original_max = config_float(rope, path, "original_max_position_embeddings", 0);
            if (c->yarn_original_max <= 0) fatal("%s: YaRN needs original_max_position_embeddings", path);
            c->yarn_factor = config_float(rope, path, "factor",
                                          config_float(root, path, "max_position_embeddings", 1048576) / c->yarn_original_max);
            c->yarn_beta_fast = config_float(rope, path, "beta_fast", 32);
            c->yarn_beta_slow = config_float(rope, path, "beta_slow", 1);
            if (c->yarn_factor <= 0 || c->yarn_beta_fast <= 0 || c->yarn_beta_slow <= 0)
                fatal("%s: YaRN factor, beta_fast and beta_slow must be positive", path);
        }
    }

    /* compression rates and the attention kind of every layer */
    int csa_rate = 4, hca_rate = 128;
    const Json *rates = json_get(root, "compress_rates");
    if (rates && rates->type == JSON_OBJECT) {
        csa_rate = config_int(rates, path, "compressed_sparse_attention", 4);
        hca_rate = config_int(rates, path, "heavily_compressed_attention", 128);
    }
    csa_rate = config_int(root, path, "compress_rate_csa", csa_rate);
    hca_rate = config_int(root, path, "compress_rate_hca", hca_rate);
    if (csa_rate < 1 || hca_rate < 1 || csa_rate > 65536 || hca_rate > 65536)
        fatal("%s: compression rates must be between 1 and 65536", path);
    const Json *types = json_get(root, "layer_types"), *ratios = json_get(root, "compress_ratios");
    int mtp = config_int(root, path, "num_nextn_predict_layers", 0);
    if (types && types->type == JSON_ARRAY) {
        if (types->length != (size_t)c->n_layers)
            fatal("%s: layer_types has %zu entries for %d layers", path, types->length, c->n_layers);
        for (int l = 0; l < c->n_layers; l++) {
            const Json *t = &types->items[l];
            const char *s = t->type == JSON_STRING ? t->string : "";
            if (!strcmp(s, "sliding_attention")) c->attn_kind[l] = ATTN_SLIDING;
            else if (!strcmp(s, "compressed_sparse_attention")) c->attn_kind[l] = ATTN_CSA;
            else if (!strcmp(s, "heavily_compressed_attention")) c->attn_kind[l] = ATTN_HCA;
            else fatal("%s: layer_types[%d] is not a DeepSeek V4 attention type", path, l);
        }
    } else if (ratios && ratios->type == JSON_ARRAY) {
        if (ratios->length != (size_t)c->n_layers && ratios->length != (size_t)(c->n_layers + mtp))
            fatal("%s: compress_ratios has %zu entries for %d layers", path, ratios->length, c->n_layers);
        for (int l = 0; l < c->n_layers; l++) {
            double r = ratios->items[l].type == JSON_NUMBER ? ratios->items[l].number : -1;
            if (r == 0) c->attn_kind[l] = ATTN_SLIDING;
            else if (r == 4) c->attn_kind[l] = ATTN_CSA;
            else if (r == 128) c->attn_kind[l] = ATTN_HCA;
            else fatal("%s: compress_ratios[%d] must be 0, 4 or 128", path, l);
        }
    } else {
        for (int l = 0; l < c->n_layers; l++)
            c->attn_kind[l] = l < 2 ? ATTN_HCA : (l - 2) % 2 ? ATTN_CSA : ATTN_HCA;
    }
    for (int l = 0; l < c->n_layers; l++)
        c->compress_ratio[l] = c->attn_kind[l] == ATTN_CSA ? csa_rate : c->attn_kind[l] == ATTN_HCA ? hca_rate : 0;

    /* hash-routed layers: mlp_layer_types or num_hash_layers (the first layers) */
    const Json *mlp = json_get(root, "mlp_layer_types");
    if (mlp && mlp->type == JSON_ARRAY) {
        if (mlp->length != (size_t)c->n_layers) fatal("%s: mlp_layer_types has %zu entries for %d layers", path, mlp->length, c->n_layers);
        c->n_hash_layers = 0;
        for (int l = 0; l < c->n_layers; l++) {
            const char *s = mlp->items[l].type == JSON_STRING ? mlp->items[l].string : "";
            int hash = !strcmp(s, "hash_moe");
            if (!hash && strcmp(s, "moe")) fatal("%s: mlp_layer_types[%d] must be \"hash_moe\" or \"moe\"", path, l);
            if (hash && l != c->n_hash_layers) fatal("%s: hash_moe layers must come first", path);
            c->n_hash_layers += hash;
        }
    } else {
        c->n_hash_layers = config_int(root, path, "num_hash_layers", 3);
        if (c->n_hash_layers > c->n_layers) c->n_hash_layers = c->n_layers;
    }
}

/* ================================================================================== weights */

/* Map one safetensors file read-only and append its tensors to the model. */
static void open_safetensors(Model *m, const char *path, size_t *cap) {
    int fd = open(path, O_RDONLY);
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
        for (size_t i = 0; i < map->length; i++) {
            const Json *v = &map->items[i];
            if (v->type != JSON_STRING || !v->length || strchr(v->string, '/') || strlen(v->string) != v->length)
                fatal("%s: weight_map[\"%s\"] must be a file name in the model directory", index_path, map->keys[i]);
            int seen = 0;
            for (int s = 0; s < n_shards && !seen; s++) seen = !strcmp(shards[s], v->string);
            if (!seen) shards[n_shards++] = v->string;
        }
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
    for (size_t i = 0; i < m->n_tensors; i++) m->weight_bytes += m->tensors[i].nbytes;
}

static void load_compressor(const Model *m, Compressor *c, const char *prefix, int coff, int dim, int ratio) {
    const Config *cfg = &m->config;
    char name[256];
    snprintf(name, sizeof name, "%s.wkv", prefix);
    c->wkv = load_linear(m, name, coff * dim, cfg->hidden_size);
    snprintf(name, sizeof name, "%s.wgate", prefix);
    c->wgate = load_linear(m, name, coff * dim, cfg->hidden_size);
    snprintf(name, sizeof name, "%s.ape", prefix);
    c->ape = float_tensor(m, name, 2, (int64_t)ratio, (int64_t)(coff * dim));
    snprintf(name, sizeof name, "%s.norm.weight", prefix);
    c->norm = float_tensor(m, name, 1, (int64_t)dim);
}

/* A progress bar on stderr while loading, drawn only when stderr is a terminal. */
static void progress(const char *what, int done, int total) {
    if (!isatty(2)) return;
    int width = 40, filled = total ? done * width / total : width;
    fprintf(stderr, "\r%s [%.*s%*s] %d/%d", what, filled, "########################################", width - filled, "",
            done, total);
    if (done == total) fputs("\r\033[K", stderr);
}

/* Bind every weight of the model to its tensor, checking each dtype and shape against config. */
static void bind_weights(Model *m) {
    const Config *c = &m->config;
    int64_t E = c->hidden_size, HC = c->hc_mult, mix = (2 + HC) * HC;
    char name[256];
    m->embed = float_tensor(m, "embed.weight", 2, (int64_t)c->vocab_size, E);
    m->head = load_linear(m, "head", c->vocab_size, (int)E);
    m->norm = float_tensor(m, "norm.weight", 1, E);
    m->hc_head_fn = float_tensor(m, "hc_head_fn", 2, HC, HC * E);
    m->hc_head_base = float_tensor(m, "hc_head_base", 1, HC);
    m->hc_head_scale = float_tensor(m, "hc_head_scale", 1, (int64_t)1);
    m->layers = xcalloc((size_t)c->n_layers, sizeof(Layer));
    for (int l = 0; l < c->n_layers; l++) {
        Layer *L = &m->layers[l];
#define NAME(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
        L->attn_norm = float_tensor(m, NAME("layers.%d.attn_norm.weight", l), 1, E);
        L->ffn_norm = float_tensor(m, NAME("layers.%d.ffn_norm.weight", l), 1, E);
        L->hc_attn_fn = float_tensor(m, NAME("layers.%d.hc_attn_fn", l), 2, mix, HC * E);
        L->hc_attn_base = float_tensor(m, NAME("layers.%d.hc_attn_base", l), 1, mix);
        L->hc_attn_scale = float_tensor(m, NAME("layers.%d.hc_attn_scale", l), 1, (int64_t)3);
        L->hc_ffn_fn = float_tensor(m, NAME("layers.%d.hc_ffn_fn", l), 2, mix, HC * E);
        L->hc_ffn_base = float_tensor(m, NAME("layers.%d.hc_ffn_base", l), 1, mix);
        L->hc_ffn_scale = float_tensor(m, NAME("layers.%d.hc_ffn_scale", l), 1, (int64_t)3);
        int HD = c->n_heads * c->head_dim;
        L->wq_a = load_linear(m, NAME("layers.%d.attn.wq_a", l), c->q_lora_rank, (int)E);
        L->q_norm = float_tensor(m, NAME("layers.%d.attn.q_norm.weight", l), 1, (int64_t)c->q_lora_rank);
        L->wq_b = load_linear(m, NAME("layers.%d.attn.wq_b", l), HD, c->q_lora_rank);
        L->wkv = load_linear(m, NAME("layers.%d.attn.wkv", l), c->head_dim, (int)E);
        L->kv_norm = float_tensor(m, NAME("layers.%d.attn.kv_norm.weight", l), 1, (int64_t)c->head_dim);
        L->wo_a = load_linear(m, NAME("layers.%d.attn.wo_a", l), c->o_groups * c->o_lora_rank, HD / c->o_groups);
        L->wo_b = load_linear(m, NAME("layers.%d.attn.wo_b", l), (int)E, c->o_groups * c->o_lora_rank);
        L->attn_sink = float_tensor(m, NAME("layers.%d.attn.attn_sink", l), 1, (int64_t)c->n_heads);
        int ratio = c->compress_ratio[l];
        if (c->attn_kind[l] != ATTN_SLIDING) {
            int coff = c->attn_kind[l] == ATTN_CSA ? 2 : 1;
            load_compressor(m, &L->compressor, NAME("layers.%d.attn.compressor", l), coff, c->head_dim, ratio);
        }
        if (c->attn_kind[l] == ATTN_CSA) {
            L->index_wq_b = load_linear(m, NAME("layers.%d.attn.indexer.wq_b", l), c->index_heads * c->index_dim, c->q_lora_rank);
            L->index_weights_proj = load_linear(m, NAME("layers.%d.attn.indexer.weights_proj", l), c->index_heads, (int)E);
            load_compressor(m, &L->index_compressor, NAME("layers.%d.attn.indexer.compressor", l), 2, c->index_dim, ratio);
        }
        L->gate = load_linear(m, NAME("layers.%d.ffn.gate", l), c->n_experts, (int)E);
        if (l < c->n_hash_layers) {
            const Tensor *t = find_tensor(m, "layers.%d.ffn.gate.tid2eid", l);
            if (!t) fatal("tensor layers.%d.ffn.gate.tid2eid is missing (layer %d is hash-routed)", l, l);
            static const DType ints[] = {DT_I64};
            expect_dtype(m, t, 1, ints);
            expect_shape(m, t, 2, (int64_t[]){c->vocab_size, c->topk});
            const int64_t *ids = t->data;
            for (size_t i = 0; i < (size_t)c->vocab_size * c->topk; i++)
                if (ids[i] < 0 || ids[i] >= c->n_experts)
                    fatal("%s: tensor %s holds expert id %lld, outside 0..%d", m->files[t->file].path, t->name,
                          (long long)ids[i], c->n_experts - 1);
            L->tid2eid = *t;
        } else {
            L->gate_bias = float_tensor(m, NAME("layers.%d.ffn.gate.bias", l), 1, (int64_t)c->n_experts);
        }
        L->w1 = xcalloc((size_t)c->n_experts, sizeof(Linear));
        L->w2 = xcalloc((size_t)c->n_experts, sizeof(Linear));
        L->w3 = xcalloc((size_t)c->n_experts, sizeof(Linear));
        for (int e = 0; e < c->n_experts; e++) {
            L->w1[e] = load_linear(m, NAME("layers.%d.ffn.experts.%d.w1", l, e), c->moe_inter, (int)E);
            L->w2[e] = load_linear(m, NAME("layers.%d.ffn.experts.%d.w2", l, e), (int)E, c->moe_inter);
            L->w3[e] = load_linear(m, NAME("layers.%d.ffn.experts.%d.w3", l, e), c->moe_inter, (int)E);
        }
        L->shared_w1 = load_linear(m, NAME("layers.%d.ffn.shared_experts.w1", l), c->moe_inter, (int)E);
        L->shared_w2 = load_linear(m, NAME("layers.%d.ffn.shared_experts.w2", l), (int)E, c->moe_inter);
        L->shared_w3 = load_linear(m, NAME("layers.%d.ffn.shared_experts.w3", l), c->moe_inter, (int)E);
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

static void free_model(Model *m) {
    for (int i = 0; i < m->n_files; i++) {
        munmap(m->files[i].map, m->files[i].size);
        free(m->files[i].path);
    }
    for (size_t i = 0; i < m->n_tensors; i++) free((char *)m->tensors[i].name);
    for (int l = 0; m->layers && l < m->config.n_layers; l++) {
        free(m->layers[l].w1);
        free(m->layers[l].w2);
        free(m->layers[l].w3);
    }
    free(m->layers);
    free(m->files);
    free(m->tensors);
    free(m->index);
    memset(m, 0, sizeof *m);
}

/* ========================================================================= CPU forward pass */
/* Plain C, float32 activations with double accumulators: the reference for every GPU kernel
   and the engine's own CPU path. It computes what transformers' DeepseekV4ForCausalLM computes
   (see ../shared/docs/MODEL.md), one chunk of T consecutive tokens at a time. */

/* y[t, r] = sum_c W[row0 + r, c] * x[t, c] for r < nrows, t < T; x rows are x_stride floats
   apart, y rows y_stride. `row` is scratch for one decoded weight row. */
static void linear_rows(const Linear *w, int row0, int nrows, const float *x, size_t x_stride, float *y,
                        size_t y_stride, int T, float *row) {
    for (int r = 0; r < nrows; r++) {
        linear_row(w, row0 + r, row);
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * x_stride;
            double acc = 0;
            for (int c = 0; c < w->cols; c++) acc += (double)row[c] * xt[c];
            y[(size_t)t * y_stride + r] = (float)acc;
        }
    }
}

/* y[T, rows] = x[T, cols] W^T. */
static void linear(const Linear *w, const float *x, float *y, int T, float *row) {
    linear_rows(w, 0, w->rows, x, (size_t)w->cols, y, (size_t)w->rows, T, row);
}

/* out[n] = x * rsqrt(mean(x^2) + eps) * weight (weight NULL: unweighted). out may be x. */
static void rmsnorm(float *out, const float *x, const Tensor *weight, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * (weight ? tensor_float(weight, (size_t)i) : 1.0f);
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

/* Rotate the interleaved pairs (x[2i], x[2i+1]) of x[R] by angle sign * pos * inv_freq[i]. */
static void rope(float *x, int R, int pos, const float *inv_freq, float sign) {
    for (int i = 0; i < R / 2; i++) {
        float angle = (float)pos * inv_freq[i];
        float cs = cosf(angle), sn = sign * sinf(angle);
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cs - b * sn;
        x[2 * i + 1] = b * cs + a * sn;
    }
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* mHC input side for one token. h[HC, E] are the residual streams; fn [24, HC*E], base [24],
   scale [3]. Writes x[E] = sum_i pre[i] h[i], post[HC] and the Sinkhorn-projected comb[HC, HC]
   (comb[i][j] = how much of stream i flows into stream j). */
static void hc_pre(const Config *c, const float *h, const Tensor *fn, const Tensor *base, const Tensor *scale,
                   float *x, float *post, float *comb) {
    enum { HC = 4 };
    int n = HC * c->hidden_size;
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)h[i] * h[i];
    double inv_rms = 1.0 / sqrt(ss / n + c->rms_eps);
    float mix[(2 + HC) * HC];
    for (int k = 0; k < (2 + HC) * HC; k++) {
        double acc = 0;
        for (int i = 0; i < n; i++) acc += (double)tensor_float(fn, (size_t)k * n + i) * h[i];
        mix[k] = (float)(acc * inv_rms);
    }
    float pre[HC];
    float s0 = tensor_float(scale, 0), s1 = tensor_float(scale, 1), s2 = tensor_float(scale, 2);
    for (int i = 0; i < HC; i++) {
        pre[i] = sigmoid(mix[i] * s0 + tensor_float(base, i)) + c->hc_eps;
        post[i] = 2 * sigmoid(mix[HC + i] * s1 + tensor_float(base, HC + i));
    }
    for (int i = 0; i < HC; i++) {   /* softmax over each row, then Sinkhorn: columns, rows, ... */
        float *row = comb + i * HC, mx = -INFINITY, sum = 0;
        for (int j = 0; j < HC; j++) {
            row[j] = mix[2 * HC + i * HC + j] * s2 + tensor_float(base, 2 * HC + i * HC + j);
            mx = fmaxf(mx, row[j]);
        }
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
    for (int e = 0; e < c->hidden_size; e++) {
        float acc = 0;
        for (int i = 0; i < HC; i++) acc += pre[i] * h[(size_t)i * c->hidden_size + e];
        x[e] = acc;
    }
}

/* mHC output side: h[j] <- post[j] * out + sum_i comb[i][j] * h[i], for the HC streams h[HC, E]. */
static void hc_post(const Config *c, float *h, const float *out, const float *post, const float *comb) {
    enum { HC = 4 };
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
    enum { HC = 4 };
    int n = HC * c->hidden_size;
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)h[i] * h[i];
    double inv_rms = 1.0 / sqrt(ss / n + c->rms_eps);
    float pre[HC];
    for (int k = 0; k < HC; k++) {
        double acc = 0;
        for (int i = 0; i < n; i++) acc += (double)tensor_float(&m->hc_head_fn, (size_t)k * n + i) * h[i];
        pre[k] = sigmoid((float)(acc * inv_rms) * tensor_float(&m->hc_head_scale, 0) +
                         tensor_float(&m->hc_head_base, k)) + c->hc_eps;
    }
    for (int e = 0; e < c->hidden_size; e++) {
        float acc = 0;
        for (int i = 0; i < HC; i++) acc += pre[i] * h[(size_t)i * c->hidden_size + e];
        x[e] = acc;
    }
}

/* Feed the compressor projections kv[T, coff*d] and gate[T, coff*d] of positions pos0.. into
   compressor state s; every time a window of `ratio` tokens closes, emit one entry:
   per channel, softmax over the window's slots of (gate + ape[slot]) weights the kv values;
   CSA (coff 2) windows also span the previous window's first-half channels (the overlap);
   then RMSNorm and the compress RoPE at the window's first position. */
static void compressor_feed(const Config *c, const Compressor *w, CompressorState *s, int coff, int d, int ratio,
                            const float *kv, const float *gate, int T, int pos0, const float *inv_freq, float *entry) {
    int width = coff * d;
    for (int t = 0; t < T; t++) {
        int pos = pos0 + t, slot = pos % ratio;
        memcpy(s->pending_kv + (size_t)slot * width, kv + (size_t)t * width, width * sizeof(float));
        memcpy(s->pending_gate + (size_t)slot * width, gate + (size_t)t * width, width * sizeof(float));
        if (slot != ratio - 1) continue;
        for (int j = 0; j < d; j++) {
            /* the slots of this entry: (CSA, when there is a previous window) its first-half
               channels, then this window's last-half channels (HCA: its only d channels) */
            double mx = -INFINITY, sum = 0, acc = 0;
            int own = coff == 2 ? d : 0;   /* channel offset of this window's share */
            for (int pass = 0; pass < 2; pass++)
                for (int k = 0; k < ratio; k++) {
                    double g[2];
                    int n = 0;
                    if (coff == 2 && s->have_prev) g[n++] = s->prev_gate[(size_t)k * d + j];
                    g[n++] = s->pending_gate[(size_t)k * width + own + j] + tensor_float(&w->ape, (size_t)k * width + own + j);
                    for (int i = 0; i < n; i++) {
                        if (pass == 0) { if (g[i] > mx) mx = g[i]; continue; }
                        double p = exp(g[i] - mx);
                        float v = (i == 0 && n == 2) ? s->prev_kv[(size_t)k * d + j] : s->pending_kv[(size_t)k * width + own + j];
                        sum += p;
                        acc += p * v;
                    }
                }
            entry[j] = (float)(acc / sum);
        }
        if (coff == 2) {   /* keep this window's first half for the next entry */
            for (int k = 0; k < ratio; k++)
                for (int j = 0; j < d; j++) {
                    s->prev_kv[(size_t)k * d + j] = s->pending_kv[(size_t)k * width + j];
                    s->prev_gate[(size_t)k * d + j] = s->pending_gate[(size_t)k * width + j] + tensor_float(&w->ape, (size_t)k * width + j);
                }
            s->have_prev = 1;
        }
        float *out = s->entries + (size_t)s->n_entries * d;
        rmsnorm(out, entry, &w->norm, d, c->rms_eps);
        rope(out + d - c->rope_dim, c->rope_dim, s->n_entries * ratio, inv_freq, 1);
        s->n_entries++;
    }
}

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

/* Attention sub-block of layer l for the chunk: x[T, E] (normed) -> s->block_out[T, E]. */
static void attention(const Model *m, State *s, int l, int T, int pos0) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    LayerState *ls = &s->layers[l];
    int E = c->hidden_size, H = c->n_heads, D = c->head_dim, R = c->rope_dim, W = c->sliding_window;
    int ratio = c->compress_ratio[l];
    const float *freq = c->attn_kind[l] == ATTN_SLIDING ? s->rope_main : s->rope_compress;
    float *row = s->weight_row;

    /* queries: low-rank path, per-head RMS, RoPE; the shared K=V latent */
    linear(&L->wq_a, s->x, s->qr, T, row);
    for (int t = 0; t < T; t++) rmsnorm(s->qr + (size_t)t * c->q_lora_rank, s->qr + (size_t)t * c->q_lora_rank, &L->q_norm, c->q_lora_rank, c->rms_eps);
    linear(&L->wq_b, s->qr, s->q, T, row);
    linear(&L->wkv, s->x, s->kv, T, row);
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) {
            float *q = s->q + ((size_t)t * H + h) * D;
            rmsnorm(q, q, NULL, D, c->rms_eps);
            rope(q + D - R, R, pos0 + t, freq, 1);
        }
        float *kv = s->kv + (size_t)t * D;
        rmsnorm(kv, kv, &L->kv_norm, D, c->rms_eps);
        rope(kv + D - R, R, pos0 + t, freq, 1);
    }

    /* compressed entries (CSA / HCA) and, for CSA, the indexer's keys, queries and weights */
    if (ratio) {
        int coff = c->attn_kind[l] == ATTN_CSA ? 2 : 1;
        linear(&L->compressor.wkv, s->x, s->comp_kv, T, row);
        linear(&L->compressor.wgate, s->x, s->comp_gate, T, row);
        compressor_feed(c, &L->compressor, &ls->comp, coff, D, ratio, s->comp_kv, s->comp_gate, T, pos0, s->rope_compress, s->entry);
    }
    if (c->attn_kind[l] == ATTN_CSA) {
        int NI = c->index_heads, DI = c->index_dim;
        linear(&L->index_compressor.wkv, s->x, s->comp_kv, T, row);
        linear(&L->index_compressor.wgate, s->x, s->comp_gate, T, row);
        compressor_feed(c, &L->index_compressor, &ls->index_comp, 2, DI, ratio, s->comp_kv, s->comp_gate, T, pos0, s->rope_compress, s->entry);
        linear(&L->index_wq_b, s->qr, s->index_q, T, row);
        linear(&L->index_weights_proj, s->x, s->index_w, T, row);
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NI; h++) rope(s->index_q + ((size_t)t * NI + h) * DI + DI - R, R, pos0 + t, s->rope_compress, 1);
    }

    for (int t = 0; t < T; t++) {
        int pos = pos0 + t;
        /* the compressed entries this query attends to */
        int n_selected = 0, visible = ratio ? (pos + 1) / ratio : 0;
        if (c->attn_kind[l] == ATTN_HCA) {
            for (int e = 0; e < visible; e++) s->selected[n_selected++] = e;
        } else if (c->attn_kind[l] == ATTN_CSA) {   /* lightning indexer: top-k of visible entries */
            int NI = c->index_heads, DI = c->index_dim;
            for (int e = 0; e < visible; e++) {
                const float *key = ls->index_comp.entries + (size_t)e * DI;
                double score = 0;
                for (int h = 0; h < NI; h++) {
                    const float *q = s->index_q + ((size_t)t * NI + h) * DI;
                    double dot = 0;
                    for (int i = 0; i < DI; i++) dot += (double)q[i] * key[i];
                    if (dot > 0) score += dot / sqrt((double)DI) * (s->index_w[(size_t)t * NI + h] / sqrt((double)NI));
                }
                s->scores[e] = (float)score;
            }
            n_selected = visible < c->index_topk ? visible : c->index_topk;
            top_k(s->scores, visible, n_selected, s->selected);
        }
        int first = pos - W + 1 > 0 ? pos - W + 1 : 0, n_window = pos - first + 1;
        for (int h = 0; h < H; h++) {
            const float *q = s->q + ((size_t)t * H + h) * D;
            float sink = tensor_float(&L->attn_sink, h), mx = sink;
            /* scores: the sliding window (ring buffer or this chunk), then compressed entries */
            for (int k = 0; k < n_window + n_selected; k++) {
                const float *key = k < n_window ? (first + k >= pos0 ? s->kv + (size_t)(first + k - pos0) * D
                                                                      : ls->window + (size_t)((first + k) % W) * D)
                                                : ls->comp.entries + (size_t)s->selected[k - n_window] * D;
                double dot = 0;
                for (int i = 0; i < D; i++) dot += (double)q[i] * key[i];
                s->scores[k] = (float)(dot / sqrt((double)D));
                mx = fmaxf(mx, s->scores[k]);
            }
            double denom = exp((double)sink - mx);   /* the sink takes probability, gives no value */
            for (int k = 0; k < n_window + n_selected; k++) denom += s->scores[k] = expf(s->scores[k] - mx);
            float *o = s->attn + ((size_t)t * H + h) * D;
            for (int i = 0; i < D; i++) {
                double acc = 0;
                for (int k = 0; k < n_window + n_selected; k++) {
                    const float *key = k < n_window ? (first + k >= pos0 ? s->kv + (size_t)(first + k - pos0) * D
                                                                          : ls->window + (size_t)((first + k) % W) * D)
                                                    : ls->comp.entries + (size_t)s->selected[k - n_window] * D;
                    acc += (double)s->scores[k] * key[i];
                }
                o[i] = (float)(acc / denom);
            }
            rope(o + D - R, R, pos, freq, -1);   /* undo the values' rotation: relative positions */
        }
    }
    /* the last W keys of the chunk go to the ring buffer */
    for (int t = T > W ? T - W : 0; t < T; t++)
        memcpy(ls->window + (size_t)((pos0 + t) % W) * D, s->kv + (size_t)t * D, D * sizeof(float));

    /* grouped output projection: group g's heads -> O dims each, then wo_b mixes the groups */
    int G = c->o_groups, O = c->o_lora_rank, group_in = H * D / G;
    for (int g = 0; g < G; g++)
        linear_rows(&L->wo_a, g * O, O, s->attn + (size_t)g * group_in, (size_t)H * D, s->grouped + (size_t)g * O,
                    (size_t)G * O, T, row);
    linear(&L->wo_b, s->grouped, s->block_out, T, row);
    (void)E;
}

/* One expert (or the shared expert) on x[E], accumulated: out[E] += weight * w2(silu(min(w1 x,
   limit)) * clamp(w3 x, -limit, limit)). */
static void expert(const Config *c, State *s, const Linear *w1, const Linear *w2, const Linear *w3, const float *x,
                   float weight, float *out) {
    int I = c->moe_inter;
    float limit = c->swiglu_limit;
    linear(w1, x, s->expert_gate, 1, s->weight_row);
    linear(w3, x, s->expert_up, 1, s->weight_row);
    for (int i = 0; i < I; i++) {
        float g = fminf(s->expert_gate[i], limit), u = fmaxf(fminf(s->expert_up[i], limit), -limit);
        s->expert_gate[i] = g / (1.0f + expf(-g)) * u;
    }
    linear(w2, s->expert_gate, s->expert_out, 1, s->weight_row);
    for (int e = 0; e < c->hidden_size; e++) out[e] += weight * s->expert_out[e];
}

/* MoE sub-block of layer l for the chunk: x[T, E] (normed) -> s->block_out[T, E]. */
static void moe(const Model *m, State *s, int l, const int *tokens, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    int E = c->hidden_size, X = c->n_experts, K = c->topk;
    for (int t = 0; t < T; t++) {
        const float *x = s->x + (size_t)t * E;
        float *out = s->block_out + (size_t)t * E;
        memset(out, 0, E * sizeof(float));
        /* router: sqrt(softplus(logits)); experts by tid2eid (hash layers) or biased top-k */
        linear(&L->gate, x, s->router, 1, s->weight_row);
        float score[X > 0 ? X : 1], biased[X > 0 ? X : 1];
        for (int e = 0; e < X; e++) {
            float z = s->router[e];
            score[e] = sqrtf(z > 20 ? z : log1pf(expf(z)));
            biased[e] = l < c->n_hash_layers ? score[e] : score[e] + tensor_float(&L->gate_bias, e);
        }
        int chosen[K > 0 ? K : 1];
        if (l < c->n_hash_layers)
            for (int k = 0; k < K; k++) chosen[k] = (int)((const int64_t *)L->tid2eid.data)[(size_t)tokens[t] * K + k];
        else
            top_k(biased, X, K, chosen);
        double total = 0;
        for (int k = 0; k < K; k++) total += score[chosen[k]];
        for (int k = 0; k < K; k++) {
            float weight = (float)(score[chosen[k]] / (total + 1e-20)) * c->routed_scaling;
            int e = chosen[k];
            expert(c, s, &L->w1[e], &L->w2[e], &L->w3[e], x, weight, out);
        }
        expert(c, s, &L->shared_w1, &L->shared_w2, &L->shared_w3, x, 1.0f, out);
    }
}

/* Run T tokens (positions s->pos ...) through the model, advancing the state. Writes logits for
   every token into s->logits[T, V] when all_logits, else only for the last token (row 0). */
static void forward(const Model *m, State *s, const int *tokens, int T, int all_logits) {
    const Config *c = &m->config;
    int E = c->hidden_size, HC = c->hc_mult, pos0 = s->pos;
    for (int t = 0; t < T; t++) {   /* embedding, copied into the HC residual streams */
        for (int e = 0; e < E; e++) {
            float v = tensor_float(&m->embed, (size_t)tokens[t] * E + e);
            for (int i = 0; i < HC; i++) s->h[((size_t)t * HC + i) * E + e] = v;
        }
    }
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        for (int site = 0; site < 2; site++) {   /* 0: attention, 1: MoE */
            for (int t = 0; t < T; t++) {
                float *x = s->x + (size_t)t * E;
                hc_pre(c, s->h + (size_t)t * HC * E, site ? &L->hc_ffn_fn : &L->hc_attn_fn,
                       site ? &L->hc_ffn_base : &L->hc_attn_base, site ? &L->hc_ffn_scale : &L->hc_attn_scale, x,
                       s->post + (size_t)t * HC, s->comb + (size_t)t * HC * HC);
                rmsnorm(x, x, site ? &L->ffn_norm : &L->attn_norm, E, c->rms_eps);
            }
            if (site == 0) attention(m, s, l, T, pos0);
            else moe(m, s, l, tokens, T);
            for (int t = 0; t < T; t++)
                hc_post(c, s->h + (size_t)t * HC * E, s->block_out + (size_t)t * E, s->post + (size_t)t * HC,
                        s->comb + (size_t)t * HC * HC);
        }
    }
    int first = all_logits ? 0 : T - 1;
    for (int t = first; t < T; t++) {
        float *x = s->x + (size_t)(t - first) * E;
        hc_head(m, s->h + (size_t)t * HC * E, x);
        rmsnorm(x, x, &m->norm, E, c->rms_eps);
    }
    linear(&m->head, s->x, s->logits, T - first, s->weight_row);
    s->pos += T;
}

/* =========================================================================== decoding state */
/* Everything the forward pass writes, allocated once from the chunk size T (max_tokens) and the
   context C (max_ctx): the sliding-window ring buffers, the compressors' pending windows and
   overlap, the compressed entries (C / ratio per compressor) and the scratch of one chunk. */

/* Bytes alloc_state would allocate, or SIZE_MAX when the sizes overflow. */
static size_t state_bytes(const Config *c, int T, int C) {
    size_t E = c->hidden_size, H = c->n_heads, D = c->head_dim, DI = c->index_dim, NI = c->index_heads;
    size_t wide = 2 * (D > DI ? D : DI), floats = 0, ints = 0;
    size_t max_cols = E;
    size_t cols[] = {(size_t)c->q_lora_rank, H * D / c->o_groups, (size_t)c->o_groups * c->o_lora_rank, (size_t)c->moe_inter};
    for (int i = 0; i < 4; i++) max_cols = cols[i] > max_cols ? cols[i] : max_cols;
    for (int l = 0; l < c->n_layers; l++) {
        size_t ratio = c->compress_ratio[l];
        floats += (size_t)c->sliding_window * D;
        if (ratio) floats += 2 * ratio * wide + 2 * ratio * D + (C / ratio) * D;
        if (c->attn_kind[l] == ATTN_CSA) floats += 2 * ratio * 2 * DI + 2 * ratio * DI + (C / ratio) * DI;
    }
    size_t per_token = 4 * E + E + 4 + 16 + E + c->q_lora_rank + H * D + D + H * D + (size_t)c->o_groups * c->o_lora_rank +
                       2 * wide + NI * DI + NI + (size_t)c->vocab_size;
    if ((size_t)T > SIZE_MAX / 8 / per_token) return SIZE_MAX;
    floats += (size_t)T * per_token + c->sliding_window + C + max_cols + wide + c->n_experts + 3 * (E + c->moe_inter) +
              c->rope_dim;
    ints += C;
    if (floats > SIZE_MAX / 8) return SIZE_MAX;
    return floats * sizeof(float) + ints * sizeof(int);
}

static void alloc_compressor_state(CompressorState *s, int coff, int d, int ratio, int C) {
    s->pending_kv = xcalloc((size_t)ratio * coff * d, sizeof(float));
    s->pending_gate = xcalloc((size_t)ratio * coff * d, sizeof(float));
    if (coff == 2) {
        s->prev_kv = xcalloc((size_t)ratio * d, sizeof(float));
        s->prev_gate = xcalloc((size_t)ratio * d, sizeof(float));
    }
    s->entries = xcalloc((size_t)(C / ratio) + 1, (size_t)d * sizeof(float));
}

static void free_compressor_state(CompressorState *s) {
    free(s->pending_kv);
    free(s->pending_gate);
    free(s->prev_kv);
    free(s->prev_gate);
    free(s->entries);
}

/* Allocate the state for chunks of up to T tokens and a context of C tokens. */
static void alloc_state(State *s, const Config *c, int T, int C) {
    memset(s, 0, sizeof *s);
    s->max_tokens = T;
    s->max_ctx = C;
    size_t E = c->hidden_size, H = c->n_heads, D = c->head_dim, DI = c->index_dim, NI = c->index_heads;
    size_t wide = 2 * (D > DI ? D : DI), HC = c->hc_mult;
    s->layers = xcalloc((size_t)c->n_layers, sizeof(LayerState));
    for (int l = 0; l < c->n_layers; l++) {
        LayerState *ls = &s->layers[l];
        ls->window = xcalloc((size_t)c->sliding_window * D, sizeof(float));
        int ratio = c->compress_ratio[l];
        if (ratio) alloc_compressor_state(&ls->comp, c->attn_kind[l] == ATTN_CSA ? 2 : 1, (int)D, ratio, C);
        if (c->attn_kind[l] == ATTN_CSA) alloc_compressor_state(&ls->index_comp, 2, (int)DI, ratio, C);
    }
    size_t max_cols = E;
    size_t cols[] = {(size_t)c->q_lora_rank, H * D / c->o_groups, (size_t)c->o_groups * c->o_lora_rank, (size_t)c->moe_inter};
    for (int i = 0; i < 4; i++) max_cols = cols[i] > max_cols ? cols[i] : max_cols;
    s->h = xcalloc((size_t)T * HC * E, sizeof(float));
    s->x = xcalloc((size_t)T * E, sizeof(float));
    s->post = xcalloc((size_t)T * HC, sizeof(float));
    s->comb = xcalloc((size_t)T * HC * HC, sizeof(float));
    s->block_out = xcalloc((size_t)T * E, sizeof(float));
    s->qr = xcalloc((size_t)T * c->q_lora_rank, sizeof(float));
    s->q = xcalloc((size_t)T * H * D, sizeof(float));
    s->kv = xcalloc((size_t)T * D, sizeof(float));
    s->attn = xcalloc((size_t)T * H * D, sizeof(float));
    s->grouped = xcalloc((size_t)T * c->o_groups * c->o_lora_rank, sizeof(float));
    s->comp_kv = xcalloc((size_t)T * wide, sizeof(float));
    s->comp_gate = xcalloc((size_t)T * wide, sizeof(float));
    s->index_q = xcalloc((size_t)T * NI * DI, sizeof(float));
    s->index_w = xcalloc((size_t)T * NI, sizeof(float));
    s->scores = xcalloc((size_t)c->sliding_window + C + 1, sizeof(float));
    s->selected = xcalloc((size_t)C + 1, sizeof(int));
    s->entry = xcalloc(wide, sizeof(float));
    s->weight_row = xcalloc(max_cols, sizeof(float));
    s->router = xcalloc((size_t)c->n_experts, sizeof(float));
    s->expert_gate = xcalloc((size_t)c->moe_inter, sizeof(float));
    s->expert_up = xcalloc((size_t)c->moe_inter, sizeof(float));
    s->expert_out = xcalloc(E, sizeof(float));
    s->rope_main = xcalloc((size_t)c->rope_dim / 2, sizeof(float));
    s->rope_compress = xcalloc((size_t)c->rope_dim / 2, sizeof(float));
    s->logits = xcalloc((size_t)T * c->vocab_size, sizeof(float));
    rope_frequencies(c, 0, s->rope_main);
    rope_frequencies(c, 1, s->rope_compress);
}

static void free_state(State *s, const Config *c) {
    for (int l = 0; s->layers && l < c->n_layers; l++) {
        free(s->layers[l].window);
        free_compressor_state(&s->layers[l].comp);
        free_compressor_state(&s->layers[l].index_comp);
    }
    free(s->layers);
    float *buffers[] = {s->h, s->x, s->post, s->comb, s->block_out, s->qr, s->q, s->kv, s->attn, s->grouped,
                        s->comp_kv, s->comp_gate, s->index_q, s->index_w, s->scores, s->entry, s->weight_row,
                        s->router, s->expert_gate, s->expert_up, s->expert_out, s->rope_main, s->rope_compress,
                        s->logits};
    for (size_t i = 0; i < sizeof buffers / sizeof *buffers; i++) free(buffers[i]);
    free(s->selected);
    memset(s, 0, sizeof *s);
}

/* =============================================================================== tokenizer */
#include "wip/tokenizer.c"

/* ================================================================================= sampler */

/* xorshift64*: a small, seedable random source (state must not be 0). */
static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_float(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static const float *sort_probs;   /* probabilities that compare_prob_desc orders by */
static int compare_prob_desc(const void *a, const void *b) {
    float x = sort_probs[*(const int *)a], y = sort_probs[*(const int *)b];
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Pick the next token from logits[V] (overwritten): greedy when temperature is 0, otherwise a
   draw from softmax(logits / temperature) restricted to the smallest set of most likely tokens
   whose probability reaches top_p. */
static int sample(Sampler *s, float *logits, int V) {
    if (s->temperature <= 0) return argmax(logits, V);
    float mx = logits[argmax(logits, V)];
    double sum = 0;
    for (int i = 0; i < V; i++) sum += logits[i] = expf((logits[i] - mx) / s->temperature);
    for (int i = 0; i < V; i++) logits[i] = (float)(logits[i] / sum);
    int n = 0;
    float cutoff = s->top_p < 1 ? (1 - s->top_p) / (V > 1 ? V - 1 : 1) : 0;   /* can never be in the set */
    for (int i = 0; i < V; i++)
        if (logits[i] >= cutoff) s->order[n++] = i;
    sort_probs = logits;
    qsort(s->order, (size_t)n, sizeof(int), compare_prob_desc);
    double kept = 0;
    int last = n - 1;
    for (int i = 0; i < n; i++) {
        kept += logits[s->order[i]];
        if (kept >= s->top_p) { last = i; break; }
    }
    double r = random_float(&s->rng) * kept, acc = 0;
    for (int i = 0; i <= last; i++) {
        acc += logits[s->order[i]];
        if (r < acc) return s->order[i];
    }
    return s->order[last];
}

/* ============================================================================== generation */

typedef struct {
    const char *model_dir, *prompt, *ids, *dump_logits;
    int n_generate, max_ctx, max_tokens, chat, tokenize_only, cpu;
    float temperature, top_p;
    uint64_t seed;
} Options;

/* Load tokenizer.json of the model directory (and tokenizer_config.json's add_bos_token);
   fatal when it is unusable or names ids the model's vocabulary does not have. */
static void load_tokenizer(Tokenizer *t, int *add_bos, const char *dir, const Config *c) {
    char *path = path_join(dir, "tokenizer.json"), err[512];
    if (tokenizer_load_file(t, path, err, sizeof err)) fatal("%s: %s", path, err);
    if (t->n_ids > c->vocab_size)
        fatal("%s: the tokenizer has ids up to %d but the model's vocab_size is %d", path, t->n_ids - 1, c->vocab_size);
    free(path);
    *add_bos = 1;
    path = path_join(dir, "tokenizer_config.json");
    if (access(path, F_OK) == 0) {
        Json *tc = load_json_file(path);
        const Json *bos = json_get(tc, "add_bos_token");
        if (bos && bos->type == JSON_BOOL) *add_bos = bos->number != 0;
        json_free(tc);
    }
    free(path);
}

/* Check that text[n] is valid UTF-8; fatal naming the first bad byte otherwise. */
static void check_utf8(const char *text, size_t n, const char *what) {
    for (size_t i = 0; i < n;) {
        unsigned char b = (unsigned char)text[i];
        size_t len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
        uint32_t cp = len == 1 ? b : len == 2 ? b & 31u : len == 3 ? b & 15u : b & 7u;
        int ok = len && i + len <= n;
        for (size_t k = 1; ok && k < len; k++) {
            ok = ((unsigned char)text[i + k] >> 6) == 2;
            cp = cp << 6 | ((unsigned char)text[i + k] & 63u);
        }
        if (ok) ok = !(len == 2 && cp < 0x80) && !(len == 3 && cp < 0x800) && !(len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) &&
                     !(cp >= 0xD800 && cp <= 0xDFFF);
        if (!ok) fatal("%s is not valid UTF-8 (bad byte 0x%02x at offset %zu)", what, b, i);
        i += len;
    }
}

/* The ids fed to the model for the prompt: BOS (when the tokenizer asks for it), then the text,
   wrapped in DeepSeek V4's chat format with --chat:
     <｜begin▁of▁sentence｜><｜User｜>{prompt}<｜Assistant｜></think>
   (</think> only when the tokenizer has it: V4's non-thinking chat mode). Returns the count;
   *ids is allocated. */
static int prompt_ids(const Tokenizer *t, int add_bos, int bos_id, const char *prompt, int chat, int **ids) {
    size_t n = strlen(prompt);
    if (n == 0) fatal("the prompt is empty");
    check_utf8(prompt, n, "the prompt");
    char *text = (char *)prompt;
    if (chat) {
        const char *close = tokenizer_find(t, "</think>") >= 0 ? "</think>" : "";
        size_t len = n + 64;
        text = xcalloc(len, 1);
        snprintf(text, len, "<｜User｜>%s<｜Assistant｜>%s", prompt, close);
        n = strlen(text);
    }
    int count = tokenizer_encode(t, text, n, NULL, 0);
    *ids = xcalloc((size_t)count + 1, sizeof(int));
    int at = 0;
    if (add_bos || chat) (*ids)[at++] = bos_id;
    at += tokenizer_encode(t, text, n, *ids + at, count);
    if (text != prompt) free(text);
    return at;
}

/* Parse "--ids 0,17,42": comma-separated ids, each below vocab. Returns the count. */
static int parse_ids(const char *list, int vocab, int **ids) {
    size_t n = 1;
    for (const char *p = list; *p; p++) n += *p == ',';
    *ids = xcalloc(n, sizeof(int));
    int count = 0;
    for (const char *p = list;;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && *end != ','))
            fatal("--ids: \"%s\" is not a comma-separated list of token ids", list);
        if (v < 0 || v >= vocab) fatal("--ids: token id %ld is outside the vocabulary (0..%d)", v, vocab - 1);
        (*ids)[count++] = (int)v;
        if (!*end) break;
        p = end + 1;
    }
    return count;
}

/* Write a token's text to stdout, holding back an incomplete UTF-8 character. */
static void print_token(const Tokenizer *t, Utf8Stream *stream, int id) {
    size_t len = 0;
    const char *bytes = id < t->n_ids ? tokenizer_token_bytes(t, id, &len) : NULL;
    char out[4096 + 4];
    while (bytes && len) {
        size_t piece = len > 4096 ? 4096 : len;
        fwrite(out, 1, utf8_stream_push(stream, bytes, piece, out), stdout);
        bytes += piece;
        len -= piece;
    }
    fflush(stdout);
}

static void write_logits(FILE *f, const float *logits, size_t rows, int V) {
    if (f && fwrite(logits, sizeof(float), rows * V, f) != rows * V) fatal("cannot write the logits file: %s", strerror(errno));
}

/* Prefill the prompt in chunks, then generate up to n tokens, streaming them to stdout.
   Stops at an EOS id, after n tokens, or when the context is full. */
static void generate(const Model *m, State *s, const Tokenizer *t, Sampler *sampler, const int *prompt, int n_prompt,
                     int n_generate, FILE *dump) {
    const Config *c = &m->config;
    if (n_prompt > s->max_ctx) fatal("the prompt has %d tokens, more than the context (--ctx %d)", n_prompt, s->max_ctx);
    double start = now_seconds();
    float *last = s->logits;   /* logits of the prompt's last token */
    for (int done = 0; done < n_prompt;) {
        int T = n_prompt - done < s->max_tokens ? n_prompt - done : s->max_tokens;
        forward(m, s, prompt + done, T, dump != NULL);
        write_logits(dump, s->logits, (size_t)T, c->vocab_size);
        last = s->logits + (dump ? (size_t)(T - 1) * c->vocab_size : 0);
        done += T;
    }
    double prefilled = now_seconds();
    Utf8Stream stream = {0};
    int generated = 0, token;
    for (;;) {
        token = sample(sampler, last, c->vocab_size);
        generated++;
        print_token(t, &stream, token);
        int eos = 0;
        for (int i = 0; i < c->n_eos; i++) eos |= token == c->eos_ids[i];
        if (eos || generated >= n_generate) break;
        if (s->pos >= s->max_ctx) {
            fprintf(stderr, "\nnvfp4: the context is full (--ctx %d): stopping\n", s->max_ctx);
            break;
        }
        forward(m, s, &token, 1, 0);
        write_logits(dump, s->logits, 1, c->vocab_size);
        last = s->logits;
    }
    char tail[8];
    fwrite(tail, 1, utf8_stream_flush(&stream, tail), stdout);
    printf("\n");
    double end = now_seconds();
    fprintf(stderr, "nvfp4: %d prompt tokens, prefill %.1f tok/s; %d generated, decode %.2f tok/s (cpu)\n", n_prompt,
            n_prompt / (prefilled - start), generated, generated > 1 ? (generated - 1) / (end - prefilled) : 0.0);
}

/* ============================================================================= command line */

static void usage(FILE *f) {
    fprintf(f,
            "usage: nvfp4 MODEL_DIR \"prompt\" [options]\n"
            "Runs a DeepSeek V4 checkpoint (BF16, FP8, MXFP4 and NVFP4 tensors) on a prompt.\n\n"
            "  -n N               generate at most N tokens (default 256); stops earlier at EOS\n"
            "  --temp T           sampling temperature, 0 = greedy (default 0.6)\n"
            "  --top-p P          nucleus sampling: keep the most likely tokens up to P (default 0.95)\n"
            "  --seed S           random seed for sampling (default: from the clock)\n"
            "  --ctx C            maximum context in tokens, prompt included (default 4096)\n"
            "  --chunk T          prefill chunk size: at most T tokens per forward pass (default 128)\n"
            "  --chat             wrap the prompt in DeepSeek V4's chat format\n"
            "  --ids 0,17,42      feed exactly these token ids (nothing prepended) instead of a prompt\n"
            "  --tokenize         print the prompt's ids as they would be fed, comma-separated, and exit\n"
            "  --dump-logits FILE write float32 logits, one row of vocab_size per evaluated position\n"
            "  --cpu              run on the CPU (the only path in this version)\n"
            "  -h, --help         show this help\n");
}

/* Parse a number option: the whole string must be a number within [lo, hi]. */
static double number_arg(const char *option, const char *value, double lo, double hi) {
    if (!value) fatal("%s needs a value", option);
    char *end;
    errno = 0;
    double v = strtod(value, &end);
    if (end == value || *end || errno || !(v >= lo && v <= hi))
        fatal("%s: \"%s\" is not a number between %g and %g", option, value, lo, hi);
    return v;
}

static int int_arg(const char *option, const char *value, double lo, double hi) {
    double v = number_arg(option, value, lo, hi);
    if (v != floor(v)) fatal("%s: \"%s\" is not a whole number", option, value);
    return (int)v;
}

static Options parse_options(int argc, char **argv) {
    Options o = {0};
    o.n_generate = 256;
    o.max_ctx = 4096;
    o.max_tokens = 128;
    o.temperature = 0.6f;
    o.top_p = 0.95f;
    o.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        else if (!strcmp(a, "-n")) { o.n_generate = int_arg(a, v, 1, 1 << 30); i++; }
        else if (!strcmp(a, "--temp")) { o.temperature = (float)number_arg(a, v, 0, 100); i++; }
        else if (!strcmp(a, "--top-p")) { o.top_p = (float)number_arg(a, v, 1e-6, 1); i++; }
        else if (!strcmp(a, "--seed")) { o.seed = (uint64_t)number_arg(a, v, 0, 9007199254740992.0); i++; }
        else if (!strcmp(a, "--ctx")) { o.max_ctx = int_arg(a, v, 1, 1 << 30); i++; }
        else if (!strcmp(a, "--chunk")) { o.max_tokens = int_arg(a, v, 1, 1 << 20); i++; }
        else if (!strcmp(a, "--ids")) { if (!v) fatal("--ids needs a list"); o.ids = v; i++; }
        else if (!strcmp(a, "--dump-logits")) { if (!v) fatal("--dump-logits needs a file"); o.dump_logits = v; i++; }
        else if (!strcmp(a, "--chat")) o.chat = 1;
        else if (!strcmp(a, "--tokenize")) o.tokenize_only = 1;
        else if (!strcmp(a, "--cpu")) o.cpu = 1;
        else if (a[0] == '-' && a[1]) fatal("unknown option %s (see nvfp4 -h)", a);
        else if (!o.model_dir) o.model_dir = a;
        else if (!o.prompt) o.prompt = a;
        else fatal("unexpected argument \"%s\" (quote the prompt; see nvfp4 -h)", a);
    }
    if (!o.model_dir) { usage(stderr); exit(2); }
    if (!o.prompt && !o.ids) fatal("no prompt given (nvfp4 MODEL_DIR \"prompt\", or --ids)");
    if (o.prompt && o.ids) fatal("give either a prompt or --ids, not both");
    if (o.seed == 0) o.seed = 0x9E3779B97F4A7C15ull;
    return o;
}

#ifndef TESTING
int main(int argc, char **argv) {
    Options o = parse_options(argc, argv);
    Model model;
    Tokenizer tokenizer;
    int add_bos, *ids, n_ids;
    if (o.tokenize_only) {   /* no weights are loaded */
        Config config;
        load_config(&config, o.model_dir);
        load_tokenizer(&tokenizer, &add_bos, o.model_dir, &config);
        n_ids = o.ids ? parse_ids(o.ids, config.vocab_size, &ids)
                      : prompt_ids(&tokenizer, add_bos, config.bos_id, o.prompt, o.chat, &ids);
        for (int i = 0; i < n_ids; i++) printf("%s%d", i ? "," : "", ids[i]);
        printf("\n");
        return 0;
    }
    double t0 = now_seconds();
    load_model(&model, o.model_dir);
    const Config *c = &model.config;
    load_tokenizer(&tokenizer, &add_bos, o.model_dir, c);
    n_ids = o.ids ? parse_ids(o.ids, c->vocab_size, &ids) : prompt_ids(&tokenizer, add_bos, c->bos_id, o.prompt, o.chat, &ids);
    if (n_ids > o.max_ctx) fatal("the prompt has %d tokens, more than the context (--ctx %d)", n_ids, o.max_ctx);
    if (o.max_tokens > o.max_ctx) o.max_tokens = o.max_ctx;
    size_t bytes = state_bytes(c, o.max_tokens, o.max_ctx);
    size_t physical = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE);
    if (bytes == SIZE_MAX || bytes > physical)
        fatal("the decoding state for --ctx %d and --chunk %d needs %.1f GiB, more than this machine's %.1f GiB",
              o.max_ctx, o.max_tokens, bytes == SIZE_MAX ? INFINITY : bytes / 1073741824.0, physical / 1073741824.0);
    State state;
    alloc_state(&state, c, o.max_tokens, o.max_ctx);
    Sampler sampler = {o.temperature, o.top_p, o.seed, xcalloc((size_t)c->vocab_size, sizeof(int))};
    FILE *dump = NULL;
    if (o.dump_logits && !(dump = fopen(o.dump_logits, "wb"))) fatal("cannot create %s: %s", o.dump_logits, strerror(errno));
    fprintf(stderr, "nvfp4: loaded %s (%d layers, %.2f GB of weights) in %.2f s\n", o.model_dir, c->n_layers,
            model.weight_bytes / 1e9, now_seconds() - t0);
    generate(&model, &state, &tokenizer, &sampler, ids, n_ids, o.n_generate, dump);
    if (dump && fclose(dump)) fatal("cannot write %s: %s", o.dump_logits, strerror(errno));
    free(sampler.order);
    free(ids);
    free_state(&state, c);
    tokenizer_free(&tokenizer);
    free_model(&model);
    return 0;
}
#endif
