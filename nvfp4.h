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
/* Small tensors (norms, biases, sinks, ape, mHC parameters) are converted to float32 once at
   load and owned by the model; the large matrices stay in the file mapping as Linear views. */

/* The mHC parameters of one site: a block's input side (rows = (2 + HC) * HC = 24: pre, post
   and the HC x HC comb logits, scale [3]) or the final hc_head (rows = HC, scale [1]). */
typedef struct {
    float *fn;            /* [rows, HC*E] */
    float *base;          /* [rows] */
    float *scale;         /* [3] or [1] */
} HcParams;

typedef struct {
    Linear wkv, wgate;    /* [parts*d, E] each (parts = 2 for CSA, 1 for HCA) */
    float *ape;           /* [ratio, parts*d] */
    float *norm;          /* [d] */
} Compressor;

/* One kind of matrix (w1, w2 or w3) of a layer's X routed experts: one format and shape for
   all of them, indexed by expert (the GPU path uploads them as one [X, ...] block).
   expert_matrix() gives expert e's Linear view. */
typedef struct {
    WeightFormat format;
    int rows, cols;
    int scale_is_f32;     /* FP8 with F32 block scales */
    const void **weight;  /* [X] codes of each expert, in the mapping */
    const void **scale;   /* [X] block scales of each expert (NULL for BF16 / F32) */
    float *global_scale;  /* [X] NVFP4 weight_scale_2 of each expert (w1 and w3 each their own) */
} ExpertStack;

typedef struct {
    float *attn_norm, *ffn_norm;                 /* [E] */
    HcParams hc_attn, hc_ffn;                    /* mHC around attention and around the MoE */
    Linear wq_a;          /* [Q, E] */
    float *q_norm;        /* [Q] */
    Linear wq_b;          /* [H*D, Q] */
    Linear wkv;           /* [D, E] */
    float *kv_norm;       /* [D] */
    Linear wo_a;          /* [G*O, H*D/G] */
    Linear wo_b;          /* [E, G*O] */
    float *attn_sink;     /* [H] */
    Compressor compressor;          /* CSA / HCA layers */
    Linear index_wq_b;              /* CSA: [NI*DI, Q] */
    Linear index_weights_proj;      /* CSA: [NI, E] */
    Compressor index_compressor;    /* CSA: at DI */
    Linear gate;          /* router [X, E] */
    float *gate_bias;     /* [X] (routed layers) */
    int32_t *tid2eid;     /* [V, topk] (hash layers): the experts of each token id */
    ExpertStack w1, w2, w3;         /* X experts: [I,E], [E,I], [I,E] */
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
    float *norm;          /* [E] */
    HcParams hc_head;     /* fn [HC, HC*E], base [HC], scale [1] */
    Layer *layers;
    void **owned;         /* the float32 copies and index arrays made at load, freed by free_model */
    size_t n_owned, owned_capacity;
    size_t weight_bytes;  /* bytes of all mapped tensors */
} Model;

/* ------------------------------------------------------------------- decoding state */
/* The state is one arena laid out by plan_state (nvfp4.c), so that the GPU path can allocate
   the same layout in device memory. It has two parts: the cache, which persists from chunk to
   chunk (everything a later token reads), and the scratch of one chunk. No count is stored
   beside `pos`: the window fill, the entries emitted and the entries a query sees all follow
   from the position (see "decoding state" in nvfp4.c). */
typedef struct {
    float *inv_freq;      /* [R/2] */
    float scale;          /* multiplies cos and sin (YaRN attention factor; 1 for V4) */
} Rope;

/* A compressor's cache; its window being filled is slot pos % ratio. */
typedef struct {
    float *pending_kv, *pending_gate; /* [ratio, parts*d]: the tokens of the window being filled */
    float *prev_kv, *prev_gate;       /* CSA: [ratio, d] the last closed window's first half (gate with ape) */
    float *entries;                   /* [C/ratio, d]: entry i is emitted at position (i+1)*ratio - 1 */
} CompressorCache;

typedef struct {
    float *keys;          /* [W + T, D] ring: the key (= value) of position p is row p % (W + T) */
    CompressorCache comp, index_comp;
} LayerCache;

/* The scratch of one chunk of up to T tokens. */
typedef struct {
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
    float *scores;        /* [W + C]: attention scores of one query, or indexer scores */
    double *values;       /* [D]: the attention output of one head being summed */
    float *weight_row;    /* [largest linear input]: one decoded weight row */
    int *selected;        /* [C]: compressed entries a query attends to */
    float *entry;         /* [max(D, DI)]: one compressed entry being built */
    /* MoE, routed by slot: slot t*K + k is token t's k-th expert */
    float *router;        /* [T, X]: sqrt(softplus(router logits)) */
    float *biased;        /* [X]: one token's router scores + bias, for the top-k */
    int *chosen;          /* [T, K]: the experts of each slot */
    float *route_weight;  /* [T, K]: the weight of each slot's output */
    int *expert_start;    /* [X + 1]: expert e's slots are slot_order[expert_start[e] .. expert_start[e+1]) */
    int *slot_order;      /* [T*K]: the slots sorted by expert (then by slot); row i below is slot_order[i] */
    int *slot_row;        /* [T*K]: the inverse: the row of each slot in expert_x and expert_out */
    float *expert_x;      /* [T*K, E]: each slot's input row, gathered in expert order */
    float *expert_gate, *expert_up; /* [T*K, I]: w1 and w3 outputs (gate becomes the SwiGLU product) */
    float *expert_out;    /* [T*K, E]: each slot's expert output, before its route weight */
    float *logits;        /* [L, V]: L = T when every row's logits are kept, else 1 (the last row) */
} Scratch;

typedef struct {
    int max_tokens, max_ctx;          /* chunk size T and context C, fixed at allocation */
    int all_logits;                   /* logits kept for every row of a chunk, not only the last */
    int pos;                          /* tokens already in the state */
    void *arena;                      /* the one allocation every buffer below points into */
    size_t cache_bytes, arena_bytes;  /* the cache is arena[0, cache_bytes), the scratch the rest */
    Rope rope_main, rope_compress;    /* sliding-only layers; CSA/HCA layers, compressors, indexer */
    LayerCache *layers;               /* [n_layers] (a host array of pointers into the arena) */
    Scratch scratch;
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
