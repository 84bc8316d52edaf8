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

/* Monotonic time in seconds, for the stats line. */
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
    if (!text) fatal("cannot read %s: %s", path, errno == EINVAL ? "not a regular file" : strerror(errno));
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

/* BF16 -> float: the 16 bits are the top half of a float32. */
static float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* F8 E4M3 (the "fn" variant: no infinities, S.1111.111 is NaN) -> float. */
static float e4m3_to_float(uint8_t byte) {
    int sign = byte >> 7, exponent = (byte >> 3) & 15, mantissa = byte & 7;
    float magnitude;
    if (exponent == 15 && mantissa == 7) magnitude = NAN;
    else if (exponent == 0) magnitude = ldexpf((float)mantissa, -9);   /* subnormal: m/8 * 2^-6 */
    else magnitude = ldexpf(1.0f + mantissa / 8.0f, exponent - 7);
    return sign ? -magnitude : magnitude;
}

/* F8 E8M0 -> float: 2^(byte - 127); 255 is NaN. */
static float e8m0_to_float(uint8_t byte) {
    return byte == 255 ? NAN : ldexpf(1.0f, (int)byte - 127);
}

/* Element i of a mapped array. safetensors promises no alignment, so every multi-byte value
   is read with memcpy (which compiles to a plain load where the CPU allows it). */
static uint16_t load_u16(const void *p, size_t i) { uint16_t v; memcpy(&v, (const uint8_t *)p + 2 * i, 2); return v; }
static float load_f32(const void *p, size_t i) { float v; memcpy(&v, (const uint8_t *)p + 4 * i, 4); return v; }
static int64_t load_i64(const void *p, size_t i) { int64_t v; memcpy(&v, (const uint8_t *)p + 8 * i, 8); return v; }

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
        for (size_t c = 0; c < cols; c++) {
            float s = w->scale_is_f32 ? load_f32(w->scale, srow + c / 128)
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

/* Hash of a tensor name for the index. */
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

/* Fatal when a JSON object names a key twice: Python keeps the last, json_get the first, so
   such a file would mean different things to different readers. */
static void refuse_duplicate_keys(const Json *obj, const char *path) {
    for (size_t i = 0; obj && obj->type == JSON_OBJECT && i < obj->length; i++)
        for (size_t j = i + 1; j < obj->length; j++)
            if (!strcmp(obj->keys[i], obj->keys[j])) fatal("%s: key \"%s\" appears twice", path, obj->keys[i]);
}

/* Fill c from the parsed config.json (path for messages); fatal on anything unusable. */
static void parse_config(Config *c, const Json *root, const char *path) {
    memset(c, 0, sizeof *c);
    if (root->type != JSON_OBJECT) fatal("%s: not a JSON object", path);
    refuse_duplicate_keys(root, path);
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
    c->hc_eps = config_float(root, path, "hc_eps", 1e-6);
    c->rms_eps = config_float(root, path, "rms_norm_eps", 1e-6);
    c->routed_scaling = config_float(root, path, "routed_scaling_factor", 1.5);
    c->swiglu_limit = config_float(root, path, "swiglu_limit", 10.0);
    c->rope_theta = config_float(root, path, "rope_theta", 10000.0);
    c->compress_rope_theta = config_float(root, path, "compress_rope_theta", 160000.0);

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
    const char *biases[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++) {
        const Json *v = json_get(root, biases[i]);
        if (v && v->type == JSON_BOOL && v->number) fatal("%s: %s is true; DeepSeek V4 has no biases there", path, biases[i]);
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

    /* rope dims: qk_rope_head_dim (legacy) or partial_rotary_factor */
    const Json *rope_dim = json_get(root, "qk_rope_head_dim");
    const Json *factor = json_get(root, "partial_rotary_factor");
    if (factor && factor->type != JSON_NULL) {   /* as in transformers, partial_rotary_factor wins */
        float f = config_float(root, path, "partial_rotary_factor", 0);
        if (!(f > 0 && f <= 1)) fatal("%s: partial_rotary_factor must be in (0, 1]", path);
        c->rope_dim = (int)(c->head_dim * f);
    } else if (rope_dim && rope_dim->type != JSON_NULL) c->rope_dim = config_int(root, path, "qk_rope_head_dim", 0);
    else c->rope_dim = c->head_dim / 8;
    if (c->rope_dim <= 0 || c->rope_dim % 2 || c->rope_dim > c->head_dim || c->rope_dim > c->index_dim)
        fatal("%s: rope dims %d must be even and at most head_dim (%d) and index_head_dim (%d)", path, c->rope_dim,
              c->head_dim, c->index_dim);

    /* RoPE: "main" (sliding-only layers) is plain; "compress" (CSA/HCA layers) may be YaRN.
       Given as rope_scaling (legacy) or a flat rope_parameters, both meaning the compress rope
       with attention_factor 1, or as rope_parameters {"main": .., "compress": ..}, where each
       may carry its own rope_theta and, as in transformers, an absent YaRN attention_factor is
       derived from the factor (mscale). */
    const Json *rope = json_get(root, "rope_scaling"), *params = json_get(root, "rope_parameters");
    const Json *nested_main = json_get(params, "main"), *nested_compress = json_get(params, "compress");
    int nested = (!rope || rope->type == JSON_NULL) && nested_main && nested_compress;
    if (!rope || rope->type == JSON_NULL) rope = nested ? nested_compress : params;
    if (nested) {
        const Json *kind = json_get(nested_main, "rope_type");
        if (kind && (kind->type != JSON_STRING || strcmp(kind->string, "default")))
            fatal("%s: rope_parameters.main must be the default rope", path);
        c->rope_theta = config_float(nested_main, path, "rope_theta", c->rope_theta);
        c->compress_rope_theta = config_float(nested_compress, path, "rope_theta", c->compress_rope_theta);
        const Json *sides[2] = {nested_main, nested_compress};
        for (int i = 0; i < 2; i++) {   /* transformers reads the rope dims of each side from it */
            const Json *f = json_get(sides[i], "partial_rotary_factor");
            if (!f || f->type != JSON_NUMBER || (int)(c->head_dim * f->number) != c->rope_dim)
                fatal("%s: rope_parameters.%s needs partial_rotary_factor %g (rope dims %d of head_dim %d)", path,
                      i ? "compress" : "main", (double)c->rope_dim / c->head_dim, c->rope_dim, c->head_dim);
        }
    }
    c->rope_scale = 1.0f;
    if (rope && rope->type == JSON_OBJECT) {
        const Json *kind = json_get(rope, "rope_type");
        if (!kind) kind = json_get(rope, "type");
        if (kind && (kind->type != JSON_STRING || (strcmp(kind->string, "yarn") && strcmp(kind->string, "default"))))
            fatal("%s: rope type %s is not supported (only yarn and default)", path,
                  kind->type == JSON_STRING ? kind->string : "(not a string)");
        c->yarn = kind && !strcmp(kind->string, "yarn");
        if (c->yarn) {
            c->yarn_original_max = config_float(rope, path, "original_max_position_embeddings", 0);
            if (c->yarn_original_max <= 0) fatal("%s: YaRN needs original_max_position_embeddings", path);
            c->yarn_factor = config_float(rope, path, "factor",
                                          config_float(root, path, "max_position_embeddings", 1048576) / c->yarn_original_max);
            c->yarn_beta_fast = config_float(rope, path, "beta_fast", 32);
            c->yarn_beta_slow = config_float(rope, path, "beta_slow", 1);
            if (c->yarn_factor <= 0 || c->yarn_beta_fast <= 0 || c->yarn_beta_slow <= 0)
                fatal("%s: YaRN factor, beta_fast and beta_slow must be positive", path);
            float mscale = c->yarn_factor <= 1 ? 1.0f : 0.1f * logf(c->yarn_factor) + 1.0f;
            if (json_get(rope, "mscale") || json_get(rope, "mscale_all_dim"))
                fatal("%s: YaRN mscale / mscale_all_dim are not supported", path);
            c->rope_scale = config_float(rope, path, "attention_factor", nested ? mscale : 1.0);
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
    if (csa_rate < 1 || hca_rate < 1 || csa_rate > 1024 || hca_rate > 1024)
        fatal("%s: compression rates must be between 1 and 1024", path);
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
        if (ratios->length != (size_t)c->n_layers && ratios->length != (size_t)c->n_layers + (size_t)mtp)
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

/* Layers that pick their experts by token id (tid2eid) instead of by router scores. */
static int is_hash_layer(const Config *c, int l) { return l < c->n_hash_layers; }

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
    free(index_path);
    for (size_t i = 0; i < m->n_tensors; i++) m->weight_bytes += m->tensors[i].nbytes;
}

/* Bind a compressor (prefix.wkv, .wgate, .ape, .norm) of coff*dim channels and `ratio` tokens
   per entry. */
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
    int64_t E = c->hidden_size, mix = (2 + HC) * HC;
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
        if (is_hash_layer(c, l)) {
            const Tensor *t = find_tensor(m, "layers.%d.ffn.gate.tid2eid", l);
            if (!t) fatal("tensor layers.%d.ffn.gate.tid2eid is missing (layer %d is hash-routed)", l, l);
            static const DType ints[] = {DT_I64};
            expect_dtype(m, t, 1, ints);
            expect_shape(m, t, 2, (int64_t[]){c->vocab_size, c->topk});
            for (size_t i = 0; i < (size_t)c->vocab_size * c->topk; i++) {
                int64_t id = load_i64(t->data, i);
                if (id < 0 || id >= c->n_experts)
                    fatal("%s: tensor %s holds expert id %lld, outside 0..%d", m->files[t->file].path, t->name,
                          (long long)id, c->n_experts - 1);
            }
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

/* Unmap the checkpoint and free everything load_model allocated. */
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

/* Rotate the interleaved pairs (x[2i], x[2i+1]) of x[R] by angle sign * pos * inv_freq[i]
   (cos and sin both scaled by r->scale, YaRN's attention factor, 1 for V4). */
static void rope(float *x, int R, int pos, const Rope *r, float sign) {
    for (int i = 0; i < R / 2; i++) {
        float angle = (float)pos * r->inv_freq[i];
        float cs = cosf(angle) * r->scale, sn = sign * sinf(angle) * r->scale;
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cs - b * sn;
        x[2 * i + 1] = b * cs + a * sn;
    }
}

/* 1 / (1 + e^-x) */
static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* The mHC mixing logits of one token: mix[rows] = (fn [rows, HC*E] . h) / rms(h), the streams
   h[HC, E] flattened and RMS-normalized (no weight). */
static void hc_mix(const Config *c, const float *h, const Tensor *fn, int rows, float *mix) {
    int n = HC * c->hidden_size;
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)h[i] * h[i];
    double inv_rms = 1.0 / sqrt(ss / n + c->rms_eps);
    for (int k = 0; k < rows; k++) {
        double acc = 0;
        for (int i = 0; i < n; i++) acc += (double)tensor_float(fn, (size_t)k * n + i) * h[i];
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

/* mHC input side for one token. h[HC, E] are the residual streams; fn [24, HC*E], base [24],
   scale [3]. Writes x[E] = sum_i pre[i] h[i], post[HC] and the Sinkhorn-projected comb[HC, HC]
   (comb[i][j] = how much of stream i flows into stream j). */
static void hc_pre(const Config *c, const float *h, const Tensor *fn, const Tensor *base, const Tensor *scale,
                   float *x, float *post, float *comb) {
    float mix[(2 + HC) * HC], pre[HC];
    hc_mix(c, h, fn, (2 + HC) * HC, mix);
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
    float mix[HC], pre[HC];
    hc_mix(c, h, &m->hc_head_fn, HC, mix);
    for (int k = 0; k < HC; k++)
        pre[k] = sigmoid(mix[k] * tensor_float(&m->hc_head_scale, 0) + tensor_float(&m->hc_head_base, k)) + c->hc_eps;
    hc_collapse(c, h, pre, x);
}

/* Feed the compressor projections kv[T, coff*d] and gate[T, coff*d] of positions pos0.. into
   compressor state s; every time a window of `ratio` tokens closes, emit one entry:
   per channel, softmax over the window's slots of (gate + ape[slot]) weights the kv values;
   CSA (coff 2) windows also span the previous window's first-half channels (the overlap);
   then RMSNorm and the compress RoPE at the window's first position. */
static void compressor_feed(const Config *c, const Compressor *w, CompressorState *s, int coff, int d, int ratio,
                            const float *kv, const float *gate, int T, int pos0, const Rope *rope_compress, float *entry) {
    int width = coff * d;
    for (int t = 0; t < T; t++) {
        int pos = pos0 + t, slot = pos % ratio;
        memcpy(s->pending_kv + (size_t)slot * width, kv + (size_t)t * width, width * sizeof(float));
        memcpy(s->pending_gate + (size_t)slot * width, gate + (size_t)t * width, width * sizeof(float));
        if (slot != ratio - 1) continue;
        int own = coff == 2 ? d : 0;   /* channel offset of this window's share of the entry */
        for (int j = 0; j < d; j++) {
            /* the slots of channel j: (CSA, after the first window) the previous window's
               first-half channel, then this window's own channel */
            double slot_gate[2 * ratio], slot_kv[2 * ratio], mx = -INFINITY, sum = 0, acc = 0;
            int n = 0;
            for (int k = 0; coff == 2 && s->have_prev && k < ratio; k++, n++) {
                slot_gate[n] = s->prev_gate[(size_t)k * d + j];
                slot_kv[n] = s->prev_kv[(size_t)k * d + j];
            }
            for (int k = 0; k < ratio; k++, n++) {
                size_t at = (size_t)k * width + own + j;
                slot_gate[n] = s->pending_gate[at] + tensor_float(&w->ape, at);
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
        rope(out + d - c->rope_dim, c->rope_dim, s->n_entries * ratio, rope_compress, 1);
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

/* Key (= value) number k of a query: the first n_window are the sliding window, positions
   first.. (from this chunk, which starts at pos0, or from the ring buffer of W), the rest are
   the compressed entries in s->selected. */
static const float *attention_key(const State *s, const LayerState *ls, int k, int first, int n_window, int pos0, int D,
                                  int W) {
    if (k >= n_window) return ls->comp.entries + (size_t)s->selected[k - n_window] * D;
    int pos = first + k;
    return pos >= pos0 ? s->kv + (size_t)(pos - pos0) * D : ls->window + (size_t)(pos % W) * D;
}

/* The compressed entries query t (at pos) of layer l attends to, into s->selected; returns
   how many. Only entries c < (pos + 1) / ratio are visible (their window has closed). HCA:
   all of them. CSA: the lightning indexer's top index_topk by
   score[c] = sum_h relu(qI[t,h] . kI[c]) / sqrt(DI) * w[t,h] / sqrt(NI). */
static int select_entries(const Config *c, State *s, const LayerState *ls, int l, int t, int pos) {
    int ratio = c->compress_ratio[l], visible = ratio ? (pos + 1) / ratio : 0;
    if (c->attn_kind[l] == ATTN_HCA) {
        for (int e = 0; e < visible; e++) s->selected[e] = e;
        return visible;
    }
    if (c->attn_kind[l] != ATTN_CSA) return 0;
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
    int n = visible < c->index_topk ? visible : c->index_topk;
    top_k(s->scores, visible, n, s->selected);
    return n;
}

/* One head of one query: o[D] = softmax(q . keys / sqrt(D), with the sink) . keys, where the
   keys are the n_window sliding-window entries from position `first` and then the n_selected
   compressed entries; then the inverse RoPE at pos on o's rope dims. */
static void attend(const Config *c, State *s, const LayerState *ls, const float *q, float sink, int first, int n_window,
                   int n_selected, int pos0, int pos, const Rope *rope_l, float *o) {
    int D = c->head_dim, R = c->rope_dim, W = c->sliding_window, n = n_window + n_selected;
    float mx = sink;
    for (int k = 0; k < n; k++) {
        const float *key = attention_key(s, ls, k, first, n_window, pos0, D, W);
        double dot = 0;
        for (int i = 0; i < D; i++) dot += (double)q[i] * key[i];
        s->scores[k] = (float)(dot / sqrt((double)D));
        mx = fmaxf(mx, s->scores[k]);
    }
    double denom = exp((double)sink - mx);   /* the sink takes probability, gives no value */
    for (int i = 0; i < D; i++) s->values[i] = 0;
    for (int k = 0; k < n; k++) {
        const float *value = attention_key(s, ls, k, first, n_window, pos0, D, W);   /* K = V */
        double p = expf(s->scores[k] - mx);
        denom += p;
        for (int i = 0; i < D; i++) s->values[i] += p * value[i];
    }
    for (int i = 0; i < D; i++) o[i] = (float)(s->values[i] / denom);
    rope(o + D - R, R, pos, rope_l, -1);   /* undo the values' rotation: relative positions */
}

/* Attention sub-block of layer l for the chunk: x[T, E] (normed) -> s->block_out[T, E]. */
static void attention(const Model *m, State *s, int l, int T, int pos0) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    LayerState *ls = &s->layers[l];
    int H = c->n_heads, D = c->head_dim, R = c->rope_dim, W = c->sliding_window, Q = c->q_lora_rank;
    int ratio = c->compress_ratio[l];
    const Rope *rope_l = c->attn_kind[l] == ATTN_SLIDING ? &s->rope_main : &s->rope_compress;
    float *row = s->weight_row;

    /* queries: low-rank path, per-head RMS, RoPE; the shared K=V latent */
    linear(&L->wq_a, s->x, s->qr, T, row);
    for (int t = 0; t < T; t++) rmsnorm(s->qr + (size_t)t * Q, s->qr + (size_t)t * Q, &L->q_norm, Q, c->rms_eps);
    linear(&L->wq_b, s->qr, s->q, T, row);
    linear(&L->wkv, s->x, s->kv, T, row);
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) {
            float *q = s->q + ((size_t)t * H + h) * D;
            rmsnorm(q, q, NULL, D, c->rms_eps);
            rope(q + D - R, R, pos0 + t, rope_l, 1);
        }
        float *kv = s->kv + (size_t)t * D;
        rmsnorm(kv, kv, &L->kv_norm, D, c->rms_eps);
        rope(kv + D - R, R, pos0 + t, rope_l, 1);
    }

    /* compressed entries (CSA / HCA) and, for CSA, the indexer's keys, queries and weights */
    if (ratio) {
        int coff = c->attn_kind[l] == ATTN_CSA ? 2 : 1;
        linear(&L->compressor.wkv, s->x, s->comp_kv, T, row);
        linear(&L->compressor.wgate, s->x, s->comp_gate, T, row);
        compressor_feed(c, &L->compressor, &ls->comp, coff, D, ratio, s->comp_kv, s->comp_gate, T, pos0, &s->rope_compress, s->entry);
    }
    if (c->attn_kind[l] == ATTN_CSA) {
        int NI = c->index_heads, DI = c->index_dim;
        linear(&L->index_compressor.wkv, s->x, s->comp_kv, T, row);
        linear(&L->index_compressor.wgate, s->x, s->comp_gate, T, row);
        compressor_feed(c, &L->index_compressor, &ls->index_comp, 2, DI, ratio, s->comp_kv, s->comp_gate, T, pos0, &s->rope_compress, s->entry);
        linear(&L->index_wq_b, s->qr, s->index_q, T, row);
        linear(&L->index_weights_proj, s->x, s->index_w, T, row);
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NI; h++) rope(s->index_q + ((size_t)t * NI + h) * DI + DI - R, R, pos0 + t, &s->rope_compress, 1);
    }

    /* each query: the sliding window of the last W positions plus its compressed entries */
    for (int t = 0; t < T; t++) {
        int pos = pos0 + t, first = pos - W + 1 > 0 ? pos - W + 1 : 0;
        int n_selected = select_entries(c, s, ls, l, t, pos);
        for (int h = 0; h < H; h++)
            attend(c, s, ls, s->q + ((size_t)t * H + h) * D, tensor_float(&L->attn_sink, h), first, pos - first + 1,
                   n_selected, pos0, pos, rope_l, s->attn + ((size_t)t * H + h) * D);
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
        float *score = s->router, *biased = s->router + X;
        int *chosen = s->chosen;
        linear(&L->gate, x, score, 1, s->weight_row);
        for (int e = 0; e < X; e++) {
            float z = score[e];
            score[e] = sqrtf(z > 20 ? z : log1pf(expf(z)));
            biased[e] = is_hash_layer(c, l) ? score[e] : score[e] + tensor_float(&L->gate_bias, e);
        }
        if (is_hash_layer(c, l))
            for (int k = 0; k < K; k++) chosen[k] = (int)load_i64(L->tid2eid.data, (size_t)tokens[t] * K + k);
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
    int E = c->hidden_size, pos0 = s->pos;
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
   overlap, the compressed entries (C / ratio per compressor) and the scratch of one chunk.
   plan_state lists every buffer once; it either only adds up their sizes (so a state that
   cannot fit is refused before anything is allocated) or allocates them. */

typedef struct {
    size_t total;   /* bytes so far; SIZE_MAX once the sizes overflow */
    int allocate;   /* 0: count only */
} StatePlan;

/* Count `count` items of `size` bytes into the plan; returns them zeroed when allocating,
   else NULL. */
static void *reserve(StatePlan *p, size_t count, size_t size) {
    if (size && count > (SIZE_MAX - p->total) / size) p->total = SIZE_MAX;
    else p->total += count * size;
    return p->allocate ? xcalloc(count, size) : NULL;
}

/* The state of one compressor of width coff*d with `ratio` tokens per entry. */
static void plan_compressor(StatePlan *p, CompressorState *s, int coff, int d, int ratio, int C) {
    s->pending_kv = reserve(p, (size_t)ratio * coff * d, sizeof(float));
    s->pending_gate = reserve(p, (size_t)ratio * coff * d, sizeof(float));
    if (coff == 2) {
        s->prev_kv = reserve(p, (size_t)ratio * d, sizeof(float));
        s->prev_gate = reserve(p, (size_t)ratio * d, sizeof(float));
    }
    s->entries = reserve(p, ((size_t)C / ratio + 1) * d, sizeof(float));
}

/* Free what plan_compressor allocated. */
static void free_compressor_state(CompressorState *s) {
    free(s->pending_kv);
    free(s->pending_gate);
    free(s->prev_kv);
    free(s->prev_gate);
    free(s->entries);
}

/* Lay out the state for chunks of up to T tokens and a context of C tokens; allocate it into
   s when `allocate`. Returns its size in bytes (SIZE_MAX when that overflows). */
static size_t plan_state(State *s, const Config *c, int T, int C, int allocate) {
    StatePlan p = {0, allocate};
    memset(s, 0, sizeof *s);
    s->max_tokens = T;
    s->max_ctx = C;
    size_t E = c->hidden_size, H = c->n_heads, D = c->head_dim, DI = c->index_dim, NI = c->index_heads;
    size_t wide = 2 * (D > DI ? D : DI), W = c->sliding_window, n = (size_t)T, G_O = (size_t)c->o_groups * c->o_lora_rank;
    s->layers = reserve(&p, (size_t)c->n_layers, sizeof(LayerState));
    for (int l = 0; l < c->n_layers; l++) {
        LayerState unused = {0}, *ls = allocate ? &s->layers[l] : &unused;
        ls->window = reserve(&p, W * D, sizeof(float));
        int ratio = c->compress_ratio[l];
        if (ratio) plan_compressor(&p, &ls->comp, c->attn_kind[l] == ATTN_CSA ? 2 : 1, (int)D, ratio, C);
        if (c->attn_kind[l] == ATTN_CSA) plan_compressor(&p, &ls->index_comp, 2, (int)DI, ratio, C);
    }
    size_t max_cols = E;   /* the widest input of any linear layer */
    size_t cols[] = {(size_t)c->q_lora_rank, H * D / c->o_groups, G_O, (size_t)c->moe_inter};
    for (int i = 0; i < 4; i++) max_cols = cols[i] > max_cols ? cols[i] : max_cols;
    s->h = reserve(&p, n * HC * E, sizeof(float));
    s->x = reserve(&p, n * E, sizeof(float));
    s->post = reserve(&p, n * HC, sizeof(float));
    s->comb = reserve(&p, n * HC * HC, sizeof(float));
    s->block_out = reserve(&p, n * E, sizeof(float));
    s->qr = reserve(&p, n * c->q_lora_rank, sizeof(float));
    s->q = reserve(&p, n * H * D, sizeof(float));
    s->kv = reserve(&p, n * D, sizeof(float));
    s->attn = reserve(&p, n * H * D, sizeof(float));
    s->grouped = reserve(&p, n * G_O, sizeof(float));
    s->comp_kv = reserve(&p, n * wide, sizeof(float));
    s->comp_gate = reserve(&p, n * wide, sizeof(float));
    s->index_q = reserve(&p, n * NI * DI, sizeof(float));
    s->index_w = reserve(&p, n * NI, sizeof(float));
    s->logits = reserve(&p, n * c->vocab_size, sizeof(float));
    s->scores = reserve(&p, W + (size_t)C + 1, sizeof(float));
    s->selected = reserve(&p, (size_t)C + 1, sizeof(int));
    s->values = reserve(&p, D, sizeof(double));
    s->entry = reserve(&p, wide, sizeof(float));
    s->weight_row = reserve(&p, max_cols, sizeof(float));
    s->router = reserve(&p, 2 * (size_t)c->n_experts, sizeof(float));
    s->chosen = reserve(&p, (size_t)c->topk, sizeof(int));
    s->expert_gate = reserve(&p, (size_t)c->moe_inter, sizeof(float));
    s->expert_up = reserve(&p, (size_t)c->moe_inter, sizeof(float));
    s->expert_out = reserve(&p, E, sizeof(float));
    s->rope_main = (Rope){reserve(&p, (size_t)c->rope_dim / 2, sizeof(float)), 1.0f};
    s->rope_compress = (Rope){reserve(&p, (size_t)c->rope_dim / 2, sizeof(float)), c->rope_scale};
    if (allocate) {
        rope_frequencies(c, 0, s->rope_main.inv_freq);
        rope_frequencies(c, 1, s->rope_compress.inv_freq);
    }
    return p.total;
}

/* Bytes the state for (T, C) takes, or SIZE_MAX; allocates nothing. */
static size_t state_bytes(const Config *c, int T, int C) {
    State unused;
    return plan_state(&unused, c, T, C, 0);
}

static void alloc_state(State *s, const Config *c, int T, int C) { plan_state(s, c, T, C, 1); }

/* Free what alloc_state allocated. */
static void free_state(State *s, const Config *c) {
    for (int l = 0; s->layers && l < c->n_layers; l++) {
        free(s->layers[l].window);
        free_compressor_state(&s->layers[l].comp);
        free_compressor_state(&s->layers[l].index_comp);
    }
    free(s->layers);
    float *buffers[] = {s->h, s->x, s->post, s->comb, s->block_out, s->qr, s->q, s->kv, s->attn, s->grouped,
                        s->comp_kv, s->comp_gate, s->index_q, s->index_w, s->scores, s->entry, s->weight_row,
                        s->router, s->expert_gate, s->expert_up, s->expert_out, s->rope_main.inv_freq, s->rope_compress.inv_freq,
                        s->logits};
    for (size_t i = 0; i < sizeof buffers / sizeof *buffers; i++) free(buffers[i]);
    free(s->values);
    free(s->selected);
    free(s->chosen);
    memset(s, 0, sizeof *s);
}

/* =============================================================================== tokenizer */
/* A byte-level BPE tokenizer that loads a Hugging Face tokenizer.json and reproduces what the
   `tokenizers` library (Rust) encodes for the DeepSeek V3/V4 tokenizer. Its entry points:

     int  tokenizer_load_json(Tokenizer *t, const Json *root, char *err, size_t errlen);
     int  tokenizer_load_file(Tokenizer *t, const char *path, char *err, size_t errlen);
     void tokenizer_free(Tokenizer *t);
     int  tokenizer_encode(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids);
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

/* "Code point" given to each byte of an invalid UTF-8 sequence: beyond Unicode, so of no class. */
#define INVALID_CHAR 0x110000u

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

/* Decodes the character at s[0..n) (n >= 1) into *cp and returns its length in bytes.  A byte
   that does not start a valid, complete, shortest-form UTF-8 sequence of a non-surrogate code
   point is returned alone as INVALID_CHAR with length 1. */
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

/* 64-bit FNV-1a hash of n bytes. */
static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

/* Mixes a 64-bit key into a well-spread hash (the finalizer of MurmurHash3). */
static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb3fe1a85ec53ull;
    return x ^ (x >> 33);
}

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
    for (size_t slot = hash_u64(pair) & t->merge_mask;; slot = (slot + 1) & t->merge_mask) {
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

/* Writes the UTF-8 of code point cp (< 0x800, all ByteLevel characters are) and returns its
   length. */
static size_t put_small_utf8(char *out, uint32_t cp) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
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
        if (vocab_lookup(t, spelling, length) >= 0)
            return tokenizer_error(err, errlen, "model.vocab: token '%.60s' appears twice", spelling);
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
        t->byte_ids[b] = vocab_lookup(t, spelling, put_small_utf8(spelling, t->byte_chars[b]));
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
   vocab), and the sorted match table.  Refuses empty contents and the lstrip, rstrip and
   single_word options.  Returns 0, or -1 with a message. */
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
    char message[256];
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
        for (size_t i = 0; i < n; i++) length += put_small_utf8(e->spelling + length, t->byte_chars[s[i]]);
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

/* Encodes n bytes of text (any bytes; no BOS is added).  Writes up to max_ids ids and returns
   how many the text needs, which may exceed max_ids (call again with a bigger array); ids may
   be NULL when max_ids is 0.  Returns -1 if the text is longer than INT_MAX bytes or memory
   runs out. */
static int tokenizer_encode(const Tokenizer *t, const char *text, size_t n, int *ids, int max_ids) {
    if (n > INT32_MAX) return -1;
    Encoder e = { 0 };
    e.t = t;
    e.ids = ids;
    e.max_ids = max_ids > 0 ? (size_t)max_ids : 0;
    if (n) split_added(&e, 0, (const unsigned char *)text, n);
    free(e.symbol_ids);
    free(e.next);
    free(e.prev);
    free(e.heap);
    free(e.spelling);
    return e.failed ? -1 : (int)e.count;
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

/* ---------- UTF-8 stream ----------
 * Decoded tokens can end in the middle of a character.  A Utf8Stream holds back an incomplete
 * character until its last byte arrives, so output only ever contains whole characters.
 * Bytes that can never become part of a valid character are passed through at once. */


/* Number of bytes of the UTF-8 sequence that valid lead byte `b` starts (0: not a lead byte of
   a multi-byte sequence). */
static int utf8_sequence_length(unsigned char b) {
    if (b >= 0xC2 && b <= 0xDF) return 2;
    if (b >= 0xE0 && b <= 0xEF) return 3;
    if (b >= 0xF0 && b <= 0xF4) return 4;
    return 0;
}

/* Whether byte `b` can follow the `count` pending bytes (lead first) of a valid character.
   The second byte has narrower ranges after E0, ED, F0 and F4 (no overlong forms, surrogates
   or code points beyond U+10FFFF). */
static int utf8_continues(const unsigned char *pending, int count, unsigned char b) {
    if ((b & 0xC0) != 0x80) return 0;
    if (count > 1) return 1;
    switch (pending[0]) {
    case 0xE0: return b >= 0xA0;
    case 0xED: return b <= 0x9F;
    case 0xF0: return b >= 0x90;
    case 0xF4: return b <= 0x8F;
    default: return 1;
    }
}

/* Feeds n bytes into the stream and writes to `out` everything that is now complete: whole
   characters, plus bytes that cannot be part of a valid character.  `out` needs room for
   n + 3 bytes.  Returns the number of bytes written. */
static size_t utf8_stream_push(Utf8Stream *s, const char *bytes, size_t n, char *out) {
    size_t written = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)bytes[i];
        if (s->npending > 0) {
            if (utf8_continues(s->pending, s->npending, b)) {
                s->pending[s->npending++] = b;
                if (s->npending == utf8_sequence_length(s->pending[0])) {
                    memcpy(out + written, s->pending, (size_t)s->npending);
                    written += (size_t)s->npending;
                    s->npending = 0;
                }
                continue;
            }
            /* The held-back bytes will never complete: let them out as they are. */
            memcpy(out + written, s->pending, (size_t)s->npending);
            written += (size_t)s->npending;
            s->npending = 0;
        }
        if (utf8_sequence_length(b)) s->pending[s->npending++] = b;
        else out[written++] = (char)b;
    }
    return written;
}

/* Writes the held-back bytes of an unfinished character (at most 3) to `out` and empties the
   stream.  Returns the number of bytes written. */
static size_t utf8_stream_flush(Utf8Stream *s, char *out) {
    size_t written = (size_t)s->npending;
    memcpy(out, s->pending, written);
    s->npending = 0;
    return written;
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
    if (n == 0) return argmax(logits, V);   /* a flat distribution under a tiny top_p */
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

/* ========================================================================= GPU: driver API */
/* The GPU path drives hand-written PTX kernels (kernels.ptx) through the CUDA driver API.
   libcuda.so.1 is opened with dlopen at run time, so the same binary starts, and runs the CPU
   path, where no driver or no GPU exists. `make` assembles kernels.ptx with ptxas for sm_90a
   and embeds the cubin (build/kernels_cubin.h, compiled in with -DNVFP4_GPU); a binary built
   where ptxas was missing has no kernels and says so. One context, one non-default stream;
   every driver call goes through CU_CHECK, which names the call, file:line and the driver's
   error. The types below are the driver's (cuda.h of CUDA 13.0), declared here so that the
   build needs no CUDA headers. Until the command line wires --gpu (issue 7), only test.c calls
   these functions: the pragma keeps -Wall quiet about that. */
#include <dlfcn.h>
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

typedef int CUresult;                        /* 0 = CUDA_SUCCESS */
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;      /* a device address */
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;

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
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
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
    CUresult (*cuCtxCreate)(CUcontext *ctx, unsigned flags, CUdevice device);
    CUresult (*cuCtxDestroy)(CUcontext ctx);
    CUresult (*cuStreamCreate)(CUstream *stream, unsigned flags);
    CUresult (*cuStreamDestroy)(CUstream stream);
    CUresult (*cuStreamSynchronize)(CUstream stream);
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
    CUresult (*cuMemsetD8Async)(CUdeviceptr dst, unsigned char value, size_t count, CUstream stream);
    CUresult (*cuLaunchKernel)(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, CUstream stream, void **params, void **extra);
    CUresult (*cuEventCreate)(CUevent *event, unsigned flags);
    CUresult (*cuEventDestroy)(CUevent event);
    CUresult (*cuEventRecord)(CUevent event, CUstream stream);
    CUresult (*cuEventSynchronize)(CUevent event);
    CUresult (*cuEventElapsedTime)(float *ms, CUevent start, CUevent end);
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
    CU_SYMBOL(cuCtxCreate, "cuCtxCreate_v2"),   /* cuda.h 13 maps cuCtxCreate to _v4 (extra params struct); _v2 is the plain one */
    CU_SYMBOL(cuCtxDestroy, "cuCtxDestroy_v2"),
    CU_SYMBOL(cuStreamCreate, "cuStreamCreate"),
    CU_SYMBOL(cuStreamDestroy, "cuStreamDestroy_v2"),
    CU_SYMBOL(cuStreamSynchronize, "cuStreamSynchronize"),
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
    CU_SYMBOL(cuMemsetD8Async, "cuMemsetD8Async"),
    CU_SYMBOL(cuLaunchKernel, "cuLaunchKernel"),
    CU_SYMBOL(cuEventCreate, "cuEventCreate"),
    CU_SYMBOL(cuEventDestroy, "cuEventDestroy_v2"),
    CU_SYMBOL(cuEventRecord, "cuEventRecord"),
    CU_SYMBOL(cuEventSynchronize, "cuEventSynchronize"),
    CU_SYMBOL(cuEventElapsedTime, "cuEventElapsedTime_v2"),
#undef CU_SYMBOL
};

/* The kernels of kernels.ptx, by the name of their .entry. */
typedef enum { K_STREAM_READ, K_GEMV_BF16, K_GEMV_FP8, K_GEMV_MXFP4, K_GEMV_NVFP4, K_COUNT } Kernel;
static const char *const kernel_names[K_COUNT] = {"stream_read", "gemv_bf16", "gemv_fp8", "gemv_mxfp4", "gemv_nvfp4"};

#define GPU_CHUNK 512                       /* bytes of a row one warp reads per 16-byte load */
#define GPU_MAX_CHUNKS 16                   /* chunks per row = warps sharing a row (registers: 512 threads) */

/* Dynamic shared memory of a GEMV: x of one padded row, 4 bytes a column. */
static unsigned gpu_gemv_smem(WeightFormat format, unsigned row_bytes) {
    return row_bytes * (format == FMT_BF16 ? 2 : format == FMT_FP8 ? 4 : 8);
}

/* The one GPU nvfp4 uses (device 0) once gpu_open succeeded. */
static struct {
    void *lib;                   /* dlopen handle of libcuda.so.1 */
    CUdevice device;
    CUcontext ctx;
    CUstream stream;             /* every launch and copy goes here */
    CUmodule module;             /* the embedded cubin */
    CUfunction kernels[K_COUNT];
    int sm_count, driver_version;
    char name[256];
} gpu;

#ifdef NVFP4_GPU
#include "kernels_cubin.h"       /* kernels_cubin[]: build/kernels.cubin as bytes (make writes it) */
#endif

/* Stop with the failing call's text, its place and the driver's name for the error. */
#define CU_CHECK(call) cu_check((call), #call, __FILE__, __LINE__)
static void cu_check(CUresult r, const char *call, const char *file, int line) {
    if (r == 0) return;
    const char *name = NULL;
    if (!cu.cuGetErrorName || cu.cuGetErrorName(r, &name) || !name) name = "unknown error";
    fatal("%s:%d: %s failed: %s (%d)", file, line, call, name, r);
}

/* Release the GPU and the driver (harmless when gpu_open failed or never ran). */
static void gpu_close(void) {
    if (gpu.module) CU_CHECK(cu.cuModuleUnload(gpu.module));
    if (gpu.stream) CU_CHECK(cu.cuStreamDestroy(gpu.stream));
    if (gpu.ctx) CU_CHECK(cu.cuCtxDestroy(gpu.ctx));
    if (gpu.lib) dlclose(gpu.lib);
    memset(&gpu, 0, sizeof gpu);
    memset(&cu, 0, sizeof cu);
}

/* Open the driver, GPU 0, a context, a stream and the kernels. Returns 1 when the GPU path is
   usable; otherwise 0 with a one-line reason in why[n] (no kernels in this build, no driver,
   no GPU, a GPU that is not sm_90, a cubin the driver rejects), everything released. */
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
    gpu.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!gpu.lib) GPU_FAIL("no NVIDIA driver (%s)", dlerror());
    for (size_t i = 0; i < sizeof cu_symbols / sizeof *cu_symbols; i++) {
        void *f = dlsym(gpu.lib, cu_symbols[i].symbol);
        if (!f) GPU_FAIL("the NVIDIA driver is too old: libcuda.so.1 has no %s", cu_symbols[i].symbol);
        memcpy((char *)&cu + cu_symbols[i].offset, &f, sizeof f);
    }
    if ((r = cu.cuInit(0))) GPU_FAIL("no usable GPU (cuInit: %s)", ERROR_NAME(r));
    int count = 0, major = 0, minor = 0;
    if ((r = cu.cuDeviceGetCount(&count)) || count == 0) GPU_FAIL("no GPU found");
    CU_CHECK(cu.cuDeviceGet(&gpu.device, 0));
    CU_CHECK(cu.cuDeviceGetName(gpu.name, sizeof gpu.name, gpu.device));
    CU_CHECK(cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, gpu.device));
    CU_CHECK(cu.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, gpu.device));
    CU_CHECK(cu.cuDeviceGetAttribute(&gpu.sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, gpu.device));
    CU_CHECK(cu.cuDriverGetVersion(&gpu.driver_version));
    if (major != 9 || minor != 0)
        GPU_FAIL("GPU 0 is %s (sm_%d%d); the kernels are built for sm_90 (Hopper: H100, H200)", gpu.name, major, minor);
    if ((r = cu.cuCtxCreate(&gpu.ctx, 0, gpu.device))) GPU_FAIL("cannot create a context on %s: %s", gpu.name, ERROR_NAME(r));
    CU_CHECK(cu.cuStreamCreate(&gpu.stream, CU_STREAM_NON_BLOCKING));
    char info[4096] = "", error[4096] = "";
    int options[] = {CU_JIT_INFO_LOG_BUFFER, CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES, CU_JIT_ERROR_LOG_BUFFER,
                     CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void *values[] = {info, (void *)(uintptr_t)sizeof info, error, (void *)(uintptr_t)sizeof error};
    if ((r = cu.cuModuleLoadDataEx(&gpu.module, kernels_cubin, 4, options, values)))
        GPU_FAIL("the driver rejects the embedded kernels: %s %s%s", ERROR_NAME(r), error, info);
    for (int k = 0; k < K_COUNT; k++) {
        CU_CHECK(cu.cuModuleGetFunction(&gpu.kernels[k], gpu.module, kernel_names[k]));
        WeightFormat f = k == K_GEMV_BF16 ? FMT_BF16 : k == K_GEMV_FP8 ? FMT_FP8 : FMT_NVFP4;
        if (k != K_STREAM_READ)   /* room for x of the widest row a GEMV takes */
            CU_CHECK(cu.cuFuncSetAttribute(gpu.kernels[k], CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           (int)gpu_gemv_smem(f, GPU_MAX_CHUNKS * GPU_CHUNK)));
    }
    return 1;
#undef GPU_FAIL
#undef ERROR_NAME
#endif
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

/* Copies on the stream, waited for: after return the host buffer may be reused or read. */
static void gpu_upload(CUdeviceptr dst, const void *src, size_t bytes) {
    CU_CHECK(cu.cuMemcpyHtoDAsync(dst, src, bytes, gpu.stream));
    CU_CHECK(cu.cuStreamSynchronize(gpu.stream));
}

/* The reverse copy, device to host. */
static void gpu_download(void *dst, CUdeviceptr src, size_t bytes) {
    CU_CHECK(cu.cuMemcpyDtoHAsync(dst, src, bytes, gpu.stream));
    CU_CHECK(cu.cuStreamSynchronize(gpu.stream));
}

/* Launch kernel k on the stream: grid x block threads, smem bytes of dynamic shared memory. */
static void gpu_launch(Kernel k, unsigned grid, unsigned block, unsigned smem, void **params) {
    CU_CHECK(cu.cuLaunchKernel(gpu.kernels[k], grid, 1, 1, block, 1, 1, smem, gpu.stream, params, NULL));
}

/* Blocks of `block` threads (and smem bytes of dynamic shared memory) of kernel k that fit on
   one SM at a time (fatal when none does: too many threads for the kernel's registers). */
static int gpu_blocks_per_sm(Kernel k, int block, unsigned smem) {
    int blocks = 0;
    CU_CHECK(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, gpu.kernels[k], block, smem));
    if (blocks < 1) fatal("kernel %s cannot run blocks of %d threads on %s", kernel_names[k], block, gpu.name);
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
   A row may have at most 16 chunks of 512 bytes (its 16 warps, 128 registers each, fill an
   SM's register file): 16384 columns of FP4, 8192 of FP8, 4096 of BF16 (V4-Flash's widest
   rows; V4-Pro's 7168-wide BF16 head and 16384-wide FP8 wo_b would need two chunks a warp). */

#define GPU_STAGING ((size_t)64 << 20)      /* host bytes staged per upload piece */

/* A linear layer on the GPU, uploaded by gpu_upload_linear. */
typedef struct {
    WeightFormat format;
    int rows, cols;
    unsigned row_bytes;      /* padded bytes of one weight row: a multiple of GPU_CHUNK */
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

/* Device bytes gpu_upload_linear will allocate for W (for the footprint check). */
static size_t gpu_linear_footprint(const Linear *w) {
    size_t row_bytes = (linear_row_bytes(w) + GPU_CHUNK - 1) / GPU_CHUNK * GPU_CHUNK, rows = (size_t)w->rows;
    size_t scales = w->format == FMT_NVFP4 ? rows * (row_bytes / 8)
                  : w->format == FMT_MXFP4 ? rows * (row_bytes / 16)
                  : w->format == FMT_FP8 ? (rows + 127) / 128 * (row_bytes / 128) * 4 : 0;
    return rows * row_bytes + scales;
}

/* Copy rows [r0, r0 + n) of a [rows, src_bytes] byte matrix into dst as rows of dst_bytes,
   zero-padded. */
static void pad_rows(uint8_t *dst, size_t dst_bytes, const uint8_t *src, size_t src_bytes, size_t r0, size_t n) {
    for (size_t r = 0; r < n; r++) {
        memcpy(dst + r * dst_bytes, src + (r0 + r) * src_bytes, src_bytes);
        memset(dst + r * dst_bytes + src_bytes, 0, dst_bytes - src_bytes);
    }
}

/* Upload the byte matrix src [rows, src_bytes] to a new device buffer of rows padded to
   dst_bytes, through `staging` (GPU_STAGING bytes): the whole tensor is never copied on the host. */
static CUdeviceptr upload_padded(const void *src, size_t rows, size_t src_bytes, size_t dst_bytes, uint8_t *staging) {
    CUdeviceptr d = gpu_alloc(rows * dst_bytes);
    size_t per_piece = GPU_STAGING / dst_bytes ? GPU_STAGING / dst_bytes : 1;
    for (size_t r0 = 0; r0 < rows; r0 += per_piece) {
        size_t n = rows - r0 < per_piece ? rows - r0 : per_piece;
        pad_rows(staging, dst_bytes, src, src_bytes, r0, n);
        gpu_upload(d + r0 * dst_bytes, staging, n * dst_bytes);
    }
    return d;
}

/* Upload W in the kernels' layout and choose its launch shape. Fatal when the GPU has no
   kernel for W's format, W is too wide for one (the message names the limit) or W does not
   fit in the GPU's free memory ("needs X GiB, the GPU has Y GiB free"). */
static void gpu_upload_linear(GpuLinear *g, const Linear *w) {
    static const Kernel kernel_of[] = {[FMT_BF16] = K_GEMV_BF16, [FMT_FP8] = K_GEMV_FP8, [FMT_MXFP4] = K_GEMV_MXFP4,
                                       [FMT_NVFP4] = K_GEMV_NVFP4};
    if (w->format == FMT_F32) fatal("the GPU kernels have no F32 linear layer (%d x %d)", w->rows, w->cols);
    size_t src_bytes = linear_row_bytes(w), rows = (size_t)w->rows;
    size_t row_bytes = (src_bytes + GPU_CHUNK - 1) / GPU_CHUNK * GPU_CHUNK;
    if (row_bytes / GPU_CHUNK > GPU_MAX_CHUNKS)
        fatal("a %d x %d linear layer is too wide for the GPU kernels (at most %d bytes a row)", w->rows, w->cols,
              GPU_MAX_CHUNKS * GPU_CHUNK);
    char why[256];
    if (!gpu_fits(gpu_linear_footprint(w), why, sizeof why)) fatal("a %d x %d linear layer %s", w->rows, w->cols, why);
    memset(g, 0, sizeof *g);
    g->format = w->format;
    g->rows = w->rows;
    g->cols = w->cols;
    g->row_bytes = (unsigned)row_bytes;
    g->bytes = rows * src_bytes + linear_scale_bytes(w);
    uint8_t *staging = xcalloc(GPU_STAGING, 1);
    g->weight = upload_padded(w->weight, rows, src_bytes, row_bytes, staging);
    if (w->format == FMT_NVFP4 || w->format == FMT_MXFP4) {
        int group = w->format == FMT_NVFP4 ? 16 : 32;   /* columns per scale; 8 or 16 code bytes */
        g->scale = upload_padded(w->scale, rows, (size_t)w->cols / group, row_bytes * 2 / group, staging);
        g->gscale62 = ldexpf(w->global_scale, 62);
    } else if (w->format == FMT_FP8) {   /* small: [ceil(rows/128), ceil(cols/128)] -> f32 * 2^56 */
        size_t brows = (rows + 127) / 128, bcols = ((size_t)w->cols + 127) / 128, dcols = row_bytes / 128;
        float *s = xcalloc(brows * dcols, sizeof(float));
        for (size_t i = 0; i < brows; i++)
            for (size_t j = 0; j < bcols; j++) {
                float v = w->scale_is_f32 ? load_f32(w->scale, i * bcols + j)
                                          : e8m0_to_float(((const uint8_t *)w->scale)[i * bcols + j]);
                s[i * dcols + j] = ldexpf(v, 56);
            }
        g->scale = gpu_alloc(brows * dcols * sizeof(float));
        gpu_upload(g->scale, s, brows * dcols * sizeof(float));
        free(s);
    }
    free(staging);
    Kernel k = kernel_of[w->format];
    unsigned ksplit = g->row_bytes / GPU_CHUNK, nrg = ksplit >= 16 ? 1 : 16 / ksplit;   /* ~16 warps a block */
    unsigned row_blocks = (unsigned)((rows + 4 * nrg - 1) / (4 * nrg));
    g->block = 32 * ksplit * nrg;
    g->grid = (unsigned)(gpu.sm_count * gpu_blocks_per_sm(k, (int)g->block, gpu_gemv_smem(g->format, g->row_bytes)));
    if (g->grid > row_blocks) g->grid = row_blocks;
}

/* Free what gpu_upload_linear allocated. */
static void gpu_free_linear(GpuLinear *g) {
    gpu_free(g->weight);
    gpu_free(g->scale);
    memset(g, 0, sizeof *g);
}

/* y[rows] = W x[cols] on the stream (x, y: device float arrays). Mirrors linear() for T = 1. */
static void gpu_gemv(const GpuLinear *g, CUdeviceptr x, CUdeviceptr y) {
    static const Kernel kernel_of[] = {[FMT_BF16] = K_GEMV_BF16, [FMT_FP8] = K_GEMV_FP8, [FMT_MXFP4] = K_GEMV_MXFP4,
                                       [FMT_NVFP4] = K_GEMV_NVFP4};
    unsigned rows = (unsigned)g->rows, cols = (unsigned)g->cols, row_bytes = g->row_bytes, ksplit = row_bytes / GPU_CHUNK;
    CUdeviceptr w = g->weight, s = g->scale;
    float gscale62 = g->gscale62;
    void *params[] = {&w, &s, &x, &y, &rows, &cols, &row_bytes, &ksplit, &gscale62};
    gpu_launch(kernel_of[g->format], g->grid, g->block, gpu_gemv_smem(g->format, row_bytes), params);
}

/* Launch stream_read over buf[bytes] (bytes a multiple of 16), adding its uint32 sum to *out. */
static void gpu_stream_read(CUdeviceptr buf, size_t bytes, CUdeviceptr out) {
    uint64_t n16 = bytes / 16;
    void *params[] = {&buf, &n16, &out};
    gpu_launch(K_STREAM_READ, (unsigned)(gpu.sm_count * 4), 256, 0, params);
}

/* ---------- benchmark ---------- */

/* Milliseconds of `reps` runs of fn(arg, i) (i = 0..reps-1) on the stream, between two events. */
static float gpu_time(void (*fn)(void *, int), void *arg, int reps) {
    CUevent start, end;
    float ms;
    CU_CHECK(cu.cuEventCreate(&start, CU_EVENT_DEFAULT));
    CU_CHECK(cu.cuEventCreate(&end, CU_EVENT_DEFAULT));
    CU_CHECK(cu.cuEventRecord(start, gpu.stream));
    for (int i = 0; i < reps; i++) fn(arg, i);
    CU_CHECK(cu.cuEventRecord(end, gpu.stream));
    CU_CHECK(cu.cuEventSynchronize(end));
    CU_CHECK(cu.cuEventElapsedTime(&ms, start, end));
    CU_CHECK(cu.cuEventDestroy(start));
    CU_CHECK(cu.cuEventDestroy(end));
    return ms;
}

/* qsort order of floats, ascending. */
static int compare_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
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

/* Call i: the GEMV of weight copy i % n. */
typedef struct { GpuLinear *copies; int n; CUdeviceptr x, y; } GemvRun;
static void gemv_call(void *arg, int i) {
    GemvRun *r = arg;
    gpu_gemv(&r->copies[i % r->n], r->x, r->y);
}

/* stream_read over the codes of the same copies (sum into y[0]): the ceiling at this size. */
static void gemv_stream_call(void *arg, int i) {
    GemvRun *r = arg;
    const GpuLinear *g = &r->copies[i % r->n];
    gpu_stream_read(g->weight, (size_t)g->rows * g->row_bytes, r->y);
}

/* A random linear layer of V4-Flash's kinds, in host memory the caller frees (weight, scale):
   random codes (no NaN encodings), scales in a realistic range. */
static Linear gpu_bench_linear(WeightFormat format, int rows, int cols, int scale_is_f32, uint64_t *rng) {
    Linear w = {format, rows, cols, NULL, NULL, scale_is_f32, 1};
    size_t codes = (size_t)rows * linear_row_bytes(&w), scales = linear_scale_bytes(&w);
    uint8_t *q = xcalloc(codes, 1), *s = xcalloc(scales ? scales : 1, 1);
    for (size_t i = 0; i < codes; i++) {
        uint8_t b = (uint8_t)random_u32(rng);
        if (format == FMT_FP8 && (b & 0x7f) == 0x7f) b ^= 1;          /* not E4M3's NaN */
        if (format == FMT_BF16 && i % 2) b = (uint8_t)(0x3c + b % 8 + (b & 0x80));   /* bf16 high byte: |w| ~ 2^-7..2 */
        q[i] = b;
    }
    for (size_t i = 0; i < scales; i++) {
        uint8_t b = (uint8_t)random_u32(rng);
        s[i] = format == FMT_NVFP4 ? (uint8_t)(0x20 + b % 0x30)   /* e4m3 2^-3 .. 2^3 */
             : format == FMT_MXFP4 ? (uint8_t)(120 + b % 10) : scale_is_f32 ? 0 : (uint8_t)(120 + b % 10);
    }
    if (format == FMT_FP8 && scale_is_f32)
        for (size_t i = 0; i < scales / 4; i++) {
            float v = 0.001f + random_float(rng) * 0.01f;
            memcpy(s + 4 * i, &v, 4);
        }
    w.weight = q;
    w.scale = s;
    w.global_scale = format == FMT_NVFP4 ? 0.01f : 1;
    return w;
}

/* Print, for each weight format at V4-Flash shapes, the median time of one GEMV, its GB/s and
   the ratio to the streaming-read GB/s measured here, on this card. Each timed pass cycles
   through copies of the weights totalling more than 400 MB, so the 50 MB L2 cannot serve them.
   The last two columns time stream_read over the same copies' codes, call by call: what one
   launch reading that many bytes gets at best (launch, ramp-up and tail included). */
static void gpu_bench_gemv(void) {
    static const struct { WeightFormat format; int rows, cols, scale_is_f32; const char *what; } shapes[] = {
        {FMT_NVFP4, 2048, 4096, 0, "expert w1/w3"},
        {FMT_NVFP4, 4096, 2048, 0, "expert w2"},
        {FMT_NVFP4, 6 * 2 * 2048, 4096, 0, "6 x w1+w3"},   /* the bytes of a grouped top-6 launch */
        {FMT_NVFP4, 6 * 4096, 2048, 0, "6 x w2"},
        {FMT_MXFP4, 2048, 4096, 0, "expert w1/w3"},
        {FMT_FP8, 32768, 1024, 0, "attn wq_b"},
        {FMT_FP8, 4096, 8192, 0, "attn wo_b"},
        {FMT_FP8, 1024, 4096, 1, "attn wq_a"},
        {FMT_BF16, 129280, 4096, 0, "head"},
        {FMT_BF16, 1024, 4096, 0, "compressor"},
    };
    static const char *format_names[] = {[FMT_BF16] = "BF16", [FMT_FP8] = "FP8", [FMT_MXFP4] = "MXFP4", [FMT_NVFP4] = "NVFP4"};
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    StreamRun sr = {gpu_alloc((size_t)2 << 30), gpu_alloc(4), (size_t)2 << 30};
    CU_CHECK(cu.cuMemsetD8Async(sr.buf, 0x5a, sr.bytes, gpu.stream));
    double stream_us = gpu_median_us(stream_call, &sr, 3), stream_gbs = sr.bytes / stream_us * 1e-3;
    gpu_free(sr.buf);
    gpu_free(sr.out);
    printf("GPU %s, %d SMs, driver %d.%d: streaming read %.0f GB/s (2 GiB, median of %d)\n", gpu.name, gpu.sm_count,
           gpu.driver_version / 1000, gpu.driver_version % 1000 / 10, stream_gbs, BENCH_REPEATS);
    printf("%-6s %-13s %13s %8s %7s %10s %8s %7s %12s %8s\n", "format", "matrix", "shape", "MB", "copies", "us/call",
           "GB/s", "stream", "same-size", "of it");
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
        Linear w = gpu_bench_linear(shapes[i].format, shapes[i].rows, shapes[i].cols, shapes[i].scale_is_f32, &rng);
        size_t bytes = (size_t)w.rows * linear_row_bytes(&w) + linear_scale_bytes(&w);
        int n = (int)(((size_t)420 << 20) / bytes) + 1;   /* copies: > 400 MB in all */
        GemvRun run = {xcalloc((size_t)n, sizeof(GpuLinear)), n, gpu_alloc((size_t)w.cols * 4), gpu_alloc((size_t)w.rows * 4)};
        for (int c = 0; c < n; c++) gpu_upload_linear(&run.copies[c], &w);
        float *x = xcalloc((size_t)w.cols, sizeof(float));
        for (int c = 0; c < w.cols; c++) x[c] = random_float(&rng) * 2 - 1;
        gpu_upload(run.x, x, (size_t)w.cols * 4);
        double us = gpu_median_us(gemv_call, &run, n < 20 ? 20 : n), gbs = bytes / us * 1e-3;
        double same_gbs = (double)w.rows * run.copies[0].row_bytes / gpu_median_us(gemv_stream_call, &run, n < 20 ? 20 : n) * 1e-3;
        char shape[32];
        snprintf(shape, sizeof shape, "%dx%d", w.rows, w.cols);
        printf("%-6s %-13s %13s %8.1f %7d %10.2f %8.0f %6.0f%% %8.0f GB/s %7.0f%%\n", format_names[w.format],
               shapes[i].what, shape, bytes / 1e6, n, us, gbs, 100 * gbs / stream_gbs, same_gbs, 100 * gbs / same_gbs);
        for (int c = 0; c < n; c++) gpu_free_linear(&run.copies[c]);
        gpu_free(run.x);
        gpu_free(run.y);
        free(run.copies);
        free(x);
        free((void *)w.weight);
        free((void *)w.scale);
    }
}

#pragma GCC diagnostic pop

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
    if (count < 0) fatal("the prompt (%zu bytes) is too long to tokenize", n);
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

/* Append rows x V float32 logits to f (nothing when f is NULL); fatal on a write error. */
static void write_logits(FILE *f, const float *logits, size_t rows, int V) {
    if (f && fwrite(logits, sizeof(float), rows * V, f) != rows * V) fatal("cannot write the logits file: %s", strerror(errno));
}

/* Prefill the prompt in chunks, then generate up to n tokens, streaming them to stdout.
   Stops at an EOS id (not printed), after n tokens, or when the context is full. */
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
        for (int v = 0; v < c->vocab_size; v++)
            if (!isfinite(last[v]))
                fatal("the logits at position %d are not finite: the checkpoint holds NaN or infinite weights", s->pos - 1);
        token = sample(sampler, last, c->vocab_size);
        generated++;
        int eos = 0;
        for (int i = 0; i < c->n_eos; i++) eos |= token == c->eos_ids[i];
        if (eos) break;   /* the end-of-sentence token itself is not printed */
        print_token(t, &stream, token);
        if (generated >= n_generate) break;
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

/* What the command line asked for. */
typedef struct {
    const char *model_dir, *prompt, *ids, *dump_logits;   /* ids, dump_logits: NULL when absent */
    int n_generate, max_ctx, max_tokens, chat, tokenize_only;
    float temperature, top_p;
    uint64_t seed;
} Options;

/* The -h text. */
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

/* Like number_arg, and the number must be whole. */
static int int_arg(const char *option, const char *value, double lo, double hi) {
    double v = number_arg(option, value, lo, hi);
    if (v != floor(v)) fatal("%s: \"%s\" is not a whole number", option, value);
    return (int)v;
}

/* The command line as Options; fatal (or usage and exit 2) on anything malformed. */
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
        else if (!strcmp(a, "--cpu")) continue;   /* the CPU is the only path in this version */
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
        free(ids);
        tokenizer_free(&tokenizer);
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
    int big = model.weight_bytes >= 1e9;
    fprintf(stderr, "nvfp4: loaded %s (%d layers, %.2f %s of weights) in %.2f s\n", o.model_dir, c->n_layers,
            model.weight_bytes / (big ? 1e9 : 1e6), big ? "GB" : "MB", now_seconds() - t0);
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
