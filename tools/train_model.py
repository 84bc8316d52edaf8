#!/usr/bin/env python3
"""Train a small DeepSeek V4 (transformers' DeepseekV4ForCausalLM) from scratch on a text corpus.

The model keeps the V4 architecture, only scaled down: 4 mHC residual streams with Sinkhorn
mixing, sliding-window-only layers then alternating CSA layers (compress rate 4, with the
lightning indexer, index_topk below the CSA entries of the training context so the indexer
really selects) and HCA layers (compress rate 128), hash-routed MoE layers first and then
routed MoE layers (sqrtsoftplus scores, routing bias balanced without an auxiliary loss as in
DeepSeek V3/V4), one shared expert, attention sinks, grouped low-rank output projection.
The official config.json (legacy keys, as DeepSeek ships them) comes from gen_fixtures.config_json,
so the trained weights export to exactly the layout nvfp4 reads (tools/export_model.py).

Usage:
    python3 tools/train_model.py --train train.txt --valid valid.txt --tokenizer tokenizer.json \\
        --out build/train/RUN --preset gpu-small --steps 1700 --batch 16 --seq 512 --lr 2e-3 --minutes 7
Run the same command again to resume from RUN/checkpoint.pt (same model, optimizer, step, data
order and RNG); --steps is the length of the whole schedule (warmup + cosine), not of this call.
On the CPU a run cut at step 295 and resumed gave the same losses and validation loss as one
run of 400 steps. The CUDA path (bf16 autocast, fused AdamW, transformers' default grouped_mm
experts) trained models/v4-small on an H100 (the command below with --minutes 6.3 and
--eval-tokens 65536: 1110 steps at 28.9k tokens/s, training loss 8.37 -> 3.66).

    --preset      toy | cpu-small | gpu-small | gpu-base  (see PRESETS below; vocab comes from
                  the tokenizer); --spec FILE.json overrides with a spec of your own
    --steps N     optimizer steps of the whole run (cosine schedule length); 0 (the default) fits
                  the schedule into --minutes from the speed of steps 3-10 and keeps it on resume
    --batch B     sequences per step;  --seq S  tokens per sequence (BOS + S-1 text tokens)
    --lr LR       peak learning rate (AdamW, betas 0.9/0.95, weight decay 0.1 on matrices),
                  --warmup steps of linear warmup, then cosine to --min-lr-ratio * LR
    --minutes M   stop (and save) after M minutes of this call, even before --steps
    --save-every N  also save every N steps
    --eval-tokens T  validation tokens evaluated at the end (and every --eval-every steps)
    --experts-impl eager | batched_mm | grouped_mm (transformers' MoE kernels; default: its own,
                  grouped_mm where torch has it; eager is the plain per-expert loop, the fallback
                  if a kernel refuses bf16 autocast or is slower on a GPU)

Training windows are [BOS] + S-1 consecutive tokens from a random offset of the tokenized
train.txt, so the model always sees BOS at position 0 as nvfp4 feeds it a prompt. Validation
cuts the tokenized valid.txt into consecutive windows of the same shape and reports the mean
negative log-likelihood per predicted token and its exp (perplexity).

What it writes in --out:
    config.json, spec.json      the official DeepSeek V4 config and the size spec it came from
    tokenizer.json, tokenizer_config.json   copied (DeepSeek's tokenizer_config when absent)
    train_ids.npy, valid_ids.npy   the tokenized corpus (cache, rebuilt when a source changes)
    checkpoint.pt               model (fp32) + AdamW state + step + all RNG states (resumable)
    loss.csv                    step, tokens, lr, train loss, grad norm, valid loss, seconds, tok/s
    train_log.txt               what was printed
The checkpoint of gpu-small with AdamW is about 12x the parameter count in bytes, too big to
come back from a device call (8 files of 16 MiB): keep --out under build/ on the device, where
it survives between calls while the machine stays warm, and bring back only the exported model
(tools/export_model.py writes shards of at most 15 MiB) and loss.csv.

On the GPU machine (H100/H200), in one 10-minute device call (bf16 autocast, fp32 master
weights), the run that made models/v4-small (build/corpus carried to the device):
    python3 tools/train_model.py --train build/corpus/train.txt --valid build/corpus/valid.txt \\
        --tokenizer build/corpus/tokenizer.json --out build/train/v4-small --preset gpu-small \\
        --steps 0 --batch 16 --seq 512 --lr 2e-3 --warmup 100 --minutes 6.3 --save-every 500 \\
        --eval-tokens 65536 \\
      && python3 tools/export_model.py build/train/v4-small build/models/v4-small \\
        --valid build/corpus/valid.txt --reference build/train/v4-small/ref \\
      && cp build/models/v4-small/*.safetensors build/train/v4-small/ref/hf_dequant_logits.bin $OUT/ \\
      && tar cf $OUT/small.tar -C build/models/v4-small model.safetensors.index.json config.json \\
            -C ../../train/v4-small loss.csv train_log.txt -C ref ids.txt tie_rows.txt export_report.json
gpu-small ran at 28.9k tokens/s for batch 16x512 on an H100 (bf16 autocast): 6.3 minutes train
9.1M tokens (1110 steps of 8192 tokens, about one pass over the 30.8 MB corpus with a 4k vocab).
--steps 0 sizes the cosine schedule to --minutes from the measured speed; the rest of the call
covers start-up, tokenizing the corpus (cached in --out for later calls), the final validation
and the export (that whole call took 445 s with the nvfp4 runs after it). A longer run needs a
fixed --steps (e.g. 2200) and two calls in a row on the same warm machine (the second resumes
the checkpoint in build/), which the device's 30-second idle release makes hard. What comes back
is at most 8 files: the model's shards, the small files (tar them into one: the index,
config.json, loss.csv, export_report.json, ...) and hf_dequant_logits.bin; tokenizer.json and
tokenizer_config.json are the ones built here.
"""
import argparse, json, math, os, shutil, sys, time

import numpy as np
import torch

sys.dont_write_bytecode = True   # no __pycache__ in tools/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as gf  # noqa: E402  (official config/names/quantizers shared with the fixtures)
from tokenizers import Tokenizer  # noqa: E402
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Size specs in gen_fixtures' vocabulary (vocab is filled in from the tokenizer). ratios: one per
# layer, 0 = sliding only, 4 = CSA (+ indexer), 128 = HCA; the first hash_layers layers are
# hash-routed MoE. index_topk must stay below seq/4 (the CSA entries of a full window).
PRESETS = {
    # CPU dry run: 0.95M parameters with a 2000-token vocab, ~0.6 s per step (~3500 tok/s) on 2 cores at
    # batch 8 x 256 (the first steps and an occasional one take several seconds)
    "toy": dict(hidden=64, layers=6, heads=4, head_dim=64, rope_dim=16, q_lora=32, o_groups=2,
                o_lora=32, experts=4, topk=2, moe_inter=64, window=32, ratios=[0, 0, 4, 128, 4, 128],
                hash_layers=2, index_heads=4, index_dim=32, index_topk=8),
    "cpu-small": dict(hidden=128, layers=6, heads=4, head_dim=64, rope_dim=16, q_lora=64, o_groups=2,
                      o_lora=64, experts=8, topk=2, moe_inter=96, window=64, ratios=[0, 0, 4, 128, 4, 128],
                      hash_layers=2, index_heads=8, index_dim=32, index_topk=16),
    # GPU: 22.9M parameters with a 4096-token vocab (14.2M in the routed experts), exports to
    # 22.2 MiB = 23.3 MB, under the 25 MB (embed + head in BF16 are 6 MiB of it; an 8k
    # vocab would make it 29.7 MB)
    "gpu-small": dict(hidden=384, layers=8, heads=4, head_dim=128, rope_dim=32, q_lora=128, o_groups=2,
                      o_lora=128, experts=16, topk=2, moe_inter=96, window=128,
                      ratios=[0, 0, 4, 128, 4, 128, 4, 128], hash_layers=3, index_heads=8,
                      index_dim=64, index_topk=32),
    # GPU, bigger: ~54M parameters with a 4k vocab, exports to ~44 MiB (over the 25 MB the issue
    # allows to commit: for comparison, or with a smaller expert count / moe_inter)
    "gpu-base": dict(hidden=512, layers=8, heads=8, head_dim=128, rope_dim=32, q_lora=256, o_groups=4,
                     o_lora=128, experts=16, topk=2, moe_inter=192, window=128,
                     ratios=[0, 0, 4, 128, 4, 128, 4, 128], hash_layers=3, index_heads=8,
                     index_dim=64, index_topk=32),
}


# ----------------------------------------------------------------------------- model
def full_spec(spec, vocab):
    s = dict(spec, vocab=vocab, formats={}, fp8_scale="e8m0")
    assert len(s["ratios"]) == s["layers"] and s["hash_layers"] <= s["layers"]
    return s


def hf_config(cfg):
    """The official config.json dict -> a DeepseekV4Config that transformers runs eagerly."""
    config = DeepseekV4Config(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    config._attn_implementation = "eager"
    return config


def new_model(spec, seed, experts_impl=None):
    """A freshly initialized model (transformers' init) with a fixed random hash routing table."""
    torch.manual_seed(seed)
    config = hf_config(gf.config_json(spec))
    if experts_impl:
        config._experts_implementation = experts_impl
    model = DeepseekV4ForCausalLM(config)
    rng = np.random.default_rng(seed)
    for layer in model.model.layers:
        gate = layer.mlp.gate
        if hasattr(gate, "tid2eid"):   # hash MoE: token id -> topk distinct experts, fixed forever
            table = np.stack([rng.permutation(spec["experts"])[:spec["topk"]] for _ in range(spec["vocab"])])
            gate.tid2eid.copy_(torch.from_numpy(table))
    return model


class _ShapeRng:
    """Stands in for numpy's Generator in gen_fixtures.official_tensors: zeros of the right shape,
    so that the function lists every official tensor with its shape and format, cheaply."""
    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.zeros(size, np.float32)

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size, np.float32)

    def choice(self, n, k, replace=True):
        return np.arange(k)


def official_layout(spec):
    """Official tensor name -> (shape, format) for this spec, in the fixtures' order."""
    return {name: (w.shape, fmt) for name, (w, fmt) in gf.official_tensors(spec, _ShapeRng()).items()}


def export_bytes(spec):
    """Bytes of the exported safetensors (headers aside) and the parameter count."""
    total = params = 0
    for shape, fmt in official_layout(spec).values():
        n = int(np.prod(shape))
        if fmt != "i64":
            params += n
        if fmt == "fp8":
            total += n + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
        elif fmt == "nvfp4":
            total += n // 2 + n // 16 + 8
        else:
            total += n * {"bf16": 2, "f32": 4, "i64": 8}[fmt]
    return total, params


# ----------------------------------------------------------------------------- data
def tokenize_file(tok, path):
    """Token ids of a text file (no BOS). The text is encoded in pieces cut just after a newline
    that is followed by a letter: no pre-tokenizer piece crosses such a point, so the ids equal
    those of encoding the whole file at once."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    pieces, start, step = [], 0, 1 << 16
    while start < len(text):
        end = min(start + step, len(text))
        while end < len(text) and not (text[end - 1] == "\n" and text[end].isalpha()):
            end += 1
        pieces.append(text[start:end])
        start = end
    ids = []
    for enc in tok.encode_batch(pieces, add_special_tokens=False):
        ids.extend(enc.ids)
    return np.array(ids, dtype=np.uint32 if tok.get_vocab_size() > 65535 else np.uint16)


def cached_ids(tok, tok_path, path, cache):
    """tokenize_file, cached in `cache` (.npy) with a .json stamp of the sources."""
    stamp = dict(text=os.path.abspath(path), size=os.path.getsize(path), mtime=os.path.getmtime(path),
                 tokenizer_size=os.path.getsize(tok_path), tokenizer_mtime=os.path.getmtime(tok_path))
    try:
        with open(cache + ".json") as f:
            if json.load(f) == stamp:
                return np.load(cache)
    except (OSError, ValueError):
        pass
    ids = tokenize_file(tok, path)
    np.save(cache, ids)
    with open(cache + ".json", "w") as f:
        json.dump(stamp, f)
    return ids


def window(ids, start, seq, bos):
    return np.concatenate([[bos], ids[start:start + seq - 1]]).astype(np.int64)


@torch.no_grad()
def evaluate(model, ids, seq, batch, device, max_tokens, bos=0, autocast=False):
    """Mean NLL per predicted token over consecutive [BOS] + seq-1 windows of `ids` (at most
    max_tokens text tokens; 0 = all). Returns (nll, tokens)."""
    was_training = model.training
    model.eval()
    n_win = (len(ids) if not max_tokens else min(len(ids), max_tokens)) // (seq - 1)
    total, count = 0.0, 0
    for b in range(0, n_win, batch):
        x = torch.from_numpy(np.stack([window(ids, w * (seq - 1), seq, bos)
                                       for w in range(b, min(b + batch, n_win))])).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1), count


# ----------------------------------------------------------------------------- training
def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class BiasBalancer:
    """DeepSeek's auxiliary-loss-free balancing: after each step, every routed (non-hash) layer's
    e_score_correction_bias moves by `rate` toward the experts that got fewer tokens than average."""
    def __init__(self, model, rate):
        self.rate, self.routers = rate, []
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "e_score_correction_bias"):
                self.routers.append(gate)
                gate.register_forward_hook(self.hook)
        self.counts = {id(g): None for g in self.routers}

    def hook(self, module, args, out):
        if module.training:
            c = torch.bincount(out[2].reshape(-1), minlength=module.num_experts).float()
            prev = self.counts[id(module)]
            self.counts[id(module)] = c if prev is None else prev + c

    @torch.no_grad()
    def update(self):
        for g in self.routers:
            c = self.counts[id(g)]
            if c is not None:
                g.e_score_correction_bias += self.rate * torch.sign(c.mean() - c)
                self.counts[id(g)] = None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    ap.add_argument("--spec", help="JSON file with a size spec (keys as in PRESETS) instead of --preset")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps of the whole schedule; 0 = as many as --minutes allows, measured on steps 3-10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="routing-bias balancing step")
    ap.add_argument("--minutes", type=float, default=0, help="time budget of this call (0 = none)")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=200000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--experts-impl", choices=["eager", "batched_mm", "grouped_mm"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = ap.parse_args()
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "train_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = device == "cuda"
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = torch.load(ckpt_path, map_location="cpu", weights_only=False) if os.path.exists(ckpt_path) else None

    tok = Tokenizer.from_file(args.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    bos = tok.token_to_id("<｜begin▁of▁sentence｜>")
    assert bos == 0 and tok.token_to_id("<｜end▁of▁sentence｜>") == 1, "BOS must be id 0 and EOS id 1"
    if resume:
        spec = resume["spec"]
        assert spec["vocab"] == vocab, "the tokenizer changed since the checkpoint"
    else:
        if args.spec:
            with open(args.spec) as f:
                base = json.load(f)
        else:
            base = PRESETS[args.preset]
        spec = full_spec(base, vocab)
    assert spec["index_topk"] < args.seq // 4, "index_topk must be below the CSA entries of a window"
    with open(os.path.join(args.out, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(gf.config_json(spec), f, indent=2)
    if os.path.abspath(args.tokenizer) != os.path.abspath(os.path.join(args.out, "tokenizer.json")):
        shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    tc = os.path.join(os.path.dirname(os.path.abspath(args.tokenizer)), "tokenizer_config.json")
    if not os.path.exists(tc):
        tc = os.path.join(HERE, "..", "testdata", "tokenizer_config.json")
    if os.path.abspath(tc) != os.path.abspath(os.path.join(args.out, "tokenizer_config.json")):
        with open(tc) as f:
            config = json.load(f)
        config.pop("chat_template", None)   # trained on plain text, no chat turns: nvfp4 -i then continues text
        with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
            f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    t0 = time.time()
    train_ids = cached_ids(tok, args.tokenizer, args.train, os.path.join(args.out, "train_ids.npy"))
    valid_ids = cached_ids(tok, args.tokenizer, args.valid, os.path.join(args.out, "valid_ids.npy"))
    log(f"corpus: {len(train_ids)} train tokens ({os.path.getsize(args.train) / len(train_ids):.2f} bytes/token), "
        f"{len(valid_ids)} valid tokens, vocab {vocab} ({time.time() - t0:.1f} s)")

    model = new_model(spec, args.seed, args.experts_impl)
    nbytes, nparams = export_bytes(spec)
    log(f"model: {sum(p.numel() for p in model.parameters())} parameters ({nparams} exported), "
        f"export ~{nbytes / 2**20:.1f} MiB, layers {spec['ratios']}, {spec['hash_layers']} hash layers, "
        f"{spec['experts']} experts top-{spec['topk']}, index_topk {spec['index_topk']} of {args.seq // 4} "
        f"CSA entries, device {device}{' (bf16 autocast)' if autocast else ' (fp32)'}, "
        f"experts impl {model.config._experts_implementation}")
    if resume:
        model.load_state_dict(resume["model"])
    model.to(device).train()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "hc" not in n and "position_bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "hc" not in n and "position_bias" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    rng = np.random.default_rng(args.seed)
    step = 0
    if resume and not args.steps:
        args.steps = resume["args"]["steps"]   # the schedule fixed by the first call
    auto_steps = not args.steps
    if auto_steps:
        assert args.minutes and args.warmup >= 10, "--steps 0 needs --minutes and --warmup >= 10"
        args.steps = 10**9   # provisional: fixed after step 10 from the measured speed
    if resume:
        opt.load_state_dict(resume["optimizer"])
        step = resume["step"]
        rng.bit_generator.state = resume["numpy_rng"]
        torch.set_rng_state(resume["torch_rng"])
        if device == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"])
        log(f"resumed from {ckpt_path} at step {step}")
    balancer = BiasBalancer(model, args.bias_rate)

    csv_path = os.path.join(args.out, "loss.csv")
    if not os.path.exists(csv_path) or not resume:
        with open(csv_path, "w") as f:
            f.write("step,tokens,lr,loss,grad_norm,valid_loss,seconds,tokens_per_s\n")

    def csv_row(s, lr, loss, gn, vl, secs, tps):
        with open(csv_path, "a") as f:
            f.write(f"{s},{s * args.batch * args.seq},{lr:.6g},{loss},{gn},{vl},{secs:.1f},{tps}\n")

    def save():
        tmp = ckpt_path + ".tmp"
        torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, spec=spec,
                        args=vars(args), numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                        cuda_rng=torch.cuda.get_rng_state() if device == "cuda" else None), tmp)
        os.replace(tmp, ckpt_path)
        log(f"saved {ckpt_path} at step {step}")

    deadline = t_start + args.minutes * 60 if args.minutes else float("inf")
    t_loop, step0, loss_acc, n_acc, step_time = time.time(), step, 0.0, 0, 0.0
    while step < args.steps:
        t_step = time.time()
        if t_step + step_time > deadline:
            log(f"time budget of {args.minutes} min reached")
            break
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - args.seq, args.batch)
        x = torch.from_numpy(np.stack([window(train_ids, s, args.seq, bos) for s in starts])).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        balancer.update()
        step += 1
        loss_acc = loss_acc + loss.detach()   # stays on the device: no sync per step
        n_acc += 1
        step_time = time.time() - t_step
        if auto_steps and step - step0 == 3:
            t_auto = time.time()
        if auto_steps and step - step0 == 10:
            per_step = (time.time() - t_auto) / 7
            args.steps = step + int(0.95 * (deadline - time.time()) / per_step)
            auto_steps = False
            log(f"--steps 0: {per_step:.3f} s per step, so the schedule has {args.steps} steps")
        if step % args.log_every == 0 or step == args.steps or step == 1:
            el = time.time() - t_loop
            tps = (step - step0) * args.batch * args.seq / max(el, 1e-9)
            vl = ""
            if args.eval_every and step % args.eval_every == 0:
                vl = f"{evaluate(model, valid_ids, args.seq, args.batch, device, args.eval_tokens, bos, autocast)[0]:.4f}"
            mean_loss = float(loss_acc) / n_acc
            csv_row(step, lr, f"{mean_loss:.4f}", f"{float(gn):.3f}", vl, time.time() - t_start, f"{tps:.0f}")
            log(f"step {step}/{args.steps} loss {mean_loss:.4f} lr {lr:.2e} grad {float(gn):.2f} "
                f"{tps:.0f} tok/s{' valid ' + vl if vl else ''}")
            loss_acc, n_acc = 0.0, 0
        if step % args.save_every == 0 and step < args.steps:
            save()
    save()
    vl, n = evaluate(model, valid_ids, args.seq, args.batch, device, args.eval_tokens, bos, autocast)
    csv_row(step, lr_at(max(step - 1, 0), args), "", "", f"{vl:.4f}", time.time() - t_start, "")
    log(f"validation: {n} tokens, loss {vl:.4f}, perplexity {math.exp(vl):.2f} "
        f"({'bf16 autocast' if autocast else 'fp32'}); {time.time() - t_start:.0f} s in this call")


if __name__ == "__main__":
    main()
