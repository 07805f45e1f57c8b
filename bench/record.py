#!/usr/bin/env python
"""Benchmark `train.py record`: recording tokens/s against a bare forward pass, and bytes per token on disk.

    python bench/record.py [--model smollm2-135m] [--corpus runs/demo/corpus] [--windows 4] [--reps 2]

One process, one model load. Every batch of windows (the recorder's own windows and batches) is run four ways:
  bare         model(x): the forward pass any loop over the text needs (full logits);
  bare_keep    model(x, logits_to_keep=...): the recorder's forward, without anything it adds;
  record       what `train.py record` does per batch: forward with hidden states, statistics, writing the shard
               and hashing it (fp16 hidden states);
  record_int8  the same with --hidden-dtype int8.
Overheads: medians over batches of time(record) / time(bare) - 1, in CPU time and wall time. Targets: overhead
<= 15%, <= 2 KB/token. Why CPU time: docs/bench.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from corpus_tools.corpus import books_of_split, read_book  # noqa: E402
from corpus_tools.record import batches, describe_models, record_windows, windows, write_shard  # noqa: E402
from runtimes.loading import DTYPES, load

OVERHEAD_TARGET, BYTES_TARGET = 0.15, 2048
KINDS = ("bare", "bare_keep", "record", "record_int8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--corpus", default="runs/demo/corpus")
    ap.add_argument("--windows", type=int, default=4, help="windows of the first train book to run")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is a robust measure)")
    ap.add_argument("--out", default="bench/results/record")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    lm = load(args.model, args.dtype)
    book = books_of_split(args.corpus, "train")[0]
    n_pos = args.context + (args.windows - 1) * args.stride
    text = read_book(args.corpus, book["book_id"])[:n_pos * 8]  # ~4.5 chars/token: enough, and fast to tokenize
    ids = torch.tensor(lm.tokenizer(text, verbose=False).input_ids[:n_pos + 1])
    units = batches(windows(n_pos, args.context, args.stride), args.batch_size)
    meta_models = describe_models([lm], ["middle", "last"])
    wall = {k: [] for k in KINDS}  # [rep * len(units) + unit] -> seconds
    cpu = {k: [] for k in KINDS}
    positions = []
    sizes = {"float16": [0, 0], "int8": [0, 0]}  # total bytes, hidden-state bytes
    tmp = Path(tempfile.mkdtemp(prefix="bench-record-"))
    torch.use_deterministic_algorithms(True)  # as in `train.py record`
    try:
        with torch.inference_mode():
            lm.model(ids[None, :64])  # warm-up
            for rep in range(args.reps):
                for u, unit in enumerate(units):
                    n = sum(w.end - w.first for w in unit)
                    positions.append(n)
                    keep = max(w.end - w.first for w in unit)
                    x = torch.stack([ids[w.start:w.end] for w in unit])
                    for kind in KINDS[u % 4:] + KINDS[:u % 4]:
                        t0, c0 = time.perf_counter(), time.process_time()
                        if kind.startswith("bare"):
                            lm.model(x, logits_to_keep=keep if kind == "bare_keep" else 0)
                        else:
                            hd = "int8" if kind == "record_int8" else "float16"
                            shard = tmp / f"{kind}-{rep}-{u}"
                            write_shard(shard, record_windows([lm], meta_models, ids, unit, 8, args.batch_size, hd))
                        wall[kind].append(time.perf_counter() - t0)
                        cpu[kind].append(time.process_time() - c0)
                        if not kind.startswith("bare") and rep == 0:
                            files = [p for p in shard.rglob("*") if p.is_file()]
                            sizes[hd][0] += sum(p.stat().st_size for p in files)
                            sizes[hd][1] += sum(p.stat().st_size for p in files if p.name.startswith("hidden."))
                    print(f"rep {rep} batch {u}: " + ", ".join(f"{k} {n / wall[k][-1]:.0f}" for k in KINDS)
                          + " tok/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def overhead(kind, base, times):
        return statistics.median(t / b - 1 for t, b in zip(times[kind], times[base]))

    n_rec = sum(positions[:len(units)])
    tok_s = {k: statistics.median(n / t for n, t in zip(positions, v)) for k, v in wall.items()}
    over = {clock: {"record": overhead("record", "bare", t), "record_vs_bare_keep": overhead("record", "bare_keep", t),
                    "record_int8": overhead("record_int8", "bare", t), "bare_keep": overhead("bare_keep", "bare", t)}
            for clock, t in (("cpu", cpu), ("wall", wall))}
    res = {
        "command": "python bench/record.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": args.model, "dtype": args.dtype, "context": args.context, "stride": args.stride,
        "batch_size": args.batch_size, "positions_per_rep": n_rec, "reps": args.reps, "book": book["book_id"],
        "threads": args.threads, "median_wall_tok_per_s": tok_s, "wall_seconds": wall, "cpu_seconds": cpu,
        "overhead_vs_bare": over,
        "bytes_per_token": {hd: v[0] / n_rec for hd, v in sizes.items()},
        "hidden_bytes_per_token": {hd: v[1] / n_rec for hd, v in sizes.items()},
        "targets": {"overhead": OVERHEAD_TARGET, "bytes_per_token": BYTES_TARGET},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    bpt, hid = res["bytes_per_token"], res["hidden_bytes_per_token"]
    c, w = over["cpu"], over["wall"]
    md = [f"# Recording benchmark ({args.model}, {args.dtype})", "", f"`{res['command']}`", "",
          f"{res['machine']}; {len(units)} batches ({n_rec} positions of {book['book_id']}) x {args.reps} "
          f"repetitions, context {args.context}, stride {args.stride}, batch size {args.batch_size}. The machine is "
          "shared and noisy: overheads are medians of per-batch ratios of back-to-back runs, in CPU time (robust "
          "with one thread) and wall time; positions/s are wall-clock medians.", "",
          "| run | positions/s (wall) | overhead vs bare forward, CPU time | same, wall time | bytes/token on disk | "
          "of which hidden states |", "|---|---|---|---|---|---|",
          f"| bare forward (full logits) | {tok_s['bare']:.0f} | - | - | - | - |",
          f"| bare forward (logits_to_keep, as the recorder) | {tok_s['bare_keep']:.0f} | {c['bare_keep']:+.1%} | "
          f"{w['bare_keep']:+.1%} | - | - |",
          f"| record, fp16 hidden states (default) | {tok_s['record']:.0f} | {c['record']:+.1%} "
          f"({c['record_vs_bare_keep']:+.1%} vs logits_to_keep) | {w['record']:+.1%} | {bpt['float16']:.0f} | "
          f"{hid['float16']:.0f} |",
          f"| record, `--hidden-dtype int8` | {tok_s['record_int8']:.0f} | {c['record_int8']:+.1%} | "
          f"{w['record_int8']:+.1%} | {bpt['int8']:.0f} | {hid['int8']:.0f} |", "",
          f"Targets: overhead <= {OVERHEAD_TARGET:.0%}, <= {BYTES_TARGET} bytes/token (two layers of "
          f"{lm.info.hidden_size} dims in fp16 alone are {4 * lm.info.hidden_size} bytes).", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
