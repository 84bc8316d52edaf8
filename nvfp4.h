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

#ifndef NVFP4_PTX   /* kernels.ptx includes only the kernel ABI at the end */
#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------------------------ JSON */
typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;
typedef struct Json Json;
struct Json {
    JsonType type;
    double number;  /* JSON_NUMBER; 1 or 0 for JSON_BOOL */
    char *string;   /* JSON_STRING: UTF-8, NUL-terminated (json_parse refuses \u0000) */
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
    float *weight_row;    /* [N, weight_row_floats]: a decoded weight row per thread (N: State's threads) */
    size_t weight_row_floats;         /* the largest input of any linear layer */
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
    int threads;                      /* N: the CPU threads the scratch is laid out for (the pool's) */
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
#define REPEAT_LAST_N_MAX (1 << 20)   /* the longest --repeat-last-n (the GPU keeps a ring this long) */
typedef struct {
    float temperature, top_p;
    uint64_t rng;
    int *order;           /* [V] scratch for top-p and top-k */
    float *probs;         /* [V] scratch: the probabilities (sample leaves the logits as they are) */
    int top_k;            /* keep the top_k most likely tokens (0: all) */
    float min_p;          /* keep tokens at least min_p times as likely as the most likely (0: all) */
    float repeat_penalty; /* divide (multiply, when negative) the logits of recent tokens by it (1: off) */
    int repeat_last_n;    /* how many of the last tokens are recent (0: none) */
    int *recent;          /* [repeat_last_n] ring of the last tokens fed (sampler_feed) */
    int n_fed;            /* tokens fed so far */
} Sampler;
#endif /* NVFP4_PTX */

/* ======================================================================== the kernel ABI */
/* Every kernel of kernels.ptx takes one parameter, a struct laid out as below (its .param is
   `args`, a byte array of NAME_BYTES; the kernel reads field F with ld.param at args+NAME_F).
   kernels.ptx includes this header with NVFP4_PTX defined, so it sees the #defines alone; the C
   side fills the structs by field name, and static assertions in nvfp4.c check that every field
   lies at its #define and every struct has its size. Device addresses are uint64_t; the comment
   gives what they point to and its shape. */

#define GEMV_MAX_SEGS 4     /* matrices (segments) of one gemv launch */
#define GEMV_MAX_SLOTS 64   /* products of one gemv launch: the kernel's slot table holds 64 */
#define GEMV_NVFP4 0        /* GemvSeg.format: the weight formats the GEMV decodes */
#define GEMV_MXFP4 1
#define GEMV_FP8 2
#define GEMV_BF16 3

/* One segment of a gemv launch (kernels.ptx, "A SEGMENT"): one matrix with what the launch
   computes of it, where its items and slots start in the launch, and which x it stages. */
#define SEG_W 0
#define SEG_S 8
#define SEG_X 16
#define SEG_Y 24
#define SEG_EXPERT 32
#define SEG_STRIDE_W 40
#define SEG_STRIDE_S 48
#define SEG_GSCALES 56
#define SEG_UP_OFFSET 64
#define SEG_NORM_W 72
#define SEG_FORMAT 80
#define SEG_ROWS 84
#define SEG_COLS 88
#define SEG_ROW_BYTES 92
#define SEG_X_STRIDE 96
#define SEG_Y_STRIDE 100
#define SEG_LIST_LEN 104
#define SEG_LIST_OFFSET 108
#define SEG_GSCALE 112
#define SEG_LIMIT 116
#define SEG_EPS 120
#define SEG_FIRST_ITEM 124
#define SEG_FIRST_SLOT 128
#define SEG_X_GROUP 132
#define SEG_ROW_BLOCKS 136
#define SEG_X_HC 140
#define SEG_TABLE 144
#define SEG_SPLIT 152
#define SEG_BYTES 160
#ifndef NVFP4_PTX
typedef struct {
    uint64_t w;             /* weight codes [rows (x matrices), row_bytes], rows padded */
    uint64_t s;             /* their scales in the GEMV layout (0: BF16) */
    uint64_t x;             /* const float * [cols]: slot 0's input (0: made from the mHC site, x_hc) */
    uint64_t y;             /* float * [rows]: slot 0's output */
    uint64_t expert;        /* const int * [list_len]: each slot's matrix (0: slot z is matrix z) */
    uint64_t stride_w;      /* bytes between matrices' codes */
    uint64_t stride_s;      /* bytes between matrices' scales */
    uint64_t gscales62;     /* const float * [matrices]: NVFP4 global scales x 2^62 (0: gscale62 for all) */
    uint64_t up_offset;     /* != 0: x is staged as SwiGLU(x, up), up lying up_offset bytes after x */
    uint64_t norm_weight;   /* const float * [cols]: x is staged as RMSNorm(x) * norm_weight (0: not) */
    uint32_t format;        /* GEMV_NVFP4, GEMV_MXFP4, GEMV_FP8 or GEMV_BF16 */
    uint32_t rows, cols;    /* the shape (cols before padding; rows: virtual rows where split) */
    uint32_t row_bytes;     /* padded bytes of a row (half a row where split): a multiple of 512 */
    uint32_t x_stride;      /* floats between slots' inputs (0: one x for every slot) */
    uint32_t y_stride;      /* floats between slots' outputs */
    uint32_t list_len;      /* slot z takes matrix expert[z % list_len] + (z / list_len) * list_offset */
    uint32_t list_offset;
    float gscale62;         /* NVFP4: the global scale x 2^62 */
    float limit;            /* SwiGLU's clamp */
    float eps;              /* RMSNorm's epsilon */
    uint32_t first_item;    /* where its items and slots start in the launch (unused: UINT32_MAX) */
    uint32_t first_slot;
    uint32_t x_group;       /* segments of one group stage one x (the same source and transform) */
    uint32_t row_blocks;    /* items a slot: ceil(rows / rows an item) */
    uint32_t x_hc;          /* 1: x is made from the launch's mHC site */
    uint64_t table;         /* const uint64 * [matrices, 2]: matrix m's codes at table[2m], its scales at
                               table[2m + 1] (routed experts, wherever each lives); 0: w + m * stride_w,
                               s + m * stride_s */
    uint32_t split;         /* 1: a row is read as two half-rows of row_bytes each (virtual rows 2r and
                               2r + 1; rows counts them): rows wider than 16 chunks (BF16, FP8) */
} GemvSeg;
#endif

/* The mHC finish a decode GEMV makes its x with (kernels.ptx, gemv stage 6c): hc_finish's
   arguments for token 0. post and comb (0: not written) get the site's weights for
   hc_post_mix; norm is the RMSNorm weight applied to the collapsed streams. */
#define HC_POST 0
#define HC_COMB 8
#define HC_H 16
#define HC_PARTIAL 24
#define HC_PARTIAL_SS 32
#define HC_BASE 40
#define HC_SCALE 48
#define HC_NORM 56
#define HC_ROWS 64
#define HC_SLICES 68
#define HC_ITERS 72
#define HC_EPS 76
#define HC_RMS_EPS 80
#define HC_BYTES 88
#ifndef NVFP4_PTX
typedef struct {
    uint64_t post;          /* float * [HC]: written by block 0 (0: not written) */
    uint64_t comb;          /* float * [HC, HC]: likewise */
    uint64_t h;             /* const float * [HC, E]: the streams */
    uint64_t partial;       /* const double * [rows, slices]: the site's mixing sums */
    uint64_t partial_ss;    /* const double * [slices] */
    uint64_t base;          /* const float * [rows] */
    uint64_t scale;         /* const float * [3] (the head: [1]) */
    uint64_t norm;          /* const float * [E]: the RMSNorm weight */
    uint32_t rows;          /* mixing rows: 24 for a block site, HC for the head */
    uint32_t slices;        /* slices of the sums */
    uint32_t iters;         /* Sinkhorn iterations */
    float hc_eps, rms_eps;
    uint32_t unused;
} GemvHc;
#endif

/* The routing a decode GEMV launch does first (kernels.ptx, gemv stage 3): every block runs
   route_tokens' work for the token (route_block) on the router's logits for its own slot table
   (parts whose expert list is `chosen` read it from there); block 0 writes chosen and
   route_weight. Fields as RouteTokensArgs' (router 0: no routing). */
#define RT_ROUTER 0
#define RT_BIAS 8
#define RT_TID2EID 16
#define RT_TOKENS 24
#define RT_CHOSEN 32
#define RT_WEIGHT 40
#define RT_START 48
#define RT_ORDER 56
#define RT_ROW 64
#define RT_ACTIVE 72
#define RT_ACTIVE_COUNT 80
#define RT_X 88
#define RT_K 92
#define RT_SCALING 96
#define RT_HITS 104
#define RT_BYTES 112
#ifndef NVFP4_PTX
typedef struct {
    uint64_t router, bias, tid2eid, tokens, chosen, route_weight, expert_start, slot_order, slot_row, active_experts,
        active_count;
    uint32_t X, K;
    float routed_scaling;
    uint32_t unused;
    uint64_t hits;          /* uint32 * [X]: block 0 adds 1 for each chosen expert (0: not counted) */
} GemvRoute;
#endif

/* Streamed experts (kernels.ptx, gemv's "streamed experts"; nvfp4.c, "Streaming the host
   experts"): in decode, the routed experts placed in host memory are not read over PCIe by the
   GEMV but copied into device memory by the host's copy thread through the copy engine. The
   launch that routes a layer posts its choice in the layer's StreamMail (mapped host memory):
   the experts, then the tag (step * layers + layer + 1, step being the counter embed_streams
   advances). The copy thread copies each chosen host expert into streaming slot k (k its place
   in the list) and then sets ready[part][k] to the tag; the GEMV waits for that before reading
   the slot. A device table entry (SEG_TABLE) with bit 0 set is such an expert: its codes lie
   (entry - 1) bytes into its slot, its scales (scale entry) bytes. */
#define STREAM_MAX_SLOTS 32        /* top-k at most (gpu_check_limits) */
#define STREAM_TIMEOUT_NS 2000000000   /* a GEMV waits this long for a copy, then reports it (SM_TIMED_OUT) */
#define SC_STEP 0                  /* StreamControl (device memory, uint32): the step counter */
#define SC_ERROR 4                 /* nonzero once a wait timed out: later waits give up at once */
#define SC_READY 8                 /* ready[2][STREAM_MAX_SLOTS]: part 0 (w1, w3), part 1 (w2) */
#define SC_BYTES (8 + 8 * STREAM_MAX_SLOTS)
#define SM_TAG 0                   /* StreamMail (mapped host memory, one a layer, uint32) */
#define SM_TIMED_OUT 4             /* the tag whose copy a GEMV stopped waiting for (0: none) */
#define SM_EXPERT 8                /* expert[STREAM_MAX_SLOTS]: the posted choice */
#define SM_BYTES 256
#define GS_STAGING 0
#define GS_CONTROL 8
#define GS_MAIL 16
#define GS_SLOT_BYTES 24
#define GS_PART 28
#define GS_LAYER 32
#define GS_LAYERS 36
#define GS_BYTES 40
#ifndef NVFP4_PTX
typedef struct {
    uint32_t tag;              /* written last, by the routing launch's block 0 */
    uint32_t timed_out;
    int32_t expert[STREAM_MAX_SLOTS];
    uint8_t unused[SM_BYTES - 8 - 4 * STREAM_MAX_SLOTS];
} StreamMail;
typedef struct {
    uint64_t staging;          /* device [K, slot_bytes]: the streaming slots (0: nothing streamed) */
    uint64_t control;          /* device StreamControl (SC_*) */
    uint64_t mail;             /* StreamMail * of this layer (mapped host memory) */
    uint32_t slot_bytes;       /* bytes of one slot: one expert's w1, w3 and w2 */
    uint32_t part;             /* 0: the w1/w3 launch (it posts the choice), 1: the w2 launch */
    uint32_t layer, layers;    /* the tag: step * layers + layer + 1 */
} GemvStream;
#endif

/* One compressor of a compressor_update launch: the chunk's projections kv, gate [T, parts * d]
   and the compressor's weights and cache (CompressorCache). */
#define CA_KV_IN 0
#define CA_GATE_IN 8
#define CA_APE 16
#define CA_NORM 24
#define CA_PENDING_KV 32
#define CA_PENDING_GATE 40
#define CA_PREV_KV 48
#define CA_PREV_GATE 56
#define CA_ENTRIES 64
#define CA_PARTS 72
#define CA_D 76
#define CA_BYTES 80
#ifndef NVFP4_PTX
typedef struct {
    uint64_t kv;            /* const float * [T, parts * d] */
    uint64_t gate;          /* const float * [T, parts * d] */
    uint64_t ape;           /* const float * [ratio, parts * d]: the position bias */
    uint64_t norm;          /* const float * [d]: the entries' RMSNorm weight */
    uint64_t pending_kv, pending_gate, prev_kv, prev_gate, entries;   /* CompressorCache's */
    uint32_t parts, d;      /* 2 (CSA: overlapping windows) or 1 (HCA); entry dims */
} CompressorArgs;
#endif

/* ------------------------------------------------------------------- one struct a kernel */

/* stream_read: sum a buffer with 16-byte loads (the bandwidth ceiling). gpu_stream_read */
#define STREAM_READ_BUF   0
#define STREAM_READ_N16   8
#define STREAM_READ_OUT   16
#define STREAM_READ_BYTES 24
#ifndef NVFP4_PTX
typedef struct {
    uint64_t buf; /* const uint4 * [n16]: the buffer */
    uint64_t n16; /* 16-byte words to read */
    uint64_t out; /* uint32 * [1]: the sum is added here */
} StreamReadArgs;
#endif

/* gemv: y = W x for up to GEMV_MAX_SEGS matrices of any format (decode). gpu_gemv_launch */
#define GEMV_SEGS       0
#define GEMV_ITEMS      640
#define GEMV_SLOTS      644
#define GEMV_CONTIGUOUS 648
#define GEMV_LIST_READY 652
#define GEMV_XS_BYTES   656
#define GEMV_HC         664
#define GEMV_ROUTE      752
#define GEMV_STREAM     864
#define GEMV_BYTES      904
#ifndef NVFP4_PTX
typedef struct {
    GemvSeg segs[4];     /* the segments (unused ones: first_item = first_slot = UINT32_MAX) */
    uint32_t items;      /* items of all segments */
    uint32_t slots;      /* slots of all segments (<= GEMV_MAX_SLOTS) */
    uint32_t contiguous; /* 1: contiguous item ranges a block (some segment has x per slot) */
    uint32_t list_ready; /* 1: the device-chosen expert lists may be read before the wait */
    uint32_t xs_bytes;   /* bytes of staged x in shared memory (the ring follows) */
    GemvHc hc;           /* the mHC site the x_hc segments make their x from */
    GemvRoute route;     /* router != 0: every block routes the token first */
    GemvStream stream;   /* control != 0: some of the routed experts are streamed (gemv_streamed) */
} GemvArgs;
#endif

/* row_norm_rope: RMSNorm and/or RoPE of rows in place, and a copy into the key ring. gpu_row_norm_rope */
#define ROW_NORM_ROPE_X          0
#define ROW_NORM_ROPE_N_HEADS    8
#define ROW_NORM_ROPE_DIM        12
#define ROW_NORM_ROPE_DO_NORM    16
#define ROW_NORM_ROPE_WEIGHT     24
#define ROW_NORM_ROPE_EPS        32
#define ROW_NORM_ROPE_ROPE_DIM   36
#define ROW_NORM_ROPE_INV_FREQ   40
#define ROW_NORM_ROPE_ROPE_SCALE 48
#define ROW_NORM_ROPE_POS0_PTR   56
#define ROW_NORM_ROPE_RING       64
#define ROW_NORM_ROPE_RING_ROWS  72
#define ROW_NORM_ROPE_BYTES      80
#ifndef NVFP4_PTX
typedef struct {
    uint64_t x;         /* float * [T, n_heads, dim], in place */
    uint32_t n_heads;   /* rows a token */
    uint32_t dim;       /* floats a row */
    uint32_t do_norm;   /* 1: RMSNorm first */
    uint64_t weight;    /* const float * [dim]: the norm weight (0: unweighted) */
    float eps;          /* RMSNorm epsilon */
    uint32_t rope_dim;  /* the last rope_dim dims are rotated (0: none) */
    uint64_t inv_freq;  /* const float * [rope_dim / 2] */
    float rope_scale;   /* the RoPE attention scale */
    uint64_t pos0_ptr;  /* const int * [1]: the position of token 0 */
    uint64_t ring;      /* float * [ring_rows, dim]: the key ring (0: no copy) */
    uint32_t ring_rows; /* rows of the ring */
} RowNormRopeArgs;
#endif

/* compressor_update: CSA/HCA compressors over a chunk, a block each. gpu_compressors */
#define COMPRESSOR_UPDATE_COMP       0
#define COMPRESSOR_UPDATE_T          160
#define COMPRESSOR_UPDATE_RATIO      164
#define COMPRESSOR_UPDATE_EPS        168
#define COMPRESSOR_UPDATE_ROPE_DIM   172
#define COMPRESSOR_UPDATE_INV_FREQ   176
#define COMPRESSOR_UPDATE_ROPE_SCALE 184
#define COMPRESSOR_UPDATE_POS0_PTR   192
#define COMPRESSOR_UPDATE_BYTES      200
#ifndef NVFP4_PTX
typedef struct {
    CompressorArgs comp[2]; /* block b runs comp[b] */
    uint32_t T;             /* tokens in the chunk */
    uint32_t ratio;         /* tokens per compressed entry */
    float eps;              /* RMSNorm epsilon */
    uint32_t rope_dim;      /* rotated dims of an entry */
    uint64_t inv_freq;      /* const float * [rope_dim / 2]: the "compress" rope */
    float rope_scale;       /* its attention scale */
    uint64_t pos0_ptr;      /* const int * [1]: the position of token 0 */
} CompressorUpdateArgs;
#endif

/* indexer_scores: the lightning indexer's score of every visible entry. gpu_indexer */
#define INDEXER_SCORES_SCORES       0
#define INDEXER_SCORES_SCORE_STRIDE 8
#define INDEXER_SCORES_INDEX_Q      16
#define INDEXER_SCORES_INDEX_W      24
#define INDEXER_SCORES_INDEX_KEYS   32
#define INDEXER_SCORES_NI           40
#define INDEXER_SCORES_DI           44
#define INDEXER_SCORES_RATIO        48
#define INDEXER_SCORES_POS0_PTR     56
#define INDEXER_SCORES_ROPE_DIM     64
#define INDEXER_SCORES_INV_FREQ     72
#define INDEXER_SCORES_ROPE_SCALE   80
#define INDEXER_SCORES_BYTES        88
#ifndef NVFP4_PTX
typedef struct {
    uint64_t scores;       /* float * [T, score_stride] */
    uint32_t score_stride; /* floats between tokens' scores */
    uint64_t index_q;      /* const float * [T, NI, DI]: the queries (rotated here) */
    uint64_t index_w;      /* const float * [T, NI]: the head weights */
    uint64_t index_keys;   /* const float * [C / ratio, DI]: the indexer's entries */
    uint32_t NI;           /* index heads */
    uint32_t DI;           /* index head dim */
    uint32_t ratio;        /* the layer's compress ratio */
    uint64_t pos0_ptr;     /* const int * [1]: the position of token 0 */
    uint32_t rope_dim;     /* rotated dims */
    uint64_t inv_freq;     /* const float * [rope_dim / 2] */
    float rope_scale;      /* the RoPE attention scale */
} IndexerScoresArgs;
#endif

/* top_k_select: each query's top-k entries by indexer score. gpu_indexer */
#define TOP_K_SELECT_SCORES       0
#define TOP_K_SELECT_SCORE_STRIDE 8
#define TOP_K_SELECT_SELECTED     16
#define TOP_K_SELECT_SEL_STRIDE   24
#define TOP_K_SELECT_N_SELECTED   32
#define TOP_K_SELECT_K            40
#define TOP_K_SELECT_RATIO        44
#define TOP_K_SELECT_POS0_PTR     48
#define TOP_K_SELECT_BYTES        56
#ifndef NVFP4_PTX
typedef struct {
    uint64_t scores;       /* const float * [T, score_stride] */
    uint32_t score_stride; /* floats between tokens' scores */
    uint64_t selected;     /* int * [T, sel_stride]: entry numbers */
    uint32_t sel_stride;   /* ints between tokens' selections */
    uint64_t n_selected;   /* int * [T]: entries selected */
    uint32_t k;            /* index_topk */
    uint32_t ratio;        /* the layer's compress ratio */
    uint64_t pos0_ptr;     /* const int * [1]: the position of token 0 */
} TopKSelectArgs;
#endif

/* attention_decode: one head of one query over its window and entries. gpu_attend */
#define ATTENTION_DECODE_Q          0
#define ATTENTION_DECODE_ATTN       8
#define ATTENTION_DECODE_H          16
#define ATTENTION_DECODE_D          20
#define ATTENTION_DECODE_SINK       24
#define ATTENTION_DECODE_RING       32
#define ATTENTION_DECODE_RING_ROWS  40
#define ATTENTION_DECODE_WINDOW     44
#define ATTENTION_DECODE_ENTRIES    48
#define ATTENTION_DECODE_COMP_MODE  56
#define ATTENTION_DECODE_SELECTED   64
#define ATTENTION_DECODE_N_SELECTED 72
#define ATTENTION_DECODE_SEL_STRIDE 80
#define ATTENTION_DECODE_RATIO      84
#define ATTENTION_DECODE_ROPE_DIM   88
#define ATTENTION_DECODE_INV_FREQ   96
#define ATTENTION_DECODE_ROPE_SCALE 104
#define ATTENTION_DECODE_POS0_PTR   112
#define ATTENTION_DECODE_EPS        120
#define ATTENTION_DECODE_KV         128
#define ATTENTION_DECODE_KV_NORM    136
#define ATTENTION_DECODE_PARTIAL    144
#define ATTENTION_DECODE_COUNTER    152
#define ATTENTION_DECODE_BYTES      160
#ifndef NVFP4_PTX
typedef struct {
    uint64_t q;          /* const float * [T, H, D]: queries as wq_b left them (normed, rotated here) */
    uint64_t attn;       /* float * [T, H, D]: the heads' outputs */
    uint32_t H;          /* heads */
    uint32_t D;          /* head dim */
    uint64_t sink;       /* const float * [H]: the attention sinks */
    uint64_t ring;       /* float * [ring_rows, D]: the key ring */
    uint32_t ring_rows;  /* rows of the ring */
    uint32_t window;     /* sliding window */
    uint64_t entries;    /* const float * [C / ratio, D]: compressed entries */
    uint32_t comp_mode;  /* 0 sliding, 1 CSA (selected entries), 2 HCA (every entry) */
    uint64_t selected;   /* const int * [T, sel_stride]: CSA's entries */
    uint64_t n_selected; /* const int * [T] */
    uint32_t sel_stride; /* ints between tokens' selections */
    uint32_t ratio;      /* compress ratio (1 for sliding layers) */
    uint32_t rope_dim;   /* rotated dims */
    uint64_t inv_freq;   /* const float * [rope_dim / 2] */
    float rope_scale;    /* the RoPE attention scale */
    uint64_t pos0_ptr;   /* const int * [1]: the position of token 0 */
    float eps;           /* RMSNorm epsilon */
    uint64_t kv;         /* const float * [D]: decode's new latent, made a key and written to the ring here (0: prefill) */
    uint64_t kv_norm;    /* const float * [D]: its norm weight */
    uint64_t partial;    /* float * [H, Z, D + 4]: split-key partials (Z = gridDim.z) */
    uint64_t counter;    /* uint32 * [H]: blocks of a head done (0 between launches) */
} AttentionDecodeArgs;
#endif

/* embed_streams: token embeddings copied into the HC residual streams. gpu_embed */
#define EMBED_STREAMS_H      0
#define EMBED_STREAMS_EMBED  8
#define EMBED_STREAMS_TOKENS 16
#define EMBED_STREAMS_E      24
#define EMBED_STREAMS_STEP   32
#define EMBED_STREAMS_BYTES  40
#ifndef NVFP4_PTX
typedef struct {
    uint64_t h;      /* float * [T, HC, E]: the streams */
    uint64_t embed;  /* const bf16 * [V, E] */
    uint64_t tokens; /* const int * [T] */
    uint32_t E;      /* hidden size */
    uint32_t unused;
    uint64_t step;   /* uint32 * [1]: the decode step counter, advanced by one (0: none; GemvStream) */
} EmbedStreamsArgs;
#endif

/* swiglu: gate = silu(min(gate, limit)) * clamp(up, -limit, limit), in place. gpu_swiglu */
#define SWIGLU_GATE  0
#define SWIGLU_UP    8
#define SWIGLU_N     16
#define SWIGLU_LIMIT 20
#define SWIGLU_BYTES 24
#ifndef NVFP4_PTX
typedef struct {
    uint64_t gate; /* float * [n], in place */
    uint64_t up;   /* const float * [n] */
    uint32_t n;    /* elements */
    float limit;   /* the clamp */
} SwigluArgs;
#endif

/* hc_mix_partial: a site's mHC mixing sums over slices of the streams. gpu_embed */
#define HC_MIX_PARTIAL_PARTIAL    0
#define HC_MIX_PARTIAL_PARTIAL_SS 8
#define HC_MIX_PARTIAL_H          16
#define HC_MIX_PARTIAL_FN         24
#define HC_MIX_PARTIAL_E          32
#define HC_MIX_PARTIAL_ROWS       36
#define HC_MIX_PARTIAL_SLICE      40
#define HC_MIX_PARTIAL_BYTES      48
#ifndef NVFP4_PTX
typedef struct {
    uint64_t partial;    /* double * [T, rows, S]: partial sums (S = gridDim.x slices) */
    uint64_t partial_ss; /* double * [T, S]: partial sums of squares */
    uint64_t h;          /* const float * [T, HC, E]: the streams */
    uint64_t fn;         /* const float * [rows, HC * E]: the site's mixing weights */
    uint32_t E;          /* hidden size */
    uint32_t rows;       /* mixing rows: (2 + HC) * HC for a block site, HC for the head */
    uint32_t slice;      /* columns of E a block sums */
} HcMixPartialArgs;
#endif

/* hc_post_mix: [MoE combine +] hc_post over a slice, then the next site's sums. gpu_hc_post_mix */
#define HC_POST_MIX_PARTIAL      0
#define HC_POST_MIX_PARTIAL_SS   8
#define HC_POST_MIX_H            16
#define HC_POST_MIX_FN           24
#define HC_POST_MIX_E            32
#define HC_POST_MIX_ROWS         36
#define HC_POST_MIX_SLICE        40
#define HC_POST_MIX_BLOCK_OUT    48
#define HC_POST_MIX_POST         56
#define HC_POST_MIX_COMB         64
#define HC_POST_MIX_EXPERT_OUT   72
#define HC_POST_MIX_ROUTE_WEIGHT 80
#define HC_POST_MIX_SLOT_ROW     88
#define HC_POST_MIX_K            96
#define HC_POST_MIX_BYTES        104
#ifndef NVFP4_PTX
typedef struct {
    uint64_t partial;      /* double * [T, rows, S] */
    uint64_t partial_ss;   /* double * [T, S] */
    uint64_t h;            /* float * [T, HC, E]: the streams, updated */
    uint64_t fn;           /* const float * [rows, HC * E]: the next site's mixing weights */
    uint32_t E;            /* hidden size */
    uint32_t rows;         /* the next site's mixing rows */
    uint32_t slice;        /* columns of E a block takes */
    uint64_t block_out;    /* const float * [T, E]: the sub-block's output */
    uint64_t post;         /* const float * [T, HC] */
    uint64_t comb;         /* const float * [T, HC, HC] */
    uint64_t expert_out;   /* const float * [T * K, E]: routed outputs to combine (0: none) */
    uint64_t route_weight; /* const float * [T, K] */
    uint64_t slot_row;     /* const int * [T * K]: each slot's row of expert_out */
    uint32_t K;            /* experts a token */
} HcPostMixArgs;
#endif

/* rank_partial: a rank's part of a MoE sub-block's output, published to the other ranks (several
   GPUs). gpu_rank_reduce */
#define RANK_PARTIAL_PARTIAL      0
#define RANK_PARTIAL_BLOCK_OUT    8
#define RANK_PARTIAL_EXPERT_OUT   16
#define RANK_PARTIAL_ROUTE_WEIGHT 24
#define RANK_PARTIAL_SLOT_ROW     32
#define RANK_PARTIAL_CHOSEN       40
#define RANK_PARTIAL_PUBLISHED    48
#define RANK_PARTIAL_E            56
#define RANK_PARTIAL_K            60
#define RANK_PARTIAL_FIRST        64
#define RANK_PARTIAL_END          68
#define RANK_PARTIAL_SHARED       72
#define RANK_PARTIAL_BYTES        80
#ifndef NVFP4_PTX
typedef struct {
    uint64_t partial;      /* float * [T, E]: the rank's part */
    uint64_t block_out;    /* const float * [T, E]: the shared expert's output (read when shared) */
    uint64_t expert_out;   /* const float * [T*K, E]: the routed experts' rows */
    uint64_t route_weight; /* const float * [T, K] */
    uint64_t slot_row;     /* const int * [T*K]: slot k's row of expert_out */
    uint64_t chosen;       /* const int * [T, K]: the routing's experts */
    uint64_t published;    /* uint32 * [1]: the rank's count of published blocks (+1 a block) */
    uint32_t E, K;
    uint32_t first, end;   /* the rank's routed experts [first, end) */
    uint32_t shared;       /* 1: add block_out (the rank computes some of the shared expert's rows) */
    uint32_t unused;
} RankPartialArgs;
#endif

/* rank_sum: the ranks' parts summed in rank order once every rank has published its own.
   gpu_rank_reduce */
#define RANK_SUM_OUT       0
#define RANK_SUM_PARTIALS  8
#define RANK_SUM_PUBLISHED 72
#define RANK_SUM_RANKS     136
#define RANK_SUM_RANK      140
#define RANK_SUM_N         144
#define RANK_SUM_BYTES     152
#ifndef NVFP4_PTX
typedef struct {
    uint64_t out;           /* float * [n]: the sum */
    uint64_t partials[8];   /* const float * [n] each: rank r's part (GPUS_MAX entries) */
    uint64_t published[8];  /* const uint32 * [1] each: rank r's published count */
    uint32_t ranks, rank;   /* how many; this one */
    uint32_t n;             /* floats */
    uint32_t unused;
} RankSumArgs;
#endif

/* rank_publish: a rank's count advanced once its earlier kernels are done. gpu_rank_gather */
#define RANK_PUBLISH_PUBLISHED 0
#define RANK_PUBLISH_BYTES     8
#ifndef NVFP4_PTX
typedef struct {
    uint64_t published;     /* uint32 * [1]: the rank's published count (+1) */
} RankPublishArgs;
#endif

/* rank_gather: every rank's columns of the logits copied in once each has published them.
   gpu_rank_gather */
#define RANK_GATHER_OUT       0
#define RANK_GATHER_SOURCES   8
#define RANK_GATHER_PUBLISHED 72
#define RANK_GATHER_BOUNDS    136
#define RANK_GATHER_RANKS     172
#define RANK_GATHER_RANK      176
#define RANK_GATHER_V         180
#define RANK_GATHER_T         184
#define RANK_GATHER_BYTES     192
#ifndef NVFP4_PTX
typedef struct {
    uint64_t out;           /* float * [T, V]: this rank's logits */
    uint64_t sources[8];    /* const float * [T, V] each: rank r's logits (GPUS_MAX entries) */
    uint64_t published[8];  /* const uint32 * [1] each: rank r's published count */
    uint32_t bounds[9];     /* rank r's columns: [bounds[r], bounds[r + 1]) */
    uint32_t ranks, rank;   /* how many; this one */
    uint32_t V, T;          /* columns, rows */
    uint32_t unused;
} RankGatherArgs;
#endif

/* hc_finish: mHC finish of a site: pre, post, Sinkhorn comb, collapse, RMSNorm. gpu_hc_finish */
#define HC_FINISH_X              0
#define HC_FINISH_POST_OUT       8
#define HC_FINISH_COMB_OUT       16
#define HC_FINISH_H              24
#define HC_FINISH_PARTIAL        32
#define HC_FINISH_PARTIAL_SS     40
#define HC_FINISH_BASE           48
#define HC_FINISH_SCALE          56
#define HC_FINISH_NORM_WEIGHT    64
#define HC_FINISH_E              72
#define HC_FINISH_ROWS           76
#define HC_FINISH_S              80
#define HC_FINISH_T0             84
#define HC_FINISH_HC_EPS         88
#define HC_FINISH_RMS_EPS        92
#define HC_FINISH_SINKHORN_ITERS 96
#define HC_FINISH_BYTES          104
#ifndef NVFP4_PTX
typedef struct {
    uint64_t x;              /* float * [n, E]: the site's input, normed */
    uint64_t post_out;       /* float * [n, HC] (0: the head) */
    uint64_t comb_out;       /* float * [n, HC, HC] (0: the head) */
    uint64_t h;              /* const float * [T, HC, E]: the streams */
    uint64_t partial;        /* const double * [T, rows, S] */
    uint64_t partial_ss;     /* const double * [T, S] */
    uint64_t base;           /* const float * [rows] */
    uint64_t scale;          /* const float * [3] (the head: [1]) */
    uint64_t norm_weight;    /* const float * [E]: the RMSNorm weight */
    uint32_t E;              /* hidden size */
    uint32_t rows;           /* mixing rows */
    uint32_t S;              /* slices of the sums */
    uint32_t t0;             /* first token (block b finishes token t0 + b) */
    float hc_eps;            /* mHC epsilon */
    float rms_eps;           /* RMSNorm epsilon */
    uint32_t sinkhorn_iters; /* Sinkhorn iterations */
} HcFinishArgs;
#endif

/* route_tokens: the MoE router: scores, experts, weights, slots grouped by expert. gpu_moe_prefill */
#define ROUTE_TOKENS_ROUTER         0
#define ROUTE_TOKENS_BIAS           8
#define ROUTE_TOKENS_TID2EID        16
#define ROUTE_TOKENS_TOKENS         24
#define ROUTE_TOKENS_CHOSEN         32
#define ROUTE_TOKENS_ROUTE_WEIGHT   40
#define ROUTE_TOKENS_EXPERT_START   48
#define ROUTE_TOKENS_SLOT_ORDER     56
#define ROUTE_TOKENS_SLOT_ROW       64
#define ROUTE_TOKENS_ACTIVE_EXPERTS 72
#define ROUTE_TOKENS_ACTIVE_COUNT   80
#define ROUTE_TOKENS_T              88
#define ROUTE_TOKENS_X              92
#define ROUTE_TOKENS_K              96
#define ROUTE_TOKENS_ROUTED_SCALING 100
#define ROUTE_TOKENS_BYTES          104
#ifndef NVFP4_PTX
typedef struct {
    uint64_t router;         /* float * [T, X]: the gate's logits (scores written back) */
    uint64_t bias;           /* const float * [X] (0: a hash layer) */
    uint64_t tid2eid;        /* const int * [V, K]: a hash layer's table (0: routed) */
    uint64_t tokens;         /* const int * [T] */
    uint64_t chosen;         /* int * [T, K] */
    uint64_t route_weight;   /* float * [T, K] */
    uint64_t expert_start;   /* int * [X + 1]: first slot row of each expert */
    uint64_t slot_order;     /* int * [T * K]: slots in expert order */
    uint64_t slot_row;       /* int * [T * K]: its inverse */
    uint64_t active_experts; /* int * [X]: experts with slots */
    uint64_t active_count;   /* int * [1] */
    uint32_t T;              /* tokens */
    uint32_t X;              /* routed experts */
    uint32_t K;              /* experts a token */
    float routed_scaling;    /* routed_scaling_factor */
} RouteTokensArgs;
#endif

/* sample_token: repeat penalty, greedy, top-k, min-p, nucleus sampling on the device; advances
   the position. gpu_sample */
#define SAMPLE_TOKEN_LOGITS      0
#define SAMPLE_TOKEN_PROBS       8
#define SAMPLE_TOKEN_V           16
#define SAMPLE_TOKEN_TEMPERATURE 20
#define SAMPLE_TOKEN_TOP_P       24
#define SAMPLE_TOKEN_RNG         32
#define SAMPLE_TOKEN_OUT_TOKEN   40
#define SAMPLE_TOKEN_TOKENS      48
#define SAMPLE_TOKEN_POS0_PTR    56
#define SAMPLE_TOKEN_ADVANCE     64
#define SAMPLE_TOKEN_TOP_K       68
#define SAMPLE_TOKEN_LOG_MIN_P   72
#define SAMPLE_TOKEN_PENALTY     76
#define SAMPLE_TOKEN_RECENT      80
#define SAMPLE_TOKEN_N_FED       88
#define SAMPLE_TOKEN_LAST_N      96
#define SAMPLE_TOKEN_BYTES       104
#ifndef NVFP4_PTX
typedef struct {
    uint64_t logits;    /* const float * [V]: the row sampled */
    uint64_t probs;     /* float * [V]: scratch */
    uint32_t V;         /* vocabulary size */
    float temperature;  /* 0: greedy */
    float top_p;        /* nucleus mass */
    uint64_t rng;       /* uint64 * [1]: the sampler's state */
    uint64_t out_token; /* int * [1]: the token */
    uint64_t tokens;    /* int * [1]: the next step's input (the token again) */
    uint64_t pos0_ptr;  /* int * [1]: the position, advanced when `advance` */
    uint32_t advance;   /* 1: a decode step */
    uint32_t top_k;     /* keep the top_k largest logits (0: all) */
    float log_min_p;    /* logf(min_p): drop logits below max + log_min_p (-inf: off) */
    float penalty;      /* repeat penalty (1: off) */
    uint64_t recent;    /* int * [last_n]: ring of the tokens fed, the sampled one appended */
    uint64_t n_fed;     /* uint32 * [1]: tokens fed so far (the ring's write position) */
    uint32_t last_n;    /* the ring's size (0: no penalty, nothing appended) */
} SampleTokenArgs;
#endif

/* gemm_prefill: y = x W^T on the tensor cores for prefill chunks. gpu_gemm */
#define GEMM_PREFILL_Y               0
#define GEMM_PREFILL_X               8
#define GEMM_PREFILL_WEIGHT          16
#define GEMM_PREFILL_SCALE           24
#define GEMM_PREFILL_GLOBAL_SCALE    32
#define GEMM_PREFILL_FORMAT          36
#define GEMM_PREFILL_SCALE_IS_F32    40
#define GEMM_PREFILL_T               44
#define GEMM_PREFILL_COLS            48
#define GEMM_PREFILL_ROW0            52
#define GEMM_PREFILL_NROWS           56
#define GEMM_PREFILL_X_STRIDE        60
#define GEMM_PREFILL_Y_STRIDE        64
#define GEMM_PREFILL_ACCUMULATE      68
#define GEMM_PREFILL_ROW_BYTES       72
#define GEMM_PREFILL_BYTES           80
#ifndef NVFP4_PTX
typedef struct {
    uint64_t y;               /* float *y            [T rows, y_stride floats apart] */
    uint64_t x;               /* const float *x      [T rows, x_stride floats apart] */
    uint64_t weight;          /* const void *weight  (codes / e4m3 / bf16, row-major) */
    uint64_t scale;           /* const void *scale   (block scales; unused for BF16) */
    float global_scale;       /* NVFP4 weight_scale_2 (ignored otherwise) */
    uint32_t format;          /* WeightFormat: 0 BF16, 2 FP8, 3 MXFP4, 4 NVFP4 */
    uint32_t scale_is_f32;    /* FP8 only: 1 = f32 block scales, 0 = e8m0 bytes */
    uint32_t T;               /* tokens */
    uint32_t cols;            /* inner dimension (W columns) */
    uint32_t row0;            /* first W row */
    uint32_t nrows;           /* W rows used = y columns written */
    uint32_t x_stride;        /* floats between x rows */
    uint32_t y_stride;        /* floats between y rows */
    uint32_t accumulate;      /* 0: y = product; 1: y += product */
    uint32_t row_bytes;       /* bytes between W rows (the GEMV's padded rows, see below) */
} GemmPrefillArgs;
#endif

/* gather_rows: the MoE slots' input rows in expert order. gpu_moe_prefill */
#define GATHER_ROWS_DST        0
#define GATHER_ROWS_SRC        8
#define GATHER_ROWS_SLOT_ORDER 16
#define GATHER_ROWS_K          24
#define GATHER_ROWS_E          28
#define GATHER_ROWS_BYTES      32
#ifndef NVFP4_PTX
typedef struct {
    uint64_t dst;        /* float * [T * K, E] */
    uint64_t src;        /* const float * [T, E] */
    uint64_t slot_order; /* const int * [T * K] */
    uint32_t K;          /* experts a token */
    uint32_t E;          /* hidden size */
} GatherRowsArgs;
#endif

/* fill_random: valid random weights of one kind (the benchmark's model). gpu_fill_random */
#define FILL_RANDOM_DST     0
#define FILL_RANDOM_N_WORDS 8
#define FILL_RANDOM_SEED    16
#define FILL_RANDOM_KIND    20
#define FILL_RANDOM_BYTES   24
#ifndef NVFP4_PTX
typedef struct {
    uint64_t dst;     /* uint32 * [n_words] */
    uint64_t n_words; /* words to write */
    uint32_t seed;    /* the hash's seed */
    uint32_t kind;    /* FillKind */
} FillRandomArgs;
#endif

#endif
