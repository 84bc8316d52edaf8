#!/usr/bin/env python3
"""Compare two float32 logit dumps row by row (nvfp4 --dump-logits against the reference that
tools/export_model.py --reference writes):

    python3 tools/compare_logits.py NVFP4.bin REFERENCE.bin --ids ids.txt [--vocab V]

Prints the largest and mean per-row relative error max|a - b| / max|b|, how many rows agree on
the argmax, and, with --ids (comma-separated ids, as fed), the mean NLL of the next tokens under
each dump. Exit status 1 when the largest relative error exceeds --tol (default 1e-3)."""
import argparse, sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--ids")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    a, b = np.fromfile(args.a, np.float32), np.fromfile(args.b, np.float32)
    ids = None
    if args.ids:
        with open(args.ids) as f:
            ids = np.array([int(x) for x in f.read().strip().split(",")])
    rows = len(ids) if ids is not None else None
    vocab = args.vocab or (b.size // rows)
    assert a.size == b.size and b.size % vocab == 0, (a.size, b.size, vocab)
    a, b = a.reshape(-1, vocab).astype(np.float64), b.reshape(-1, vocab).astype(np.float64)
    rel = np.abs(a - b).max(1) / np.abs(b).max(1)
    worst = int(rel.argmax())
    print(f"{a.shape[0]} rows x {vocab}: relative error per row max {rel.max():.3e} (row {worst}), "
          f"mean {rel.mean():.3e}, median {np.median(rel):.3e}; argmax agrees on "
          f"{int((a.argmax(1) == b.argmax(1)).sum())}/{a.shape[0]} rows")
    if ids is not None:
        def nll(x):
            x = x[:-1]
            lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
            return float((lse - x[np.arange(len(x)), ids[1:]]).mean())
        na, nb = nll(a), nll(b)
        print(f"mean NLL of the next tokens: {na:.6f} ({args.a}) vs {nb:.6f} ({args.b}); "
              f"perplexity {np.exp(na):.4f} vs {np.exp(nb):.4f}")
    sys.exit(1 if rel.max() > args.tol else 0)


if __name__ == "__main__":
    main()
