#!/usr/bin/env python3
"""Export a checkpoint of tools/train_model.py as an nvfp4 model directory in DeepSeek V4's
official layout, and measure what the quantization costs.

    python3 tools/export_model.py RUN_DIR MODEL_DIR --valid valid.txt [--reference REF_DIR]
        [--seq 512] [--eval-tokens 0] [--shard-mb 15] [--excerpt 400]

RUN_DIR is train_model.py's --out (checkpoint.pt, spec.json, tokenizer.json, tokenizer_config.json).
The tensors, names and formats are those of DeepSeek's NVFP4 release as the fixtures
(tools/gen_fixtures.py, whose quantizers and name mapping this reuses) store them:
    routed experts  w1/w2/w3 NVFP4: U8 packed e2m1 pairs, F8_E4M3 weight_scale per 16 inputs,
                    F32 weight_scale_2 = amax/(6*448) of each tensor (w1 and w3 each their own),
                    F32 input_scale
    attention (wq_a, wq_b, wkv, wo_a, wo_b), indexer wq_b, shared experts (w1/w2/w3):
                    FP8 E4M3 with 128x128 block scales in E8M0 (`scale`)
    BF16            embed, head, norms, router (gate.weight), compressors (wkv, wgate, norm),
                    indexer compressor and weights_proj
    F32             mHC (hc_*_fn/base/scale), attention sinks, compressor ape, router bias
                    (gate.bias = e_score_correction_bias);  I64 gate.tid2eid on hash layers
config.json has the official keys (compress_ratios, num_hash_layers, qk_rope_head_dim,
rope_scaling, ...) and a quantization_config; tokenizer.json and tokenizer_config.json are copied.
Safetensors are cut into shards of at most --shard-mb MiB (with model.safetensors.index.json)
so that each file can come back from a device call (16 MiB a file).

Then it loads the dequantized tensors back into a transformers DeepseekV4ForCausalLM and
evaluates the validation loss (mean NLL per predicted token over [BOS] + seq-1 windows, the
same windows as train_model.py) of the unquantized (fp32 checkpoint) and of the dequantized
weights, in float32. With --reference REF_DIR it also writes, for an excerpt of --excerpt tokens
([BOS] + the start of valid.txt):
    ids.txt                 the ids, comma-separated (for nvfp4 --ids)
    hf_dequant_logits.bin   float32 [n, vocab] logits of transformers on the dequantized weights
                            (float32 on the CPU, as the fixtures' references), its indexer's top-k
                            breaking ties toward the lower entry as nvfp4 does (LowerIndexTies)
    tie_rows.txt            rows whose indexer or router top-k is decided by a (near-)tie. The
                            indexer's scores are sums of ReLUs weighted by signed weights, so a
                            trained model's scores are often exactly 0 for several entries at
                            the top-k boundary; torch.topk orders such ties as it likes, and an
                            engine that keeps another of them differs on that row and, through
                            that position's keys and values, on later rows by up to ~1e-2
                            (measured on the toy model with torch's own order)
    export_report.json      sizes, parameter count, both validation losses and perplexities,
                            the excerpt's NLL and its tie rows (in RUN_DIR without --reference)
Compare nvfp4 with it:
    ./nvfp4 --cpu MODEL_DIR --ids $(cat REF_DIR/ids.txt) -n 1 --temp 0 --dump-logits REF_DIR/nvfp4.bin
    python3 tools/compare_logits.py REF_DIR/nvfp4.bin REF_DIR/hf_dequant_logits.bin \\
        --ids REF_DIR/ids.txt --skip REF_DIR/tie_rows.txt

On the GPU machine, after training in the same 10-minute call (see train_model.py's header) or
in a later one on the same warm machine (evaluation runs on the GPU in float32; about a minute
for 250k validation tokens of gpu-small):
    python3 tools/export_model.py build/train/v4-small build/models/v4-small \\
        --valid build/corpus/valid.txt --reference build/train/v4-small/ref \\
      && cp build/models/v4-small/* build/train/v4-small/ref/export_report.json $OUT/
"""
import argparse, json, math, os, re, shutil, sys, time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True   # no __pycache__ in tools/
sys.path.insert(0, HERE)
import gen_fixtures as gf  # noqa: E402
import train_model as tm  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")


def official_weights(sd, spec):
    """transformers state dict -> {official name: (numpy array, format)} in the official order."""
    I = spec["moe_inter"]
    used, out = set(), {}
    for name, (shape, fmt) in tm.official_layout(spec).items():
        m = EXPERT.match(name)
        if m:
            l, e, w = int(m[1]), int(m[2]), m[3]
            key = f"model.layers.{l}.mlp.experts." + ("down_proj" if w == "w2" else "gate_up_proj")
            t = sd[key][e]
            t = t if w == "w2" else (t[:I] if w == "w1" else t[I:])
        else:
            key = gf.hf_name(name)
            t = sd[key]
        used.add(key)
        a = t.detach().cpu()
        a = a.numpy() if fmt == "i64" else a.float().numpy()
        assert a.shape == tuple(shape), (name, a.shape, shape)
        out[name] = (np.ascontiguousarray(a), fmt)
    left = [k for k in sd if k not in used and "inv_freq" not in k]
    assert not left, f"transformers tensors not exported: {left}"
    return out


class LowerIndexTies:
    """Within this context Tensor.topk (what the indexer calls) breaks ties toward the lower index,
    as nvfp4 does, instead of in torch's unspecified order: the choice among exactly equal scores
    is then the same in both, and any top-k they pick is as right as the other."""
    def __enter__(self):
        self.orig = torch.Tensor.topk

        def topk(t, k, dim=-1, largest=True, sorted=True):
            v, i = torch.sort(t, dim=dim, descending=largest, stable=True)
            return torch.return_types.topk((v.narrow(dim, 0, k), i.narrow(dim, 0, k)))
        torch.Tensor.topk = topk

    def __exit__(self, *exc):
        torch.Tensor.topk = self.orig


def tie_rows(model, ids, rel=1e-5):
    """Run the model on `ids` (float32, CPU, one forward from position 0) and return its logits
    and the positions where a discrete choice is decided by a (near-)tie: in a CSA layer, the
    indexer's k-th and (k+1)-th best scores among the entries visible to the position, or in a
    routed MoE layer the k-th and (k+1)-th expert scores (with the balancing bias), differ by
    less than `rel` of the largest. The indexer scores pass through a ReLU, so exact ties at 0
    happen; an engine may then keep another of the tied entries, and its logits for that row (and,
    through the keys and values of that position, for later rows) may differ from transformers'
    by much more than rounding."""
    rows = {}

    def index_hook(module, args, out):
        s = out[0].float()
        for r in range(s.shape[0]):
            v = s[r, :(r + 1) // module.tie_rate]   # entries complete at position r
            k = module.tie_topk
            if v.numel() > k:
                v = v.sort(descending=True).values
                if float(v[k - 1] - v[k]) <= rel * float(v.abs().max()):
                    rows.setdefault(r, []).append(f"indexer {module.tie_layer}")

    def router_hook(module, args, out):
        v = (module.score_fn(out[0].float()) + module.e_score_correction_bias).sort(-1, descending=True).values
        k = module.top_k
        gap = (v[:, k - 1] - v[:, k]) <= rel * v.abs().max(-1).values
        for r in torch.nonzero(gap).flatten().tolist():
            rows.setdefault(r, []).append(f"router {module.tie_layer}")
    handles = []
    for i, layer in enumerate(model.model.layers):
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            sc = comp.indexer.scorer
            sc.tie_topk, sc.tie_rate, sc.tie_layer = comp.indexer.index_topk, comp.indexer.compress_rate, i
            handles.append(sc.register_forward_hook(index_hook))
        gate = layer.mlp.gate
        if hasattr(gate, "e_score_correction_bias"):
            gate.tie_layer = i
            handles.append(gate.register_forward_hook(router_hook))
    with torch.no_grad(), LowerIndexTies():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    for h in handles:
        h.remove()
    return logits, {r: rows[r] for r in sorted(rows)}


def write_shards(model_dir, stored, shard_mb):
    """Write the (name, dtype, array) list as one model.safetensors or as shards of at most
    shard_mb MiB with an index; returns the file names."""
    limit, shards, cur, size = shard_mb * 2**20, [], [], 0
    for t in stored:
        n = t[2].nbytes
        if cur and size + n > limit - 64 * 1024:   # leave room for the header
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    shards.append(cur)
    if len(shards) == 1:
        gf.write_safetensors(os.path.join(model_dir, "model.safetensors"), stored)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        gf.write_safetensors(os.path.join(model_dir, fname), part)
        weight_map.update({t[0]: fname for t in part})
        names.append(fname)
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    return names + ["model.safetensors.index.json"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("model_dir")
    ap.add_argument("--valid", required=True)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=0, help="validation tokens (0 = all)")
    ap.add_argument("--shard-mb", type=float, default=15)
    ap.add_argument("--reference", help="directory for the excerpt's ids, logits and the report")
    ap.add_argument("--excerpt", type=int, default=400, help="tokens of the reference excerpt, BOS included")
    args = ap.parse_args()
    t0 = time.time()
    ckpt = torch.load(os.path.join(args.run_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)
    spec = ckpt["spec"]
    os.makedirs(args.model_dir, exist_ok=True)

    # ---- quantize into the official layout
    weights = official_weights(ckpt["model"], spec)
    stored, deq = [], {}
    for name, (w, fmt) in weights.items():
        parts, deq[name] = gf.encode_tensor(name, w, fmt, spec["fp8_scale"])
        stored += parts
    files = write_shards(args.model_dir, stored, args.shard_mb)
    with open(os.path.join(args.model_dir, "config.json"), "w") as f:
        json.dump(gf.config_json(spec), f, indent=2)
    files.append("config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.run_dir, name), os.path.join(args.model_dir, name))
        files.append(name)
    sizes = {f: os.path.getsize(os.path.join(args.model_dir, f)) for f in files}
    total = sum(sizes.values())
    nparams = sum(w.size for w, fmt in weights.values() if fmt != "i64")
    print(f"exported {nparams} parameters to {args.model_dir}: {total / 2**20:.2f} MiB in {len(files)} files "
          f"(largest {max(sizes.values()) / 2**20:.2f} MiB), {time.time() - t0:.0f} s", flush=True)

    # ---- transformers on the unquantized and on the dequantized weights
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unq = tm.new_model(spec, 0, "eager").float().eval()   # transformers' plain per-expert loop
    unq.load_state_dict(ckpt["model"])
    dq = tm.new_model(spec, 0, "eager").float().eval()
    gf.load_into_hf(dq, spec, dict(deq))
    tok = Tokenizer.from_file(os.path.join(args.run_dir, "tokenizer.json"))
    valid_ids = tm.tokenize_file(tok, args.valid)
    report = dict(parameters=int(nparams), model_bytes=total, files=sizes, step=ckpt["step"], seq=args.seq,
                  train_args=ckpt.get("args"))
    for label, model in (("unquantized", unq), ("dequantized", dq)):
        model.to(device)
        nll, n = tm.evaluate(model, valid_ids, args.seq, args.batch, device, args.eval_tokens)
        model.cpu()
        report[label] = dict(valid_nll=nll, valid_ppl=math.exp(nll), valid_tokens=n)
        print(f"transformers, {label} weights (float32, {device}): {n} validation tokens, "
              f"NLL {nll:.4f}, perplexity {math.exp(nll):.3f}", flush=True)

    # ---- reference logits of an excerpt, for nvfp4 --ids --dump-logits
    if args.reference:
        os.makedirs(args.reference, exist_ok=True)
        ids = [0] + [int(i) for i in valid_ids[:args.excerpt - 1]]
        logits, ties = tie_rows(dq, ids)
        with open(os.path.join(args.reference, "ids.txt"), "w") as f:
            f.write(",".join(map(str, ids)) + "\n")
        logits.astype(np.float32).tofile(os.path.join(args.reference, "hf_dequant_logits.bin"))
        lp = torch.log_softmax(torch.from_numpy(logits[:-1]), -1)
        ex_nll = float(-lp.gather(1, torch.tensor(ids[1:])[:, None]).mean())
        report["excerpt"] = dict(tokens=len(ids), hf_dequant_nll=ex_nll, tie_rows=ties)
        with open(os.path.join(args.reference, "tie_rows.txt"), "w") as f:
            f.write(",".join(map(str, ties)) + "\n")
        print(f"reference excerpt: {len(ids)} tokens, NLL {ex_nll:.4f} (dequantized); rows whose indexer "
              f"or router top-k is decided by a tie: {ties or 'none'}", flush=True)
    report_path = os.path.join(args.reference or args.run_dir, "export_report.json")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {report_path}; done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
