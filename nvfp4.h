/* nvfp4: a minimal inference engine for DeepSeek V4 checkpoints (BF16 / FP8 / MXFP4 / NVFP4).
 *
 * This header holds the data structures every part of the engine shares: the JSON tree, the
 * safetensors view, the model configuration, quantized linear layers, the weights, the decoding
 * state, the tokenizer and the sampler. Sizes are fixed at load time; nothing is allocated per
 * token. The shapes in the comments use these names:
 *   E hidden_size   H heads   D head_dim   R rope dims (the LAST R of each head)   Q q_lora_rank
 *   G o_groups      O o_lora_rank        X n_routed_experts   I moe_intermediate_size
 *   NI index heads  DI index head dim    W sliding_window     T tokens in a chunk (<= max_tokens)
 *   C max context   HC hc_mult (4)       V vocab_size
 */
#ifndef NVFP4_H
#define NVFP4_H

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------------------------ JSON */
typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;
typedef struct Json Json;
struct Json {
    JsonType type;
    double number;  /* JSON_NUMBER; 1 or 0 for JSON_BOOL */
    char *string;   /* JSON_STRING: UTF-8, NUL-terminated (use length: may hold \u0000) */
    size_t length;  /* string bytes, or number of items of an array / object */
    Json *items;    /* JSON_ARRAY / JSON_OBJECT: `length` values */
    char **keys;    /* JSON_OBJECT: `length` keys, in file order */
};

/* ----------------------------------------------------------------------------- safetensors */
/* The dtypes a header may name (F16 parses, but no V4 tensor may use it). */
typedef enum { DT_BF16, DT_F32, DT_F8_E4M3, DT_F8_E8M0, DT_U8, DT_I8, DT_I64, DT_F16, DT_COUNT } DType;

typedef struct {
    const char *name;     /* owned by the model (freed by free_model) */
    DType dtype;
    int ndim;
    int64_t shape[4];
    const void *data;     /* inside the file's read-only mapping */
    size_t nbytes;
    int file;             /* index into Model.files */
} Tensor;

typedef struct {
    char *path;
    void *map;            /* read-only mmap of the whole file */
    size_t size;
} SafeFile;

/* ------------------------------------------------------------------------------- config */
#define MAX_LAYERS 256
#define HC 4   /* hc_mult: DeepSeek V4's residual streams; config.json must agree */
typedef enum { ATTN_SLIDING, ATTN_CSA, ATTN_HCA } AttnKind;

typedef struct {
    int vocab_size, hidden_size, n_layers, n_heads, head_dim, rope_dim;
    int q_lora_rank, o_groups, o_lora_rank;
    int n_experts, n_shared_experts, topk, moe_inter, n_hash_layers;
    int sinkhorn_iters, sliding_window;
    int index_heads, index_dim, index_topk;
    int bos_id;
    int eos_ids[8], n_eos;                       /* generation stops at any of these */
    float hc_eps, rms_eps, routed_scaling, swiglu_limit;
    float rope_theta, compress_rope_theta;
    int yarn;                                    /* YaRN on the compress rope */
    float yarn_factor, yarn_beta_fast, yarn_beta_slow, yarn_original_max;
    float rope_scale;                            /* YaRN attention_factor: scales cos and sin */
    AttnKind attn_kind[MAX_LAYERS];
    int compress_ratio[MAX_LAYERS];              /* 0, CSA rate (4) or HCA rate (128) */
} Config;

/* ------------------------------------------------------------------------ linear layers */
typedef enum { FMT_BF16, FMT_F32, FMT_FP8, FMT_MXFP4, FMT_NVFP4 } WeightFormat;

/* y = W x for W [rows, cols] stored in any supported format. */
typedef struct {
    WeightFormat format;
    int rows, cols;
    const void *weight;   /* BF16/F32 [rows,cols]; FP8 e4m3 [rows,cols]; FP4 packed [rows,cols/2] */
    const void *scale;    /* FP8: [ceil(rows/128), ceil(cols/128)] e8m0 or f32;
                             MXFP4: e8m0 [rows, cols/32]; NVFP4: e4m3 [rows, cols/16] */
    int scale_is_f32;     /* FP8 with F32 block scales (weight_scale_inv) */
    float global_scale;   /* NVFP4 weight_scale_2 */
} Linear;

/* --------------------------------------------------------------------------- weights */
typedef struct {
    Linear wkv, wgate;    /* [coff*d, E] each (coff = 2 for CSA, 1 for HCA) */
    Tensor ape;           /* [ratio, coff*d] f32 */
    Tensor norm;          /* [d] */
} Compressor;

typedef struct {
    Tensor attn_norm, ffn_norm;                  /* [E] */
    Tensor hc_attn_fn, hc_attn_base, hc_attn_scale; /* [24, HC*E], [24], [3] */
    Tensor hc_ffn_fn, hc_ffn_base, hc_ffn_scale;
    Linear wq_a;          /* [Q, E] */
    Tensor q_norm;        /* [Q] */
    Linear wq_b;          /* [H*D, Q] */
    Linear wkv;           /* [D, E] */
    Tensor kv_norm;       /* [D] */
    Linear wo_a;          /* [G*O, H*D/G] */
    Linear wo_b;          /* [E, G*O] */
    Tensor attn_sink;     /* [H] */
    Compressor compressor;          /* CSA / HCA layers */
    Linear index_wq_b;              /* CSA: [NI*DI, Q] */
    Linear index_weights_proj;      /* CSA: [NI, E] */
    Compressor index_compressor;    /* CSA: at DI */
    Linear gate;          /* router [X, E] */
    Tensor gate_bias;     /* [X] f32 (routed layers) */
    Tensor tid2eid;       /* [V, topk] i64 (hash layers) */
    Linear *w1, *w2, *w3; /* X experts: [I,E], [E,I], [I,E] */
    Linear shared_w1, shared_w2, shared_w3;
} Layer;

typedef struct {
    Config config;
    SafeFile *files;
    int n_files;
    Tensor *tensors;      /* every tensor of every file */
    size_t n_tensors;
    size_t *index;        /* open-addressing hash of tensor names -> tensors[] slot + 1 */
    size_t index_size;
    Tensor embed;         /* [V, E] */
    Linear head;          /* [V, E] */
    Tensor norm;          /* [E] */
    Tensor hc_head_fn, hc_head_base, hc_head_scale; /* [HC, HC*E], [HC], [1] */
    Layer *layers;
    size_t weight_bytes;  /* bytes of all mapped tensors */
} Model;

/* ------------------------------------------------------------------- decoding state */
typedef struct {
    float *inv_freq;      /* [R/2] */
    float scale;          /* multiplies cos and sin (YaRN attention factor; 1 for V4) */
} Rope;

typedef struct {
    float *pending_kv, *pending_gate; /* [ratio, coff*d]: tokens of the window being filled */
    float *prev_kv, *prev_gate;       /* [ratio, d]: CSA overlap, the last window's first half */
    int have_prev;
    float *entries;                   /* [C/ratio + 1, d]: compressed entries emitted so far */
    int n_entries;
} CompressorState;

typedef struct {
    float *window;                    /* [W, D] ring of the last W keys (= values) */
    CompressorState comp, index_comp;
} LayerState;

typedef struct {
    int max_tokens, max_ctx;          /* chunk size T and context C, fixed at allocation */
    int pos;                          /* tokens already in the state */
    LayerState *layers;
    /* scratch for one chunk */
    float *h;             /* [T, HC, E] residual streams */
    float *x;             /* [T, E] collapsed and normed input of a block */
    float *post, *comb;   /* [T, HC], [T, HC, HC] */
    float *block_out;     /* [T, E] */
    float *qr;            /* [T, Q] */
    float *q;             /* [T, H, D] */
    float *kv;            /* [T, D] */
    float *attn;          /* [T, H, D] */
    float *grouped;       /* [T, G*O] */
    float *comp_kv, *comp_gate;   /* [T, 2*max(D, DI)]: compressor projections of the chunk */
    float *index_q;       /* [T, NI, DI] */
    float *index_w;       /* [T, NI] */
    float *scores;        /* [W + C + 1]: attention scores of one query, or indexer scores */
    double *values;       /* [D]: the attention output of one head being summed */
    float *weight_row;    /* [largest linear input]: one decoded weight row */
    int *selected;        /* [C + 1]: compressed entries a query attends to */
    float *entry;         /* [2*max(D, DI)]: one compressed entry being built */
    float *router;        /* [2, X]: router scores, then scores + bias */
    int *chosen;          /* [topk]: the experts of one token */
    float *expert_gate, *expert_up; /* [I] */
    float *expert_out;    /* [E] */
    Rope rope_main, rope_compress;    /* sliding-only layers; CSA/HCA layers, compressors, indexer */
    float *logits;        /* [T, V] */
} State;

/* ------------------------------------------------------------------------------ tokenizer */
/* The pre-tokenizer regexes nvfp4 runs, each by its own hand-written matcher in nvfp4.c. */
typedef enum {
    PATTERN_DIGITS,    /* \p{N}{1,3} */
    PATTERN_CJK,       /* [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+ */
    PATTERN_DEEPSEEK,  /* the DeepSeek word/punctuation/space pattern, see match_deepseek */
    PATTERN_GPT2       /* the GPT-2 pattern of ByteLevel with use_regex, see match_gpt2 */
} Pattern;

#define TOKENIZER_MAX_PATTERNS 8

/* What the tokenizer knows about one id. */
typedef struct {
    size_t spelling_offset, spelling_length; /* ByteLevel spelling in `spellings` (vocab ids) */
    size_t bytes_offset, bytes_length;       /* decoded bytes in `bytes` */
    unsigned char in_vocab;                  /* has a spelling (is in model.vocab) */
    unsigned char defined;                   /* in the vocab or an added token */
} TokenInfo;

/* An added token: matched verbatim in the raw text. */
typedef struct {
    int id;
    int normalized;                          /* 1: matched in the second pass */
    unsigned char first_byte;                /* content[0], the index of added_start */
    size_t bytes_offset, bytes_length;       /* its content, in `bytes` */
} AddedToken;

/* One slot of the merge hash table: the pair (left id << 32 | right id), its rank and the id
   it merges into.  rank < 0 marks an empty slot. */
typedef struct { uint64_t pair; int rank; int merged; } MergeSlot;

typedef struct {
    int n_ids;                   /* ids are 0..n_ids-1; some may be undefined */
    TokenInfo *tokens;           /* n_ids entries */
    char *spellings;             /* ByteLevel spellings of the vocab, back to back */
    size_t spellings_size;
    char *bytes;                 /* decoded bytes of every id and added token, back to back */
    size_t bytes_size;
    int *vocab_slots;            /* hash of spellings -> id, -1 = empty; vocab_mask + 1 slots */
    size_t vocab_mask;
    MergeSlot *merge_slots;      /* hash of pairs -> merge; merge_mask + 1 slots */
    size_t merge_mask;
    AddedToken *added;           /* sorted by (normalized, first byte, length descending) */
    size_t n_added;
    size_t added_start[2][257];  /* [pass][b]..[pass][b+1]: added tokens of a pass starting with b */
    int byte_ids[256];           /* id of the one-byte symbol of each byte */
    uint32_t byte_chars[256];    /* GPT-2 ByteLevel: the printable character standing for a byte */
    short char_bytes[256 + 68];  /* the reverse: byte of each ByteLevel character, or -1 */
    Pattern patterns[TOKENIZER_MAX_PATTERNS];
    int n_patterns;
    int ignore_merges;           /* a piece that is itself in the vocab is not merged */
} Tokenizer;

/* Holds back an incomplete UTF-8 character between decoded tokens. */
typedef struct { unsigned char pending[4]; int npending; } Utf8Stream;

/* ---------------------------------------------------------------------------- sampler */
typedef struct {
    float temperature, top_p;
    uint64_t rng;
    int *order;           /* [V] scratch for top-p */
} Sampler;

#endif
