#!/usr/bin/env python3
"""CPU dry run of the training pipeline at toy scale: corpus -> tokenizer -> train_model.py ->
export_model.py -> nvfp4, checking that nvfp4 runs the exported model and that its logits match
transformers on the same dequantized weights.

    ../venv-fixture/bin/python tools/train_dryrun.py [--out build/dryrun] [--minutes 6] [--steps 400]
        [--preset toy] [--skip-train]

Running it again resumes the training where --minutes cut it (train_model.py keeps its checkpoint
in OUT/run) and redoes the export and the checks; --skip-train only redoes the latter.

1. corpus: English text found on any Debian machine (/usr/share/common-licenses, the Vim user
   manual), ~4 MB, split into train.txt and a held-out valid.txt (the last 5%, at a line break).
   The real corpus comes from tools/build_corpus.py.
2. toy tokenizer: HF tokenizers byte-level BPE with --vocab tokens (default 2000) trained on
   train.txt, with DeepSeek's normalizer, pre-tokenizer, post-processor and decoder copied as JSON
   from testdata/tokenizer.json.gz (the structure nvfp4 accepts), BOS/EOS/pad at ids 0/1/2 and the
   chat tokens <｜User｜> and <｜Assistant｜>; tokenizer_config.json is DeepSeek's.
3. trains --preset for --minutes on the CPU (tools/train_model.py), 4. exports it
   (tools/export_model.py, which also evaluates transformers on the unquantized and dequantized
   weights and writes the reference logits of a validation excerpt), 5. builds nvfp4 (`make`),
   generates 20 greedy tokens with --cpu, dumps nvfp4's logits for the excerpt (--ids,
   --dump-logits) and compares them row by row with the reference (tools/compare_logits.py):
   rows before the first indexer/router tie must agree to rounding (--tol 1e-4).
Writes everything under --out (build/ is ignored by git) and a summary in OUT/dryrun.json.
On the GPU machine the same steps run from the commands in train_model.py's header.
"""
import argparse, glob, gzip, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
CHAT = ["<｜User｜>", "<｜Assistant｜>"]


def build_corpus(d):
    files = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if not os.path.islink(f))
    files += sorted(glob.glob("/usr/share/vim/vim90/doc/usr_*.txt"))
    files += sorted(set(glob.glob("/usr/share/vim/vim90/doc/*.txt")) - set(files))
    text = ""
    for f in files:
        if len(text) > 4_000_000:
            break
        with open(f, encoding="utf-8", errors="replace") as fh:
            text += fh.read().replace("\t", "    ") + "\n\n"
    cut = text.index("\n", int(len(text) * 0.95)) + 1
    with open(os.path.join(d, "train.txt"), "w") as f:
        f.write(text[:cut])
    with open(os.path.join(d, "valid.txt"), "w") as f:
        f.write(text[cut:])
    return len(files), cut, len(text) - cut


def build_tokenizer(d, vocab_size):
    """Byte-level BPE trained on train.txt with DeepSeek's pre-tokenizer and special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    with gzip.open(os.path.join(ROOT, "testdata", "tokenizer.json.gz"), "rt", encoding="utf-8") as f:
        real = json.load(f)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = Tokenizer.from_str(json.dumps(dict(
        real, added_tokens=[], model=dict(real["model"], vocab={}, merges=[])))).pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(CHAT), special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([os.path.join(d, "train.txt")], trainer)
    out = json.loads(tok.to_str())
    vocab = out["model"]["vocab"]
    for c in CHAT:
        vocab[c] = len(vocab)
    assert [vocab[t] for t in (BOS, EOS, PAD)] == [0, 1, 2]
    for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        out[k] = real[k]
    out["added_tokens"] = [dict(id=vocab[c], content=c, single_word=False, lstrip=False, rstrip=False,
                                normalized=False, special=True) for c in [BOS, EOS, PAD] + CHAT]
    out["model"] = dict(real["model"], vocab=vocab, merges=out["model"]["merges"])
    path = os.path.join(d, "tokenizer.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False)
    with open(os.path.join(ROOT, "testdata", "tokenizer_config.json")) as f:
        tc = f.read()
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write(tc)
    t = Tokenizer.from_file(path)
    sample = "It is a truth universally acknowledged, that a single man"
    assert t.decode(t.encode(sample).ids) == sample
    return t.get_vocab_size(), len(t.encode(sample).ids)


def run(cmd, **kw):
    line = " ".join(cmd)
    print("+ " + (line if len(line) < 400 else line[:200] + " ... " + line[-150:]), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "dryrun"))
    ap.add_argument("--minutes", type=float, default=6)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/run as it is")
    a = ap.parse_args()
    corpus, runs, model_dir, ref = (os.path.join(a.out, x) for x in ("corpus", "run", "model", "ref"))
    os.makedirs(corpus, exist_ok=True)
    summary = {}
    if not os.path.exists(os.path.join(corpus, "tokenizer.json")):
        n, tr, va = build_corpus(corpus)
        v, n_sample = build_tokenizer(corpus, a.vocab)
        print(f"corpus: {n} files, {tr} train + {va} valid characters; tokenizer: {v} tokens")
    py = sys.executable
    if not a.skip_train:
        run([py, os.path.join(HERE, "train_model.py"), "--train", os.path.join(corpus, "train.txt"),
             "--valid", os.path.join(corpus, "valid.txt"), "--tokenizer", os.path.join(corpus, "tokenizer.json"),
             "--out", runs, "--preset", a.preset, "--steps", str(a.steps), "--batch", str(a.batch),
             "--seq", str(a.seq), "--lr", str(a.lr), "--warmup", "10", "--experts-impl", "eager", "--minutes", str(a.minutes),
             "--save-every", "100", "--log-every", "10", "--eval-tokens", "0"])
    run([py, os.path.join(HERE, "export_model.py"), runs, model_dir, "--valid", os.path.join(corpus, "valid.txt"),
         "--seq", str(a.seq), "--eval-tokens", "0", "--reference", ref, "--excerpt", "400"])
    run(["make", "-C", ROOT, "nvfp4"])
    nv = os.path.join(ROOT, "nvfp4")
    gen = run([nv, "--cpu", model_dir, "It is a truth universally acknowledged", "-n", "20", "--temp", "0"],
              capture_output=True, text=True)
    print("nvfp4 greedy:", gen.stdout)
    summary["greedy"] = gen.stdout
    with open(os.path.join(ref, "ids.txt")) as f:
        ids = f.read().strip()
    dump = os.path.join(ref, "nvfp4_cpu_logits.bin")
    run([nv, "--cpu", model_dir, "--ids", ids, "--dump-logits", dump, "-n", "1", "--temp", "0"], capture_output=True)
    summary["compare_rc"] = None
    cmp = subprocess.run([py, os.path.join(HERE, "compare_logits.py"), dump, os.path.join(ref, "hf_dequant_logits.bin"),
                          "--ids", os.path.join(ref, "ids.txt"), "--skip", os.path.join(ref, "tie_rows.txt")],
                         capture_output=True, text=True)
    print(cmp.stdout + cmp.stderr)
    summary["compare"], summary["compare_rc"] = cmp.stdout, cmp.returncode
    with open(os.path.join(ref, "export_report.json")) as f:
        summary["export"] = json.load(f)
    with open(os.path.join(a.out, "dryrun.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
