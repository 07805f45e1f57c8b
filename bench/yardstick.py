#!/usr/bin/env python
"""The yardstick: the learned gate beside the copy rule and the oracle, on all, copy and non-copy positions, on
the test book and on held-out genres that nothing was tuned on.

    python bench/yardstick.py [--gate runs/demo/gate] [--demo-run runs/demo] [--genres data/genres]
                              [--run runs/genres] [--per-book 40] [--out bench/results/yardstick]

Steps, each a real `train.py` command (printed and written into the report; resumed, or skipped when its output
is there): 1. per genre, corpus, selfgen and record; 2. evaluate the gate on the demo's test book and on each
genre; 3. per genre, `train.py calibrate` on half of its continuations, evaluated on the other half.
Writes OUT.json (every metrics.json it read) and OUT.md (the tables and the commands). Each step: docs/bench.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.files import write_result

ROOT = Path(__file__).resolve().parents[1]

LEVEL = "0.99"
PY = sys.executable


def run(cmd: list[str], log: list[str], skip: bool = False) -> None:
    """Run one train.py command from the repo root; stop the benchmark if it fails. skip: its output is there
    already (a resumed run): only listed, as the command that made it."""
    line = " ".join(shlex.quote(c) for c in cmd)
    log.append(line + ("  # output there already: reused" if skip else ""))
    if skip:
        return
    print(f"[yardstick] {line}", file=sys.stderr, flush=True)
    if subprocess.run([PY, *cmd], cwd=ROOT).returncode != 0:
        sys.exit(f"[yardstick] failed: {line}")


def done(path: Path) -> bool:
    return (path / "manifest.json").is_file() or (path / "manifest.jsonl").is_file() or \
        (path / "metrics.json").is_file()


def prepare_genre(epub: Path, run_dir: Path, args, log) -> None:
    corpus, selfgen = run_dir / "corpus", run_dir / "selfgen"
    # every book id has a '-' (title slug, '-', hash): the pin puts the genre's book into the test split
    run(["train.py", "corpus", "--epubs", str(epub), "--out", str(corpus), "--pin", "test=-", "--quiet"], log,
        skip=done(corpus))
    have = done(selfgen) and done(run_dir / "selfgen_records")
    run(["train.py", "selfgen", "--model", args.model, "--corpus", str(corpus), "--out", str(selfgen),
         "--splits", "test", "--per-book", str(args.per_book), "--no-progress"], log, skip=have)
    run(["train.py", "record", "--model", args.model, "--corpus", str(selfgen),
         "--out", str(run_dir / "selfgen_records")], log, skip=have)
    run(["train.py", "record", "--model", args.model, "--corpus", str(corpus), "--out", str(run_dir / "records"),
         "--max-tokens-per-book", str(args.book_tokens)], log, skip=done(run_dir / "records"))


def evaluate(records: Path, gate: Path, out: Path, log, part: str | None = None, force: bool = False) -> dict:
    cmd = ["train.py", "evaluate", "--records", str(records), "--gate", str(gate), "--out", str(out), "--no-probes"]
    run(cmd + (["--part", part] if part else []), log, skip=done(out) and not force)
    return json.loads((out / "metrics.json").read_text())


def row(name: str, m: dict) -> dict:
    """The figures of one evaluation at 99% precision: all / copy / non-copy positions, calibrated threshold."""
    gate = f"gate:{m['target']['best_gate'].split(':')[-1]}"
    cap, nc, cp = m["coverage_at_precision"], m["non_copy"], m["copy_positions"]
    cal = m["calibrated"].get(gate.split(":")[1], {})
    return {"data": name, "pairs": m["pairs"], "copy_share": 1 - nc["share"],
            "gate": cap[gate][LEVEL], "copy": cap["copy"][LEVEL], "oracle": cap["oracle"][LEVEL],
            "gate_copy_pos": cp["coverage_at_precision"][gate][LEVEL],
            "copy_copy_pos": cp["coverage_at_precision"]["copy"][LEVEL],
            "gate_non_copy": nc["coverage_at_precision"][gate][LEVEL],
            "copy_non_copy": nc["coverage_at_precision"]["copy"][LEVEL],
            "oracle_non_copy": nc["coverage_at_precision"]["oracle"][LEVEL],
            "head_accuracy_non_copy": nc.get("head_accuracy"),
            "calibrated_coverage": cal.get("test_coverage"), "calibrated_precision": cal.get("test_precision"),
            "target_precision": m.get("target_precision")}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(rows: list[dict], recal: list[dict], log: list[str], argv: list[str], seconds: float) -> str:
    out = ["# Yardstick: learned gate vs copy rule vs oracle", "",
           f"Command: `python bench/yardstick.py {' '.join(argv)}` ({seconds / 60:.1f} min; steps whose output was "
           "there are listed below as reused).", "",
           "Coverage = share of (position, distance since the big pass) pairs skipped at 99% precision (the "
           "threshold of each method chosen on the pairs themselves: a comparison of rankings). Copy positions: "
           "the 4 tokens before the position occurred earlier in its context. `copy` is the copy rule (prompt "
           "lookup as a gate, no training; score = match length). Oracle: skip exactly where some proposal "
           "(the drafter's candidates or the copy rule's) is the big model's token. Calibrated: the gate's own "
           "threshold (Learn-then-Test on the demo's validation book) applied as it is.", "",
           "| data | pairs | copy share | gate | copy rule | oracle | gate, copy pos. | copy rule, copy pos. | "
           "gate, non-copy | copy rule, non-copy | oracle, non-copy | calibrated: coverage / precision |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['data']} | {r['pairs']:,} | {pct(r['copy_share'])} | {pct(r['gate'])} | {pct(r['copy'])} | "
                   f"{pct(r['oracle'])} | {pct(r['gate_copy_pos'])} | {pct(r['copy_copy_pos'])} | "
                   f"{pct(r['gate_non_copy'])} | {pct(r['copy_non_copy'])} | {pct(r['oracle_non_copy'])} | "
                   f"{pct(r['calibrated_coverage'])} / {pct(r['calibrated_precision'])} |")
    if recal:
        out += ["", "Recalibration on a genre (`train.py calibrate` on half of its continuations, evaluated on the "
                "other half; oracle: its coverage at 99% precision on that half; target: precision >= 99% at >= 50% "
                "of the oracle):", "", "| genre | before: coverage / precision | after: coverage / precision | "
                "oracle | after / oracle |", "|---|---|---|---|---|"]
        for r in recal:
            share = r["after_coverage"] / r["oracle"] if r.get("oracle") and r["after_coverage"] is not None else None
            out.append(f"| {r['data']} | {pct(r['before_coverage'])} / {pct(r['before_precision'])} | "
                       f"{pct(r['after_coverage'])} / {pct(r['after_precision'])} | {pct(r.get('oracle'))} | "
                       f"{'-' if share is None else f'{share:.2f}'} |")
    out += ["", "Commands run:", ""] + [f"    python {c}" for c in log]
    return "\n".join(out) + "\n"


def recalibrate(name: str, run_dir: Path, gate: Path, log, force: bool) -> dict:
    records, g2 = run_dir / "selfgen_records", run_dir / "gate_recalibrated"
    before = evaluate(records, gate, run_dir / "eval_part2", log, part="2/2", force=force)
    run(["train.py", "calibrate", "--records", str(records), "--gate", str(gate), "--out", str(g2),
         "--split", "test", "--part", "1/2"], log, skip=(g2 / "drafter.json").is_file() and not force)
    after = evaluate(records, g2, run_dir / "eval_part2_recalibrated", log, part="2/2", force=force)
    b, a = row(name, before), row(name, after)
    return {"data": name, "before_coverage": b["calibrated_coverage"], "before_precision": b["calibrated_precision"],
            "after_coverage": a["calibrated_coverage"], "after_precision": a["calibrated_precision"],
            "oracle": a["oracle"], "target": a["target_precision"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="bench/yardstick.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gate", type=Path, default=Path("runs/demo/gate"), help="the trained drafter")
    ap.add_argument("--demo-run", type=Path, default=Path("runs/demo"), help="the demo's run folder (its "
                    "selfgen_records hold the test book's continuations)")
    ap.add_argument("--model", default="smollm2-135m", help="the gate's big model (records and continuations)")
    ap.add_argument("--genres", type=Path, default=Path("data/genres"), help="one EPUB per held-out genre")
    ap.add_argument("--run", type=Path, default=Path("runs/genres"), help="where the genre runs are kept")
    ap.add_argument("--per-book", type=int, default=40, help="greedy continuations per genre")
    ap.add_argument("--book-tokens", type=int, default=4000, help="teacher-forced positions per genre book")
    ap.add_argument("--force", action="store_true", help="evaluate again even where metrics exist")
    ap.add_argument("--out", type=Path, default=Path("bench/results/yardstick"), help="output path, no extension")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    t0, log = time.time(), []
    genres = sorted(args.genres.glob("*.epub"))
    if not genres:
        sys.exit(f"error: no EPUB in {args.genres} (make them with python data/make_genre_books.py)")
    rows, metrics, recal = [], {}, []
    m = evaluate(args.demo_run / "selfgen_records", args.gate, args.run / "demo_test_book", log, force=args.force)
    metrics["test book (greedy continuations)"] = m
    rows.append(row("test book, greedy continuations", m))
    for epub in genres:
        name = epub.stem
        run_dir = args.run / name
        prepare_genre(epub, run_dir, args, log)
        for kind in ("selfgen_records", "records"):
            label = f"{name}, {'greedy continuations' if kind == 'selfgen_records' else 'book text'}"
            metrics[label] = evaluate(run_dir / kind, args.gate, run_dir / f"eval_{kind}", log, force=args.force)
            rows.append(row(label, metrics[label]))
        recal.append(recalibrate(name, run_dir, args.gate, log, args.force))
    md = markdown(rows, recal, log, argv, time.time() - t0)
    write_result(args.out, {"rows": rows, "recalibration": recal, "commands": log, "metrics": metrics}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
