#!/usr/bin/env python
"""The feature head (EAGLE-3's layout, `train.py fit --drafter eagle`) beside the copy rule and the oracle, on the
test split of labelled records folders (the test book, held-out genres), teacher-forced.

    python bench/eagle.py --eagle runs/eagle3/gate \
        --data "test book, greedy continuations=runs/eagle3/novels_records" "manual=runs/genres/.../selfgen_records3" \
        [--profile bench/results/profile_smollm2.json] [--out bench/results/eagle3]

Per folder, on all, copy and non-copy positions (non-copy: the 4 tokens before are nowhere earlier): first-token
agreement with the big model's greedy token and agreement by chain depth; coverage at 99% precision of the gate,
the copy rule and the oracle; tau(k), the mean tokens per verify pass when every pass drafts a chain of up to k
tokens (k = 1 .. the head's depth), for the head, the copy rule (drafts only where it has a match) and the oracle
of both; and the speed-up the measured cost curves predict for each (`--profile`: train.py profile --json files;
and a flat curve, one step per pass whatever its length, as on a GPU). Measured per step, at the decode's torch
threads: the head's draft step (its int8 copy), a whole proposal (step, gate, copy rule) and a big-model step on
llama.cpp. Writes OUT.json and OUT.md. Each measure: docs/bench.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from common.errors import ProjectError, one_line
from common.files import write_json, write_text
from gate.model.load import load_drafter
from gate.train.data import load_split, open_records_checked
from gate.train.evaluate_eagle import eagle_metrics, pct, report

PUBLISHED = ("EAGLE-3 (Li et al. 2025), chain/tree drafts on LLaMA-3.1-8B, MT-bench: tau 6.1 (tree); "
             "EAGLE-3's head for Qwen3-1.7B in llama.cpp on chat: 2.17 tokens per verify pass (issue 28); "
             "vLLM's EAGLE heads: first-draft acceptance 57-62%")


def predicted(chain: dict, curves: dict, draft_ms: float) -> dict:
    """Speed-up over one token per step that each cost curve predicts for drafting chains of k (the head drafts k
    on every pass at draft_ms a proposal; the copy rule k where it has a match, for free)."""
    out = {}
    for label, c in curves.items():
        cost = dict(zip(c["ks"], c["cost"])) if c else {}
        of = (lambda n: cost.get(n, max(cost.values()))) if cost else (lambda n: 1.0)
        d = draft_ms / (c["step_ms"] if c else next((v["step_ms"] for v in curves.values() if v), 10.0))
        row = {}
        for k, t in chain["by_k"].items():
            if t["head_tau"] is None:
                continue
            share = t["copy_drafting_share"]
            row[k] = {"head": t["head_tau"] / (of(k + 1) + k * d),
                      "copy": t["copy_tau"] / (share * of(k + 1) + (1 - share) * of(1))}
        out[label] = row
    return out


def one_dataset(label: str, records: str, dr, curves: dict, draft_ms: float) -> dict:
    rec = open_records_checked(Path(records))
    te = load_split(rec, records, "test", dr.meta["big_model"]["name"], dr.head.layers)
    res = {"records": records, **eagle_metrics(dr, te, label)}
    for name in ("all", "non_copy"):
        res[name]["predicted_speedup"] = predicted(res[name]["chains"], curves, draft_ms)
    a, nc, k = res["all"], res["non_copy"], dr.depth
    print(f"[eagle] {label}: first-token agreement {pct(a['first_token_agreement'])} (non-copy "
          f"{pct(nc['first_token_agreement'])}); tau(k={k}) head {a['chains']['by_k'][k]['head_tau']:.2f} copy "
          f"{a['chains']['by_k'][k]['copy_tau']:.2f}", file=sys.stderr, flush=True)
    return res


def step_costs(dr, gguf: str, threads: int, reps: int = 80) -> dict:
    """Medians in ms on a 64-token context: one draft step of the decode path's head (its int8 copy), a whole
    EagleDrafter.propose (step + gate + copy rule), and one big-model step on llama.cpp (`threads` threads)."""
    import torch

    from runtimes.llamacpp import LlamaCppBackend

    big = LlamaCppBackend(gguf, name="big", hidden_layer=dr.hidden_layer, n_ctx=256, n_threads=threads)
    ids = list(range(1000, 1064))
    t = {"head_step": [], "propose": [], "big_step": []}
    try:
        with torch.inference_mode():
            _, hid = big.forward(ids[:-1])                    # the big model has computed positions 0 .. 62
            hid = torch.as_tensor(np.asarray(hid))
            for i in range(reps):
                big.crop(len(ids) - 2)
                t0 = time.perf_counter()
                big.forward(ids[-2:-1])                       # one decode step
                t["big_step"].append(time.perf_counter() - t0)
                dr.start()
                dr.propose(ids, hid, 1)                       # true entries for the context
                t0 = time.perf_counter()
                dr.propose(ids + [ids[i % 60]], hid, 2)       # one chain entry + gate + copy rule
                t["propose"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dr.cache.draft(ids + [ids[i % 60], ids[3]], hid)   # one chain entry alone
                t["head_step"].append(time.perf_counter() - t0)
    finally:
        big.close()
    return {k: round(1000 * float(np.median(v)), 3) for k, v in t.items()}


def markdown(results: dict, cmd: str, meta: dict, ms: dict, load: str, depth: int) -> str:
    share = ms["propose"] / ms["big_step"]
    lines = ["# The feature head (EAGLE-3 layout) beside the copy rule and the oracle", "", f"`{cmd}`", "",
             f"Load before: {load}. Head: {meta['cost']['head_params'] / 1e6:.2f}M trained parameters, "
             f"{meta['cost']['head_flops_per_token'] / 1e6:.1f} MFLOP per draft step, draft vocabulary "
             f"{meta['draft_vocab']['size']} tokens (covers {pct(meta['draft_vocab']['big_argmax_covered']['val'])} of "
             f"the big model's greedy tokens on validation), trained on "
             f"{meta['training_data']['head_positions']:,} positions. Measured (median, {ms['threads']} threads, "
             f"64-token context): {ms['head_step']:.2f} ms per draft step (int8), {ms['propose']:.2f} ms per "
             f"proposal with the gate and the copy rule = **{share:.1%} of a big-model step** on llama.cpp "
             f"({ms['big_step']:.2f} ms).", "",
             "Teacher-forced on each folder's test split (gate/train/evaluate_eagle.py). *First token*: the head's "
             "top draft at depth 1 equals the big model's greedy token (the copy rule's: it has a candidate and it "
             "is right). *Coverage @99%*: the largest share of pairs a threshold on the score skips with >= 99% "
             "right. *tau(k)*: mean tokens per verify pass drafting chains of up to k on every pass (the copy rule "
             f"only where it has a match). Published, for scale: {PUBLISHED}.", ""] + report(results, depth)
    ks = list(range(1, depth + 1))
    lines += ["", "Predicted speed-up over plain decoding from the cost curves (all positions), drafting chains "
              "of k on every pass: head / copy rule. *flat*: a verify pass costs one step whatever its length "
              "(GPUs, the engines users serve with).", "",
              "| data | curve | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for label, r in results.items():
        for curve, row in r["all"]["predicted_speedup"].items():
            lines.append(f"| {label} | {curve} | " + " | ".join(
                f"{row[k]['head']:.2f}x / {row[k]['copy']:.2f}x" if k in row else "-" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def read_curves(paths: list[str]) -> dict:
    """{label: {ks, cost, step_ms}} from train.py profile --json files, plus the flat curve (None)."""
    curves = {}
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise ProjectError(f"--profile {p}: cannot read it ({e})") from None
        for label, prof in d.items():
            curves[label] = {"ks": prof["ks"], "cost": prof["cost"], "step_ms": prof["step_ms"]}
    curves["flat"] = None
    return curves


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--eagle", required=True, help="feature-head artifact (train.py fit --drafter eagle)")
    ap.add_argument("--data", nargs="+", required=True, metavar="LABEL=RECORDS",
                    help="records folders to evaluate on (their test split), each labelled")
    ap.add_argument("--profile", nargs="*", default=[], help="cost curves (train.py profile --json FILE)")
    ap.add_argument("--gguf", help="the big model's GGUF for the step timings (default: the artifact's packaged "
                                   "model)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads for the step timings")
    ap.add_argument("--out", default="bench/results/eagle3", help="output path without extension")
    args = ap.parse_args(argv)
    data = [item.rpartition("=")[::2] for item in args.data]
    bad = [item for item, (label, records) in zip(args.data, data) if not label or not Path(records).is_dir()]
    if bad:
        print(f"error: --data {bad[0]!r}: write LABEL=RECORDS, RECORDS a records folder", file=sys.stderr)
        return 2
    try:
        return run(args, data, argv)
    except ProjectError as e:   # a bad artifact or records folder is one line; anything else is a bug
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def run(args, data: list[tuple[str, str]], argv) -> int:
    import torch

    from gate.model.features import torch_threads
    from runtimes.sources import packaged_gguf

    dr = load_drafter(args.eagle, None)
    if not getattr(dr, "reads_all_hidden", False):
        print(f"error: --eagle {args.eagle}: not a feature-head drafter (train.py fit --drafter eagle)",
              file=sys.stderr)
        return 2
    curves = read_curves(args.profile)
    load = f"{os.getloadavg()[0]:.2f} (1 min)"
    gguf = args.gguf or str(packaged_gguf(dr.meta["big_model"]["name"])[0])
    with torch_threads(args.threads):
        costs = {**step_costs(dr, gguf, args.threads), "threads": args.threads, "torch": torch.__version__}
    print(f"[eagle] ms per step: {costs}", file=sys.stderr, flush=True)
    results = {label: one_dataset(label, records, dr, curves, costs["propose"]) for label, records in data}
    cmd = "python bench/eagle.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_json(Path(args.out + ".json"), {"command": cmd, "load": load, "results": results, "step_ms": costs,
                                          "published": PUBLISHED, "eagle_meta": {
        k: dr.meta.get(k) for k in ("cost", "draft_vocab", "training_data", "calibration", "config")}})
    write_text(Path(args.out + ".md"), markdown(results, cmd, dr.meta, costs, load, dr.depth))
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
