#!/usr/bin/env python3
"""Build the small random DeepSeek V4 checkpoints in testdata/ and the transformers logits that
`make test` compares nvfp4 against.

Run on a machine with torch + transformers 5.17 + tokenizers (a CPU is enough):
    python3 tools/gen_fixtures.py testdata/tokenizer.json.gz OUTDIR [MODEL ...]

tiny-a, tiny-b and tiny-c were made on a GPU machine with torch 2.11 + transformers 5.17. tiny-d
was made on a CPU only, in a venv outside the repository, with exactly these pip versions:
    python 3.11.7, torch==2.11.0 (PyPI's default Linux wheel, 2.11.0+cu130, run on the CPU: it
    needs its nvidia-* wheels present to import, though no GPU is used), transformers==5.17.0,
    tokenizers==0.23.3, safetensors==0.8.0, numpy==2.4.6
    python3 -m venv ../venv-fixture
    ../venv-fixture/bin/pip install torch==2.11.0 transformers==5.17.0 safetensors tokenizers
    ../venv-fixture/bin/python tools/gen_fixtures.py testdata/tokenizer.json.gz testdata tiny-d
On that CPU setup tiny-a/b/c regenerate with byte-identical weights, tokenizers, prompts, rope.bin
and greedy tokens; only their reference logits differ, by float32 rounding (<= 1.1e-6 of a row's
largest logit), so the committed GPU-made references were kept.

For each model it writes OUTDIR/NAME/ with
    config.json                official DeepSeek V4 keys (legacy compress_ratios, num_hash_layers,
                               qk_rope_head_dim, rope_scaling, quantization_config)
    tokenizer.json             the real DeepSeek tokenizer cut down to a small vocabulary
    model.safetensors          or model-0000N-of-0000M.safetensors + model.safetensors.index.json,
                               official tensor names, a mix of BF16 / F32 / FP8 / MXFP4 / NVFP4
    reference.bin              what transformers computed (float32 on the dequantized weights):
                               int32 n_prompt, n_steps, vocab; int32 ids[n_prompt + n_steps + 1]
                               (prompt, then the greedy tokens); float32 logits[n_prompt + n_steps][vocab]
                               (a row for each prompt position, then one per fed-back greedy token)
    rope.bin                   float32 inverse frequencies of the "main" then "compress" RoPE
The quantized tensors hold real FP8/FP4 codes; transformers runs on exactly their dequantized
values, so the only difference left between it and nvfp4's CPU path is float32 rounding order.
"""
import gzip, json, math, os, struct, sys

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

torch.manual_seed(0)
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)

PROMPT_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way. In short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France. In both countries it was "
    "clearer than crystal to the lords of the State preserves of loaves and fishes, that things "
    "in general were settled for ever. It was the year of Our Lord one thousand seven hundred and "
    "seventy-five. Spiritual revelations were conceded to England at that favoured period."
)

# ----------------------------------------------------------------------------- model specs
MODELS = [
    dict(
        name="tiny-a", seed=1, shards=1, vocab=1024, hidden=64, layers=8, heads=4, head_dim=64,
        rope_dim=16, q_lora=32, o_groups=2, o_lora=32, experts=8, topk=2, moe_inter=32,
        window=16, ratios=[0, 0, 4, 128, 4, 128, 4, 128], hash_layers=2, index_heads=16,
        index_dim=32, index_topk=4, prompt_len=300, steps=16, fp8_scale="e8m0",
        # per-linear formats (default fp8 for attention, nvfp4 for routed experts, bf16 else)
        formats={"layers.2.attn.wo_b": "nvfp4", "layers.3.attn.wq_a": "mxfp4",
                 "layers.4.ffn.shared_experts.w1": "mxfp4", "layers.4.ffn.shared_experts.w3": "nvfp4",
                 "layers.5.ffn.experts": "mxfp4", "layers.1.attn.wkv": "bf16"},
    ),
    dict(
        name="tiny-b", seed=2, shards=3, vocab=768, hidden=128, layers=6, heads=2, head_dim=128,
        rope_dim=32, q_lora=64, o_groups=2, o_lora=64, experts=6, topk=3, moe_inter=64,
        window=24, ratios=[0, 0, 128, 4, 4, 128], hash_layers=1, index_heads=16,
        index_dim=64, index_topk=3, prompt_len=270, steps=16, fp8_scale="f32",
        formats={"layers.0.attn.wq_b": "nvfp4", "layers.2.ffn.shared_experts.w2": "nvfp4",
                 "layers.3.attn.wo_a": "mxfp4", "layers.4.ffn.experts": "mxfp4",
                 "layers.5.attn.indexer.wq_b": "bf16"},
    ),
    # the newer config keys (layer_types, compress_rates with an HCA rate of 16, mlp_layer_types,
    # nested rope_parameters), a tight SwiGLU clamp that actually clips, other Sinkhorn and
    # routing constants, and a decode long enough to emit CSA and HCA entries while decoding
    dict(
        name="tiny-c", seed=3, shards=2, vocab=512, hidden=64, layers=5, heads=4, head_dim=64,
        rope_dim=16, q_lora=32, o_groups=4, o_lora=16, experts=4, topk=2, moe_inter=32,
        window=8, ratios=[0, 4, 16, 4, 16], hash_layers=1, index_heads=16, index_dim=32,
        index_topk=3, prompt_len=90, steps=40, fp8_scale="e8m0", modern=True,
        swiglu_limit=0.3, sinkhorn_iters=7, routed_scaling=2.5,
        formats={"layers.1.attn.wkv": "nvfp4", "layers.2.attn.wq_a": "mxfp4"},
    ),
    # every size distinct from every other, so that a buffer stepped by the wrong size cannot pass:
    # hidden 96, head_dim 80, rope 24, q_lora 48, o_lora 20 (x 3 groups = 60, group input 160),
    # moe_inter 64, index_head_dim 40, 12 index heads, vocab 600 and window 10 (not powers of two);
    # five compressed layers with an HCA rate of 8, index_topk 6 well below the ~40 CSA entries
    # of the prompt, FP8 with float32 block scales over partial 128-blocks in both directions
    dict(
        name="tiny-d", seed=4, shards=2, vocab=600, hidden=96, layers=6, heads=6, head_dim=80,
        rope_dim=24, q_lora=48, o_groups=3, o_lora=20, experts=5, topk=2, moe_inter=64,
        window=10, ratios=[0, 4, 8, 4, 8, 4], hash_layers=2, index_heads=12, index_dim=40,
        index_topk=6, prompt_len=157, steps=30, fp8_scale="f32", modern=True,
        swiglu_limit=0.8, sinkhorn_iters=11, routed_scaling=1.8,
        formats={"layers.0.attn.wkv": "nvfp4", "layers.1.attn.wo_a": "mxfp4",
                 "layers.2.attn.wq_a": "mxfp4", "layers.3.ffn.shared_experts.w1": "mxfp4",
                 "layers.3.ffn.shared_experts.w3": "nvfp4", "layers.4.ffn.experts": "mxfp4",
                 "layers.5.ffn.shared_experts.w2": "nvfp4", "layers.5.attn.indexer.wq_b": "bf16"},
    ),
]


# ----------------------------------------------------------------------------- tokenizer
def byte_level_alphabet():
    """GPT-2's byte -> printable character map, in byte order."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def small_tokenizer(full, n_bpe):
    """The real DeepSeek tokenizer cut to its first merges: BOS/EOS/pad at 0..2, the 256 byte
    symbols, then merged tokens in merge order until n_bpe tokens, then the chat tokens."""
    vocab = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜▁pad▁｜>": 2}
    for ch in byte_level_alphabet():
        vocab[ch] = len(vocab)
    merges = []
    for m in full["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if len(vocab) >= n_bpe:
            break
        if a in vocab and b in vocab and (a + b) not in vocab and (a + b) in full["model"]["vocab"]:
            vocab[a + b] = len(vocab)
            merges.append(f"{a} {b}")
    added = []
    for content in ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]:
        added.append(dict(id=vocab[content], content=content))
    for content in ["<｜User｜>", "<｜Assistant｜>"]:
        added.append(dict(id=len(vocab), content=content))
        vocab[content] = len(vocab)
    tok = dict(full)
    tok["added_tokens"] = [dict(a, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                special=True) for a in added]
    tok["model"] = dict(full["model"], vocab=vocab, merges=merges)
    return tok


# ----------------------------------------------------------------------------- quantizers
def round_e2m1(x):
    """Nearest e2m1 code (4 bits: sign in bit 3) for each float."""
    mag = np.abs(x)
    idx = np.abs(mag[..., None] - E2M1).argmin(-1).astype(np.uint8)
    return idx | ((x < 0) & (idx > 0)).astype(np.uint8) << 3


def decode_e2m1(codes):
    v = E2M1[codes & 7]
    return np.where(codes & 8, -v, v).astype(np.float32)


def pack_nibbles(codes):
    """[out, in] 4-bit codes -> [out, in/2] bytes, low nibble = even column."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def quant_fp8_block(w, scale_kind):
    out, inp = w.shape
    bo, bi = math.ceil(out / 128), math.ceil(inp / 128)
    scales = np.zeros((bo, bi), np.float32)
    deq = np.zeros_like(w)
    codes = np.zeros(w.shape, np.uint8)
    for i in range(bo):
        for j in range(bi):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            amax = max(float(np.abs(blk).max()), 1e-12)
            s = 2.0 ** math.ceil(math.log2(amax / 448)) if scale_kind == "e8m0" else amax / 448
            q = torch.from_numpy(blk / s).to(torch.float8_e4m3fn)
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = q.view(torch.uint8).numpy()
            deq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = q.float().numpy() * s
            scales[i, j] = s
    if scale_kind == "e8m0":
        scale = ("scale", "F8_E8M0", (np.log2(scales) + 127).astype(np.uint8))
    else:
        scale = ("weight_scale_inv", "F32", scales)
    return [("weight", "F8_E4M3", codes), scale], deq


def quant_mxfp4(w):
    out, inp = w.shape
    g = w.reshape(out, inp // 32, 32)
    amax = np.maximum(np.abs(g).max(-1), 1e-12)
    exp = np.ceil(np.log2(amax / 6)).astype(np.int32)
    s = (2.0 ** exp).astype(np.float32)
    codes = round_e2m1(g / s[..., None]).reshape(out, inp)
    deq = (decode_e2m1(codes).reshape(out, inp // 32, 32) * s[..., None]).reshape(out, inp)
    return [("weight", "I8", pack_nibbles(codes).view(np.int8)),
            ("scale", "F8_E8M0", (exp + 127).astype(np.uint8))], deq


def quant_nvfp4(w):
    out, inp = w.shape
    g = w.reshape(out, inp // 16, 16)
    global_scale = np.float32(np.abs(w).max() / (448 * 6))
    block = np.abs(g).max(-1) / 6 / global_scale
    block_e4m3 = torch.from_numpy(block.astype(np.float32)).to(torch.float8_e4m3fn)
    bs = block_e4m3.float().numpy() * global_scale
    bs_safe = np.where(bs == 0, 1, bs)
    codes = round_e2m1(g / bs_safe[..., None]).reshape(out, inp)
    deq = (decode_e2m1(codes).reshape(out, inp // 16, 16) * bs[..., None]).reshape(out, inp)
    return [("weight", "U8", pack_nibbles(codes)),
            ("weight_scale", "F8_E4M3", block_e4m3.view(torch.uint8).numpy()),
            ("weight_scale_2", "F32", np.array(global_scale, np.float32)),
            ("input_scale", "F32", np.array(np.abs(w).max() / 10, np.float32))], deq


def bf16(w):
    t = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16), t.float().numpy()


# ----------------------------------------------------------------------------- checkpoint
def official_tensors(spec, rng):
    """Every official tensor of the model as name -> (float32 array, format)."""
    H, L, nh, D = spec["hidden"], spec["layers"], spec["heads"], spec["head_dim"]
    V, E, I = spec["vocab"], spec["experts"], spec["moe_inter"]
    Di, nI = spec["index_dim"], spec["index_heads"]
    lin = lambda o, i, gain=1.0: rng.normal(0, gain / math.sqrt(i), (o, i)).astype(np.float32)
    norm = lambda n: rng.normal(1, 0.1, n).astype(np.float32)
    t = {}
    t["embed.weight"] = (rng.normal(0, 1, (V, H)).astype(np.float32), "bf16")
    t["head.weight"] = (lin(V, H, 2.0), "bf16")
    t["norm.weight"] = (norm(H), "bf16")
    t["hc_head_fn"] = (rng.normal(0, 0.1, (4, 4 * H)).astype(np.float32), "f32")
    t["hc_head_base"] = (rng.normal(0, 0.5, 4).astype(np.float32), "f32")
    t["hc_head_scale"] = (rng.uniform(0.5, 1.5, 1).astype(np.float32), "f32")
    for l in range(L):
        p = f"layers.{l}."
        ratio = spec["ratios"][l]
        for site in ("attn", "ffn"):
            t[p + f"hc_{site}_fn"] = (rng.normal(0, 0.1, (24, 4 * H)).astype(np.float32), "f32")
            t[p + f"hc_{site}_base"] = (rng.normal(0, 0.5, 24).astype(np.float32), "f32")
            t[p + f"hc_{site}_scale"] = (rng.uniform(0.5, 1.5, 3).astype(np.float32), "f32")
        t[p + "attn_norm.weight"] = (norm(H), "bf16")
        t[p + "ffn_norm.weight"] = (norm(H), "bf16")
        a = p + "attn."
        t[a + "wq_a.weight"] = (lin(spec["q_lora"], H), "fp8")
        t[a + "q_norm.weight"] = (norm(spec["q_lora"]), "bf16")
        t[a + "wq_b.weight"] = (lin(nh * D, spec["q_lora"]), "fp8")
        t[a + "wkv.weight"] = (lin(D, H), "fp8")
        t[a + "kv_norm.weight"] = (norm(D), "bf16")
        t[a + "wo_a.weight"] = (lin(spec["o_groups"] * spec["o_lora"], nh * D // spec["o_groups"]), "fp8")
        t[a + "wo_b.weight"] = (lin(H, spec["o_groups"] * spec["o_lora"]), "fp8")
        t[a + "attn_sink"] = (rng.normal(0, 1, nh).astype(np.float32), "f32")
        if ratio:
            coff = 2 if ratio == 4 else 1
            c = a + "compressor."
            t[c + "wkv.weight"] = (lin(coff * D, H), "bf16")
            t[c + "wgate.weight"] = (lin(coff * D, H), "bf16")
            t[c + "ape"] = (rng.normal(0, 0.5, (ratio, coff * D)).astype(np.float32), "f32")
            t[c + "norm.weight"] = (norm(D), "bf16")
        if ratio == 4:
            x = a + "indexer."
            t[x + "wq_b.weight"] = (lin(nI * Di, spec["q_lora"]), "fp8")
            t[x + "weights_proj.weight"] = (lin(nI, H), "bf16")
            t[x + "compressor.wkv.weight"] = (lin(2 * Di, H), "bf16")
            t[x + "compressor.wgate.weight"] = (lin(2 * Di, H), "bf16")
            t[x + "compressor.ape"] = (rng.normal(0, 0.5, (4, 2 * Di)).astype(np.float32), "f32")
            t[x + "compressor.norm.weight"] = (norm(Di), "bf16")
        f = p + "ffn."
        t[f + "gate.weight"] = (lin(E, H), "bf16")
        if l < spec["hash_layers"]:
            tid2eid = np.stack([rng.choice(E, spec["topk"], replace=False) for _ in range(V)])
            t[f + "gate.tid2eid"] = (tid2eid.astype(np.int64), "i64")
        else:
            t[f + "gate.bias"] = (rng.normal(0, 0.1, E).astype(np.float32), "f32")
        for e in range(E):
            x = f + f"experts.{e}."
            t[x + "w1.weight"] = (lin(I, H), "nvfp4")
            t[x + "w3.weight"] = (lin(I, H, 3.0), "nvfp4")   # unequal w1/w3 global scales
            t[x + "w2.weight"] = (lin(H, I), "nvfp4")
        for w, (o, i) in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            t[f + f"shared_experts.{w}.weight"] = (lin(o, i), "fp8")
    for prefix, fmt in spec["formats"].items():   # per-model overrides of linear weights
        for name, (w, _) in t.items():
            if name.startswith(prefix + ".") and name.endswith(".weight") and w.ndim == 2:
                t[name] = (w, fmt)
    return t


def encode_tensor(name, w, fmt, fp8_scale):
    """name -> list of (stored name, dtype, array) and the dequantized float32 weight."""
    base = name[:-len(".weight")] if name.endswith(".weight") else name
    if fmt == "f32":
        return [(name, "F32", w.astype(np.float32))], w
    if fmt == "i64":
        return [(name, "I64", w)], w
    if fmt == "bf16":
        bits, deq = bf16(w)
        return [(name, "BF16", bits)], deq
    parts, deq = {"fp8": lambda: quant_fp8_block(w, fp8_scale), "mxfp4": lambda: quant_mxfp4(w),
                  "nvfp4": lambda: quant_nvfp4(w)}[fmt]()
    return [(f"{base}.{suffix}", dt, arr) for suffix, dt, arr in parts], deq


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, dtype, arr in tensors:
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = dict(dtype=dtype, shape=list(arr.shape), data_offsets=[offset, offset + len(data)])
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def hf_name(name):
    """Official tensor name -> transformers parameter name (conversion_mapping's deepseek_v4)."""
    if name == "head.weight":
        return "lm_head.weight"
    leaf = {"embed.weight": "embed_tokens.weight", "hc_head_fn": "hc_head.hc_fn",
            "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale"}
    if name in leaf:
        return "model." + leaf[name]
    n = name
    for old, new in [(".attn.indexer.compressor.", ".self_attn.compressor.indexer."),
                     (".attn.indexer.weights_proj.", ".self_attn.compressor.indexer.scorer.weights_proj."),
                     (".attn.indexer.wq_b.", ".self_attn.compressor.indexer.q_b_proj."),
                     (".attn.", ".self_attn."), (".ffn.", ".mlp."),
                     (".attn_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
                     (".hc_attn_", ".attn_hc."), (".hc_ffn_", ".ffn_hc."), (".attn_sink", ".sinks"),
                     (".compressor.norm.", ".compressor.kv_norm."), (".indexer.norm.", ".indexer.kv_norm."),
                     (".ape", ".position_bias"), (".wq_a.", ".q_a_proj."), (".wq_b.", ".q_b_proj."),
                     (".wkv.", ".kv_proj."), (".wgate.", ".gate_proj."), (".wo_a.", ".o_a_proj."),
                     (".wo_b.", ".o_b_proj."), (".q_norm.", ".q_a_norm."),
                     (".gate.bias", ".gate.e_score_correction_bias"),
                     (".shared_experts.w1.", ".shared_experts.gate_proj."),
                     (".shared_experts.w2.", ".shared_experts.down_proj."),
                     (".shared_experts.w3.", ".shared_experts.up_proj.")]:
        n = n.replace(old, new)
    return "model." + n


def config_json(spec):
    cfg = legacy_config_json(spec)
    if spec.get("modern"):
        names = {0: "sliding_attention", 4: "compressed_sparse_attention"}
        for legacy in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling"):
            del cfg[legacy]
        cfg["layer_types"] = [names.get(r, "heavily_compressed_attention") for r in spec["ratios"]]
        cfg["compress_rates"] = {"compressed_sparse_attention": 4,
                                 "heavily_compressed_attention": max(spec["ratios"])}
        cfg["mlp_layer_types"] = ["hash_moe"] * spec["hash_layers"] + ["moe"] * (spec["layers"] - spec["hash_layers"])
        cfg["partial_rotary_factor"] = spec["rope_dim"] / spec["head_dim"]
        factor = spec["rope_dim"] / spec["head_dim"]
        cfg["rope_parameters"] = {   # no attention_factor: transformers derives YaRN's mscale then
            "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor},
            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16, "partial_rotary_factor": factor,
                         "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}}
    cfg["swiglu_limit"] = spec.get("swiglu_limit", 10.0)
    cfg["hc_sinkhorn_iters"] = spec.get("sinkhorn_iters", 20)
    cfg["routed_scaling_factor"] = spec.get("routed_scaling", 1.5)
    return cfg


def legacy_config_json(spec):
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": spec["vocab"], "hidden_size": spec["hidden"],
        "moe_intermediate_size": spec["moe_inter"], "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"], "num_key_value_heads": 1, "head_dim": spec["head_dim"],
        "qk_rope_head_dim": spec["rope_dim"], "q_lora_rank": spec["q_lora"],
        "o_groups": spec["o_groups"], "o_lora_rank": spec["o_lora"],
        "n_routed_experts": spec["experts"], "n_shared_experts": 1, "num_experts_per_tok": spec["topk"],
        "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5,
        "num_hash_layers": spec["hash_layers"], "swiglu_limit": 10.0, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
        "sliding_window": spec["window"], "compress_ratios": spec["ratios"],
        "index_n_heads": spec["index_heads"], "index_head_dim": spec["index_dim"],
        "index_topk": spec["index_topk"], "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }


def load_into_hf(model, spec, deq):
    """Copy the dequantized official tensors into the transformers model (strict)."""
    sd = {}
    I = spec["moe_inter"]
    for l in range(spec["layers"]):
        f = f"layers.{l}.ffn.experts."
        gu = np.stack([np.concatenate([deq.pop(f + f"{e}.w1.weight"), deq.pop(f + f"{e}.w3.weight")])
                       for e in range(spec["experts"])])
        down = np.stack([deq.pop(f + f"{e}.w2.weight") for e in range(spec["experts"])])
        assert gu.shape[1] == 2 * I
        sd[f"model.layers.{l}.mlp.experts.gate_up_proj"] = torch.from_numpy(gu)
        sd[f"model.layers.{l}.mlp.experts.down_proj"] = torch.from_numpy(down)
    for name, w in deq.items():
        sd[hf_name(name)] = torch.from_numpy(np.ascontiguousarray(w))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "inv_freq" not in m]
    assert not missing and not unexpected, (missing, unexpected)


def check_indexer_margins(model):
    """Refuse a model whose indexer top-k is decided by a near-tie (the choice would then hinge on
    rounding order): hook every indexer scorer and measure the gap at the top-k boundary."""
    gaps = []

    def hook(module, args, out):
        k = module.topk_for_check
        s = out.float()
        for row in s.reshape(-1, s.shape[-1]):
            finite = row[torch.isfinite(row)]
            if finite.numel() > k:
                v = finite.sort(descending=True).values
                gaps.append(float((v[k - 1] - v[k]).abs() / (v.abs().max() + 1e-30)))
    handles = []
    for layer in model.model.layers:
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            comp.indexer.scorer.topk_for_check = comp.indexer.index_topk
            handles.append(comp.indexer.scorer.register_forward_hook(hook))
    return gaps, handles


def run_reference(model, ids, steps):
    gaps, handles = check_indexer_margins(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        rows = [out.logits[0].float()]
        past = out.past_key_values
        tokens = list(ids)
        nxt = int(out.logits[0, -1].argmax())
        for _ in range(steps):
            tokens.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0].float())
            nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
    for h in handles:
        h.remove()
    logits = torch.cat(rows).numpy()
    # the greedy choices must not hinge on rounding either
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = float(((top2[:, 1] - top2[:, 0]) / np.abs(logits).max(1)).min())
    return tokens, logits, (min(gaps) if gaps else 1.0), margin


def build(spec, seed, full_tok, outdir):
    """Write one model and its reference; returns (min indexer top-k gap, min greedy margin)."""
    rng = np.random.default_rng(seed)
    d = os.path.join(outdir, spec["name"])
    os.makedirs(d, exist_ok=True)
    tok = small_tokenizer(full_tok, spec["vocab"] - 8)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    hf_tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    ids = [0] + hf_tok.encode(PROMPT_TEXT).ids
    assert len(ids) >= spec["prompt_len"], len(ids)
    ids = ids[:spec["prompt_len"]]
    with open(os.path.join(d, "prompt.txt"), "w") as f:
        f.write(hf_tok.decode(ids[1:]))

    cfg = config_json(spec)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = official_tensors(spec, rng)
    stored, deq = [], {}
    for name, (w, fmt) in tensors.items():
        parts, deq[name] = encode_tensor(name, w, fmt, spec["fp8_scale"])
        stored += parts
    if spec["shards"] == 1:
        write_safetensors(os.path.join(d, "model.safetensors"), stored)
    else:
        n = spec["shards"]
        weight_map = {}
        for s in range(n):
            fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            part = stored[s::n]
            write_safetensors(os.path.join(d, fname), part)
            weight_map.update({t[0]: fname for t in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)

    hf_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    config = DeepseekV4Config(**hf_cfg)
    config._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(config).float().eval()
    load_into_hf(model, spec, deq)
    tokens, logits, index_gap, margin = run_reference(model, ids, spec["steps"])
    with open(os.path.join(d, "reference.bin"), "wb") as f:
        f.write(struct.pack("<3i", len(ids), spec["steps"], spec["vocab"]))
        f.write(np.array(tokens, np.int32).tobytes())
        f.write(logits.astype(np.float32).tobytes())
    rope = model.model.rotary_emb
    with open(os.path.join(d, "rope.bin"), "wb") as f:
        f.write(rope.main_inv_freq.float().numpy().tobytes())
        f.write(rope.compress_inv_freq.float().numpy().tobytes())
    print(f"{spec['name']}: prompt {len(ids)} tokens, {spec['steps']} steps, generated "
          f"{tokens[len(ids):]}, min indexer top-k gap {index_gap:.2e}, min greedy margin {margin:.2e}")
    return index_gap, margin


def main():
    src, outdir = sys.argv[1], sys.argv[2]
    opener = gzip.open if src.endswith(".gz") else open
    with opener(src, "rt", encoding="utf-8") as f:
        full_tok = json.load(f)
    for spec in MODELS:
        if sys.argv[3:] and spec["name"] not in sys.argv[3:]:
            continue
        # Draw until no indexer top-k and no greedy choice is decided by less than 1e-5 / 1e-4
        # (relative): a float32 engine must then pick exactly what transformers picked.
        for attempt in range(20):
            index_gap, margin = build(spec, spec["seed"] + 100 * attempt, full_tok, outdir)
            if index_gap >= 1e-5 and margin >= 1e-4:
                break
        else:
            sys.exit(f"{spec['name']}: no seed gave safe margins")


if __name__ == "__main__":
    main()
