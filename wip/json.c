/* ---------- JSON ----------
 *
 * A small DOM parser for RFC 8259 JSON, used for config.json, tokenizer.json and safetensors
 * headers.  The whole document becomes a tree of Json nodes; arrays and objects hold their
 * children in one contiguous `items` array (objects also hold a parallel `keys` array), so a
 * 128k-member object costs one allocation for the values and one per key string.
 *
 * Input is `n` bytes that need not be NUL-terminated.  Any malformed input yields NULL and a
 * message "line L, column C: what" -- never a crash, never a read past `n`.  Nesting deeper than
 * JSON_MAX_DEPTH is refused so hostile input cannot exhaust the stack.  Strings decode \uXXXX
 * escapes (surrogate pairs included, lone surrogates refused) to UTF-8; raw bytes >= 0x80 are
 * copied as they are, without UTF-8 validation.
 */

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;
typedef struct Json Json;
struct Json {
    JsonType type;
    double number;        /* JSON_NUMBER; also 1/0 for JSON_BOOL */
    char *string;         /* JSON_STRING: UTF-8, NUL-terminated (may contain \u0000 -> use length) */
    size_t length;        /* string byte length, or number of items for arrays/objects */
    Json *items;          /* JSON_ARRAY / JSON_OBJECT: `length` values */
    char **keys;          /* JSON_OBJECT: `length` keys (NUL-terminated), in file order */
};

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
void json_free(Json *root) {
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
Json *json_parse(const char *text, size_t n, char *err, size_t errlen) {
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
const Json *json_get(const Json *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < obj->length; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

#ifdef JSON_SELFTEST
/* Parses a few valid and invalid documents and prints a line for each mismatch; then, if a
   file name is given, times parsing that file.  Exit status 0 when all checks pass. */
#include <time.h>
int main(int argc, char **argv) {
    static const char *const valid[] = {
        "0", "-0.5e+3", "\"a\\u00e9\\ud83d\\ude00\\n\"", "[]", "{}", " [1, [2, {\"k\": null}], true] ",
        "{\"a\":1,\"a\":2}", "\"\\u0000x\"",
    };
    static const char *const invalid[] = {
        "", "[", "{\"a\" 1}", "[1,]", "01", "1.", "-", "\"\\ud800\"", "\"\\udc00\"", "\"\\u12\"",
        "\"abc", "tru", "[1] x", "\"\\x\"", "\"a\nb\"", "{1:2}", "\"\\ud800\\u0041\"",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    };
    char err[128];
    int failures = 0;
    for (size_t i = 0; i < sizeof valid / sizeof *valid; i++) {
        Json *j = json_parse(valid[i], strlen(valid[i]), err, sizeof err);
        if (!j) { printf("FAIL valid %s: %s\n", valid[i], err); failures++; }
        json_free(j);
    }
    for (size_t i = 0; i < sizeof invalid / sizeof *invalid; i++) {
        Json *j = json_parse(invalid[i], strlen(invalid[i]), err, sizeof err);
        if (j) { printf("FAIL invalid accepted: %s\n", invalid[i]); failures++; json_free(j); }
        else printf("ok  %-24.24s -> %s\n", invalid[i], err);
    }
    Json *j = json_parse("{\"s\":\"a\\u00e9\\ud83d\\ude00\",\"n\":[1,2.5]}", 39, err, sizeof err);
    const Json *s = json_get(j, "s"), *n = json_get(j, "n");
    if (!s || s->length != 7 || memcmp(s->string, "a\xc3\xa9\xf0\x9f\x98\x80", 7) != 0 || !n ||
        n->length != 2 || n->items[1].number != 2.5) { printf("FAIL content\n"); failures++; }
    json_free(j);
    if (argc > 1) {
        FILE *f = fopen(argv[1], "rb");
        if (!f) return 1;
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *data = malloc((size_t)size);
        if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) return 1;
        fclose(f);
        clock_t t0 = clock();
        Json *big = json_parse(data, (size_t)size, err, sizeof err);
        double ms = 1000.0 * (double)(clock() - t0) / CLOCKS_PER_SEC;
        printf("%s: %s in %.1f ms\n", argv[1], big ? "parsed" : err, ms);
        json_free(big);
        free(data);
    }
    printf("%d failures\n", failures);
    return failures != 0;
}
#endif
