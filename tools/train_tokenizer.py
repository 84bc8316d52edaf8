#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of the demonstration model (issue 8).

What: trains a BPE of VOCAB ids in all (default 4096) on OUT_DIR/train.txt of
tools/build_corpus.py with HF `tokenizers`, using exactly DeepSeek V3/V4's pipeline, copied
from the real tokenizer (testdata/tokenizer.json.gz) so that nvfp4 accepts it: no normalizer
(empty Sequence), pre-tokenizer Sequence[Split \\p{N}{1,3}, Split CJK runs, Split DeepSeek's
main regex (all Isolated), ByteLevel(add_prefix_space=false, use_regex=false)], ByteLevel
decoder and post-processor as in the real file. Ids:
    0 <｜begin▁of▁sentence｜>   1 <｜end▁of▁sentence｜>   2 <｜▁pad▁｜>    (special, as DeepSeek)
    3 .. VOCAB-5               the 256 byte symbols, then the learned merges
    VOCAB-4 .. VOCAB-1         <｜User｜> <｜Assistant｜> <think> </think>  (added tokens, not
                               special, as DeepSeek's chat tokens)
Writes OUT/tokenizer.json and OUT/tokenizer_config.json (DeepSeek's, with add_bos_token true,
bos <｜begin▁of▁sentence｜>, eos/pad <｜end▁of▁sentence｜> and its chat template).
Training is deterministic for a given corpus and tokenizers version.

With --check MODEL_BINARY (./nvfp4) it also compares nvfp4's --tokenize with HF's ids on
--lines lines spread evenly over valid.txt (each line alone), 50 of them joined as one text,
testdata/heldout.txt whole, and two texts of digits, CJK, emoji, CRLF and chat tokens: nvfp4 gets
a scratch model dir holding a copy of testdata/tiny-a/config.json with vocab_size set, and the
new tokenizer.json; nvfp4 prepends BOS (id 0), HF does not (add_special_tokens=False).

Run:
    python3 -m venv /work/venv-corpus && /work/venv-corpus/bin/pip install tokenizers
    /work/venv-corpus/bin/python tools/train_tokenizer.py [--corpus build/corpus]
        [--out build/tokenizer] [--vocab 4096] [--check ./nvfp4 --lines 200]
Tested with Python 3.11.7, tokenizers 0.23.3 (pip).
"""
import argparse, gzip, json, os, subprocess, sys, tempfile

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ['<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<｜▁pad▁｜>']
CHAT = ['<｜User｜>', '<｜Assistant｜>', '<think>', '</think>']


def deepseek_parts():
    real = json.load(gzip.open(os.path.join(HERE, 'testdata', 'tokenizer.json.gz'), 'rt',
                               encoding='utf-8'))
    return {k: real[k] for k in ('normalizer', 'pre_tokenizer', 'post_processor', 'decoder')}


def train(corpus, vocab):
    parts = deepseek_parts()
    steps = []
    for p in parts['pre_tokenizer']['pretokenizers']:
        if p['type'] == 'Split':
            assert p['behavior'] == 'Isolated' and not p['invert']
            steps.append(pre_tokenizers.Split(Regex(p['pattern']['Regex']), 'isolated'))
        else:
            assert p['type'] == 'ByteLevel' and not p['add_prefix_space'] and not p['use_regex']
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(CHAT), min_frequency=2,
                                  special_tokens=[AddedToken(s, normalized=False, special=True)
                                                  for s in SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([corpus], trainer)
    tok.add_tokens([AddedToken(s, normalized=True, special=False) for s in CHAT])
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    # the exact JSON of DeepSeek's pipeline around the model, so nvfp4 sees the real thing
    j = json.loads(tok.to_str())
    j.update(parts)
    return Tokenizer.from_str(json.dumps(j, ensure_ascii=False)), j


def write(out, j):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'tokenizer.json'), 'w', encoding='utf-8') as f:
        json.dump(j, f, ensure_ascii=False, indent=2)
        f.write('\n')
    cfg = json.load(open(os.path.join(HERE, 'testdata', 'tokenizer_config.json'), encoding='utf-8'))
    cfg['add_bos_token'] = True
    cfg['add_eos_token'] = False
    with open(os.path.join(out, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
        f.write('\n')


def check(binary, out, vocab, texts):
    """Number of texts whose nvfp4 --tokenize ids differ from HF's (details printed)."""
    tok = Tokenizer.from_file(os.path.join(out, 'tokenizer.json'))
    bad = 0
    with tempfile.TemporaryDirectory() as d:
        cfg = json.load(open(os.path.join(HERE, 'testdata', 'tiny-a', 'config.json')))
        cfg['vocab_size'] = vocab
        json.dump(cfg, open(os.path.join(d, 'config.json'), 'w'), indent=2)
        for name in ('tokenizer.json', 'tokenizer_config.json'):
            with open(os.path.join(out, name), 'rb') as src, open(os.path.join(d, name), 'wb') as dst:
                dst.write(src.read())
        for i, text in enumerate(texts):
            path = os.path.join(d, 'prompt.txt')
            with open(path, 'w', encoding='utf-8', newline='') as f:
                f.write(text)
            r = subprocess.run([binary, '--tokenize', '-f', path, d], capture_output=True, text=True)
            if r.returncode:
                print('text %d: nvfp4 failed (%d): %s' % (i, r.returncode, r.stderr.strip()))
                bad += 1
                continue
            got = [int(x) for x in r.stdout.replace('\n', ',').split(',') if x.strip()]
            want = [0] + tok.encode(text, add_special_tokens=False).ids
            if got != want:
                bad += 1
                k = next((n for n, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                print('text %d MISMATCH at id %d: nvfp4 %s, HF %s; text %r' %
                      (i, k, got[k:k + 8], want[k:k + 8], text[:120]))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--corpus', default=os.path.join(HERE, 'build', 'corpus'))
    ap.add_argument('--out', default=os.path.join(HERE, 'build', 'tokenizer'))
    ap.add_argument('--vocab', type=int, default=4096)
    ap.add_argument('--check', metavar='NVFP4', help='compare this nvfp4 binary\'s --tokenize')
    ap.add_argument('--lines', type=int, default=200, help='valid.txt lines to compare')
    args = ap.parse_args()

    tok, j = train(os.path.join(args.corpus, 'train.txt'), args.vocab)
    write(args.out, j)
    valid = open(os.path.join(args.corpus, 'valid.txt'), encoding='utf-8').read()
    ids = tok.encode(valid, add_special_tokens=False).ids
    print('tokenizer: %d ids (%d merges) -> %s' % (tok.get_vocab_size(), len(j['model']['merges']),
                                                    args.out))
    print('valid.txt: %d bytes, %d tokens, %.2f bytes/token' % (len(valid.encode()), len(ids),
                                                                 len(valid.encode()) / len(ids)))
    assert tok.decode(ids, skip_special_tokens=False) == valid, 'decode(encode(valid)) differs'
    for s in SPECIAL + CHAT:
        print('  %5d %s' % (tok.token_to_id(s), s))
    if args.check:
        lines = [l for l in valid.split('\n') if l.strip()]
        step = max(1, len(lines) // args.lines)          # spread over every source
        lines = lines[::step][:args.lines]
        heldout = open(os.path.join(HERE, 'testdata', 'heldout.txt'), encoding='utf-8').read()
        texts = lines + ['\n\n'.join(lines[:50]), heldout,
                         'It is a truth universally acknowledged 1234567 “quotes” — 中文 ️emoji 🙂\r\n',
                         '<｜User｜>Hello<｜Assistant｜></think>Hi.<｜end▁of▁sentence｜>']
        bad = check(args.check, args.out, args.vocab, texts)
        print('nvfp4 --tokenize vs HF: %d of %d texts differ' % (bad, len(texts)))
        sys.exit(1 if bad else 0)


if __name__ == '__main__':
    main()
