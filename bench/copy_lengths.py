#!/usr/bin/env python
"""How precise is the copy rule, by match length? Coverage and precision of prompt lookup used as a gate.

    python bench/copy_lengths.py RECORDS... [--split test] [--max-n 64] [--out bench/results/copy_lengths]

For each records folder: at every recorded position, the copy rule's candidate (the token after the most recent
earlier occurrence of the longest suffix, up to --max-n tokens; gate/model/copyrule.py) against the big model's
greedy token; for each minimum match length, the share of positions with at least that match (coverage) and how
often the candidate is right there (precision). Shows how long a match must be for 99% precision on each kind
of text: what the drafter's copy-rule cap (MAX_N) must reach.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from common.errors import ProjectError, fail
from common.files import write_result
from corpus_tools.records import open_records
from gate.model.copyrule import copy_rule
from gate.model.heads import run_starts

LENGTHS = (4, 8, 12, 16, 24, 32, 48, 64)


def by_length(path: str, split: str, max_n: int) -> dict:
    rec = open_records(path)
    name = rec.models[0]
    a = rec.load(split, fields=["token", "book", "pos", "argmax"], models=[name])
    tokens, argmax = np.asarray(a["token"]), np.asarray(a[f"{name}/argmax"])
    cand, length = copy_rule(tokens, run_starts(np.asarray(a["book"]), np.asarray(a["pos"])), max_n)
    right = cand == argmax
    return {str(n): {"coverage": float((length >= n).mean()),
                     "precision": float(right[length >= n].mean()) if (length >= n).any() else None}
            for n in LENGTHS if n <= max_n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/copy_lengths.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", help="records folders (python train.py record)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-n", type=int, default=64)
    ap.add_argument("--out", default="bench/results/copy_lengths", help="output path without extension")
    args = ap.parse_args(argv)
    try:
        res = {r: by_length(r, args.split, args.max_n) for r in args.records}
    except (ProjectError, KeyError) as e:   # no records there, a split they lack: one line
        return fail("bench/copy_lengths.py", e)
    cols = [n for n in LENGTHS if n <= args.max_n]
    lines = ["# Copy rule precision by match length", "",
             f"Command: `python bench/copy_lengths.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "Each cell: coverage (share of positions with a match of at least that many tokens) / precision (the "
             "rule's token equals the big model's greedy token).", "",
             "| records | " + " | ".join(f">= {n}" for n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r, row in res.items():
        lines.append(f"| {r} | " + " | ".join(
            f"{100 * row[str(n)]['coverage']:.1f}% / " + ("-" if row[str(n)]["precision"] is None
                                                          else f"{100 * row[str(n)]['precision']:.2f}%")
            for n in cols) + " |")
    md = "\n".join(lines) + "\n"
    write_result(args.out, res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
