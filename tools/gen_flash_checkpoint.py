#!/usr/bin/env python3
"""Write a DeepSeek V4-Flash-shaped checkpoint with random weights, for testing nvfp4 at the
real sizes: the official tensor names and config.json keys, the formats of the NVFP4 release
(FP8 block-scaled attention, shared experts and indexer wq_b with E8M0 scales; 256 NVFP4 routed
experts with E4M3 block scales and a global scale each, w1 and w3 different; BF16 compressors,
indexer weights_proj, router, norms, embedding and head; F32 mHC parameters, sinks, ape, router
bias; I64 tid2eid on the hash layers), the real vocabulary and tokenizer, and the first N layers
of Flash's schedule (0 and 1 sliding, then CSA and HCA alternating). About 4 GB a layer.

    python3 tools/gen_flash_checkpoint.py OUT_DIR [--layers 4] [--seed 1]

Needs numpy only. `NVFP4_FLASH_DIR=OUT_DIR ./build/test` then runs it through the CPU and GPU
paths and compares their logits (test_gpu_checkpoint in test.c).
"""
import argparse, gzip, json, os, struct
import numpy as np

E, H, D, R, Q, G, O = 4096, 64, 512, 64, 1024, 8, 1024
X, K, I, V = 256, 6, 2048, 129280
NI, DI, W = 64, 128, 128
HC, MIX = 4, 24


def schedule(n_layers):
    return [0 if l < 2 else (4 if l % 2 == 0 else 128) for l in range(n_layers)]


class Shard:
    """One safetensors file written tensor by tensor: the header (names, dtypes, shapes,
    offsets) is known before the data, so the data streams straight to disk."""

    def __init__(self, path):
        self.path, self.tensors = path, []

    def add(self, name, dtype, shape, make):
        self.tensors.append((name, dtype, shape, make))

    def write(self):
        header, offset = {}, 0
        sizes = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "U8": 1, "I64": 8}
        for name, dtype, shape, _ in self.tensors:
            n = int(np.prod(shape)) * sizes[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for _, _, shape, make in self.tensors:
                f.write(make(shape).tobytes())
        return {name: os.path.basename(self.path) for name, _, _, _ in self.tensors}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out, exist_ok=True)

    def bf16(lo, hi):   # uniform floats rounded down to bf16 (the top half of their bits)
        return lambda s: (rng.uniform(lo, hi, s).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

    def f32(lo, hi):
        return lambda s: rng.uniform(lo, hi, s).astype(np.float32)

    def fp8(s):         # E4M3 with the exponent's top bit clear: |w| < 2, never NaN
        return rng.integers(0, 256, s, dtype=np.uint8) & 0xBF

    def e8m0(s):        # block scales 2^-9 .. 2^-5
        return rng.integers(118, 123, s, dtype=np.uint8)

    def codes(s):       # E2M1 pairs: every byte is valid
        return rng.integers(0, 256, s, dtype=np.uint8)

    def e4m3_scale(s):  # 2^-2 .. < 2^2, positive
        return rng.integers(0x28, 0x48, s, dtype=np.uint8)

    def fp8_linear(sh, name, rows, cols):
        sh.add(name + ".weight", "F8_E4M3", (rows, cols), fp8)
        sh.add(name + ".scale", "F8_E8M0", ((rows + 127) // 128, (cols + 127) // 128), e8m0)

    def nvfp4_linear(sh, name, rows, cols):
        sh.add(name + ".weight", "U8", (rows, cols // 2), codes)
        sh.add(name + ".weight_scale", "F8_E4M3", (rows, cols // 16), e4m3_scale)
        sh.add(name + ".weight_scale_2", "F32", (), f32(0.005, 0.02))

    def bf16_linear(sh, name, rows, cols):
        sh.add(name + ".weight", "BF16", (rows, cols), bf16(-0.02, 0.02))

    ratios = schedule(a.layers)
    weight_map = {}
    sh = Shard(os.path.join(a.out, "model-embed.safetensors"))
    sh.add("embed.weight", "BF16", (V, E), bf16(-1, 1))
    sh.add("head.weight", "BF16", (V, E), bf16(-0.02, 0.02))
    sh.add("norm.weight", "BF16", (E,), bf16(0.9, 1.1))
    sh.add("hc_head_fn", "F32", (HC, HC * E), f32(-0.01, 0.01))
    sh.add("hc_head_base", "F32", (HC,), f32(-0.1, 0.1))
    sh.add("hc_head_scale", "F32", (1,), f32(0.5, 1))
    weight_map.update(sh.write())
    for l, ratio in enumerate(ratios):
        p = f"layers.{l}."
        sh = Shard(os.path.join(a.out, f"model-layer{l}.safetensors"))
        sh.add(p + "attn_norm.weight", "BF16", (E,), bf16(0.9, 1.1))
        sh.add(p + "ffn_norm.weight", "BF16", (E,), bf16(0.9, 1.1))
        for site in ("hc_attn", "hc_ffn"):
            sh.add(p + site + "_fn", "F32", (MIX, HC * E), f32(-0.01, 0.01))
            sh.add(p + site + "_base", "F32", (MIX,), f32(-0.1, 0.1))
            sh.add(p + site + "_scale", "F32", (3,), f32(0.5, 1))
        fp8_linear(sh, p + "attn.wq_a", Q, E)
        sh.add(p + "attn.q_norm.weight", "BF16", (Q,), bf16(0.9, 1.1))
        fp8_linear(sh, p + "attn.wq_b", H * D, Q)
        fp8_linear(sh, p + "attn.wkv", D, E)
        sh.add(p + "attn.kv_norm.weight", "BF16", (D,), bf16(0.9, 1.1))
        fp8_linear(sh, p + "attn.wo_a", G * O, H * D // G)
        fp8_linear(sh, p + "attn.wo_b", E, G * O)
        sh.add(p + "attn.attn_sink", "F32", (H,), f32(-1, 1))
        if ratio:
            parts = 2 if ratio == 4 else 1
            bf16_linear(sh, p + "attn.compressor.wkv", parts * D, E)
            bf16_linear(sh, p + "attn.compressor.wgate", parts * D, E)
            sh.add(p + "attn.compressor.ape", "F32", (ratio, parts * D), f32(-1, 1))
            sh.add(p + "attn.compressor.norm.weight", "BF16", (D,), bf16(0.9, 1.1))
        if ratio == 4:
            fp8_linear(sh, p + "attn.indexer.wq_b", NI * DI, Q)
            bf16_linear(sh, p + "attn.indexer.weights_proj", NI, E)
            bf16_linear(sh, p + "attn.indexer.compressor.wkv", 2 * DI, E)
            bf16_linear(sh, p + "attn.indexer.compressor.wgate", 2 * DI, E)
            sh.add(p + "attn.indexer.compressor.ape", "F32", (ratio, 2 * DI), f32(-1, 1))
            sh.add(p + "attn.indexer.compressor.norm.weight", "BF16", (DI,), bf16(0.9, 1.1))
        bf16_linear(sh, p + "ffn.gate", X, E)
        if l < 3:
            sh.add(p + "ffn.gate.tid2eid", "I64", (V, K), lambda s: rng.integers(0, X, s, dtype=np.int64))
        else:
            sh.add(p + "ffn.gate.bias", "F32", (X,), f32(-0.1, 0.1))
        for e in range(X):
            nvfp4_linear(sh, p + f"ffn.experts.{e}.w1", I, E)
            nvfp4_linear(sh, p + f"ffn.experts.{e}.w2", E, I)
            nvfp4_linear(sh, p + f"ffn.experts.{e}.w3", I, E)
        fp8_linear(sh, p + "ffn.shared_experts.w1", I, E)
        fp8_linear(sh, p + "ffn.shared_experts.w2", E, I)
        fp8_linear(sh, p + "ffn.shared_experts.w3", I, E)
        weight_map.update(sh.write())
        print(f"layer {l} (compress ratio {ratio}) written", flush=True)

    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": V, "hidden_size": E,
        "num_hidden_layers": a.layers, "num_attention_heads": H, "num_key_value_heads": 1, "head_dim": D,
        "qk_rope_head_dim": R, "q_lora_rank": Q, "o_groups": G, "o_lora_rank": O, "sliding_window": W,
        "index_n_heads": NI, "index_head_dim": DI, "index_topk": 512, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                         "beta_slow": 1},
        "n_routed_experts": X, "n_shared_experts": 1, "num_experts_per_tok": K, "moe_intermediate_size": I,
        "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "num_hash_layers": 3, "swiglu_limit": 10.0,
        "hc_mult": HC, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "max_position_embeddings": 1048576,
        "bos_token_id": 0, "eos_token_id": 1, "num_nextn_predict_layers": 0, "compress_ratios": ratios,
        "tie_word_embeddings": False, "norm_topk_prob": True,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    here = os.path.dirname(os.path.abspath(__file__))
    with gzip.open(os.path.join(here, "..", "testdata", "tokenizer.json.gz"), "rb") as src, \
            open(os.path.join(a.out, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())
    print(f"wrote {a.out}: {a.layers} layers, compress ratios {ratios}")


if __name__ == "__main__":
    main()
