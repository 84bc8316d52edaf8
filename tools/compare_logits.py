#!/usr/bin/env python3
"""Compare two float32 logit dumps row by row (nvfp4 --dump-logits against the reference that
tools/export_model.py --reference writes):

    python3 tools/compare_logits.py NVFP4.bin REFERENCE.bin --ids ids.txt [--skip tie_rows.txt] [--vocab V]

Prints the largest and mean per-row relative error max|a - b| / max|b|, how many rows agree on
the argmax, and, with --ids (comma-separated ids, as fed), the mean NLL of the next tokens under
each dump. --skip names rows (comma-separated; export_model.py's tie_rows.txt: where the
indexer's or a router's top-k is decided by a tie) whose errors are reported apart, as are those
of the rows before the first of them. Exit status 1 when the largest relative error of any row
exceeds --tol (default 1e-4)."""
import argparse, sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--ids")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--skip")
    ap.add_argument("--tol", type=float, default=1e-4)
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
    skip = set()
    if args.skip:
        with open(args.skip) as f:
            skip = {int(x) for x in f.read().strip().split(",") if x}
    keep = np.array([r not in skip for r in range(len(rel))])
    clean = np.arange(len(rel)) < min(skip | {len(rel)})   # before the first tie: nothing can differ but rounding
    worst = int(np.where(clean, rel, -1).argmax())
    print(f"{a.shape[0]} rows x {vocab}: relative error per row (max|a-b| / max|b|) over the {int(clean.sum())} rows "
          f"before the first tie: max {rel[clean].max():.3e} (row {worst}), mean {rel[clean].mean():.3e}, "
          f"median {np.median(rel[clean]):.3e}")
    if skip:
        print(f"over all {int(keep.sum())} rows without a tie of their own: max {rel[keep].max():.3e}, median "
              f"{np.median(rel[keep]):.3e}, {int((rel[keep] > args.tol).sum())} rows above {args.tol:g} (moved "
              f"by an earlier tie broken otherwise); the {len(skip)} tie rows: max {rel[~keep].max():.3e}, median {np.median(rel[~keep]):.3e}")
    print(f"argmax agrees on {int((a.argmax(1) == b.argmax(1)).sum())}/{a.shape[0]} rows")
    if ids is not None:
        def nll(x):
            x = x[:-1]
            lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
            return float((lse - x[np.arange(len(x)), ids[1:]]).mean())
        na, nb = nll(a), nll(b)
        print(f"mean NLL of the next tokens: {na:.6f} ({args.a}) vs {nb:.6f} ({args.b}); "
              f"perplexity {np.exp(na):.4f} vs {np.exp(nb):.4f}")
    print(f"all {len(rel)} rows: max {rel.max():.3e}, mean {rel.mean():.3e}")
    sys.exit(1 if rel.max() > args.tol else 0)


if __name__ == "__main__":
    main()
