#!/usr/bin/env python
"""The feature head (EAGLE-style, `train.py fit --drafter eagle`) beside the word/future heads drafter, the copy
rule and the oracle, on the same (t, s) pairs of the test book and of the held-out genres.

    python bench/eagle.py --eagle runs/eagle/gate --heads runs/demo/gate \
        --data "test book, own text=runs/demo/selfgen_records" "manual, own text=runs/genres/.../selfgen_records" ...
        [--out bench/results/eagle]

For each records folder (its test split) and each drafter: first-token agreement, agreement by depth
(since_big), coverage at 99% precision of its gate, of the copy rule and of the oracle (overall and on non-copy
positions), and the calibrated threshold's coverage and precision. Writes OUT.json and OUT.md.
Each measure, and which pairs: docs/bench.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from common.errors import ProjectError, one_line
from common.files import write_json, write_text
from gate.model.copyrule import COPY_SPAN
from gate.model.features import torch_threads
from gate.model.heads import context_copy_stats
from gate.model.load import load_drafter
from gate.train.calibration import coverage_at_precision
from gate.train.config import FitConfig
from gate.train.data import apply_scoring, predict_pairs
from gate.train.evaluate import open_inputs
from gate.train.fit_eagle import drafts_on, score_pairs
from runtimes.hf import HFBackend
from runtimes.loading import load

LEVEL = 0.99


def heads_pairs(inp, t, s) -> dict:
    """The heads drafter on pairs (t, s): its pick (score, correct) and its head's top-1 token."""
    dr = inp.dr
    o = predict_pairs(dr.predictor, inp.te, t, s, gates={dr.primary: dr.gates[dr.primary]}, desc="heads",
                      copy=context_copy_stats(inp.te.tokens, inp.te.run_start))
    o = apply_scoring(o, inp.te, dr.scoring_by_gate, dr.predictor.tables)
    sel = o["sel"][dr.primary]
    return {"head_token": o["cands"][:, 0], "token": sel["token"], "score": sel["score"], "correct": sel["correct"],
            "any_right": o["correct"].any(1) | o["copy"]["correct"], "threshold": dr.threshold}


def eagle_pairs(dr, te, cfg) -> dict:
    o = drafts_on(dr.head, [te], None, cfg, dr.tables, "feature head")
    sel = score_pairs(dr.gate, o, dr.scoring)
    return {"t": o["t"], "s": o["s"], "head_token": o["head_token"], "token": sel["token"], "score": sel["score"],
            "correct": sel["correct"], "any_right": o["correct"].any(1), "copy_len": o["copy_len"],
            "copy_tok": o["copy_tok"], "threshold": dr.threshold}


def cover(score, ok) -> float:
    return coverage_at_precision(score, ok, (LEVEL,))[LEVEL] if len(score) else 0.0


def table(d: dict, am: np.ndarray, s: np.ndarray, copy: np.ndarray, copy_ok: np.ndarray, copy_len) -> dict:
    """One drafter's numbers on the common pairs."""
    out = {}
    for name, m in (("all", np.ones(len(s), bool)), ("non_copy", ~copy)):
        m1 = m & (s == 1)
        deployed = m & (d["score"] >= d["threshold"])
        out[name] = {
            "pairs": int(m.sum()),
            "first_token_agreement": float((d["head_token"][m1] == am[m1]).mean()) if m1.any() else None,
            "agreement_by_depth": {int(k): float((d["head_token"][m & (s == k)] == am[m & (s == k)]).mean())
                                   for k in np.unique(s[m])},
            "gate_coverage_at_99": cover(d["score"][m], d["correct"][m]),
            "copy_coverage_at_99": cover(copy_len[m].astype(float), copy_ok[m]),
            "oracle": float(d["any_right"][m].mean()),
            "deployed_coverage": float(deployed.sum() / max(1, m.sum())),
            "deployed_precision": float(d["correct"][deployed].mean()) if deployed.any() else None,
        }
    return out


def one_dataset(label: str, records: str, args, eagle_dr, cfg) -> dict:
    inp = open_inputs(records, args.heads, "test")
    t0 = time.time()
    e = eagle_pairs(eagle_dr, inp.te, cfg)
    h = heads_pairs(inp, e["t"], e["s"])                # the same pairs, in the same order
    am = inp.te.argmax[e["t"]]
    copy = e["copy_len"] >= COPY_SPAN
    copy_ok = e["copy_tok"] == am
    res = {"records": records, "positions": int(len(inp.te)), "pairs": int(len(e["t"])),
           "copy_share": float(copy.mean()),
           "eagle": table(e, am, e["s"], copy, copy_ok, e["copy_len"]),
           "heads": table(h, am, e["s"], copy, copy_ok, e["copy_len"]), "seconds": round(time.time() - t0, 1)}
    print(f"[eagle] {label}: first-token agreement eagle {res['eagle']['all']['first_token_agreement']:.1%} vs heads "
          f"{res['heads']['all']['first_token_agreement']:.1%}; non-copy gate coverage @99% eagle "
          f"{res['eagle']['non_copy']['gate_coverage_at_99']:.1%} vs heads "
          f"{res['heads']['non_copy']['gate_coverage_at_99']:.1%}", file=sys.stderr, flush=True)
    return res


def step_costs(dr, reps: int = 60) -> dict:
    """Measured milliseconds (medians, 1 torch thread) of one draft step of the feature head (one chain entry
    and its logits), of a whole EagleDrafter.propose (step + gate + copy rule), and of one big-model decode
    step (transformers, float32, KV cache), on a 64-token context."""
    import torch

    big = HFBackend(load(dr.meta["big_model"]["name"], dtype="float32").model, "big")
    big.hidden_layer, big.hidden_all = dr.hidden_layer, True
    ids = list(range(1000, 1064))
    t = {"head_step": [], "propose": [], "big_step": []}
    with torch.inference_mode():
        _, hid = big.forward(ids[:-1])                    # the big model has computed positions 0 .. 62
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
    return {k: round(1000 * float(np.median(v)), 3) for k, v in t.items()}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(results: dict, cmd: str, meta: dict, ms: dict) -> str:
    lines = ["# The feature head (EAGLE-style) beside the heads drafter, the copy rule and the oracle", "",
             f"`{cmd}`", "",
             f"Feature head: {meta['cost']['head_params'] / 1e6:.2f}M trained parameters, "
             f"{meta['cost']['head_flops_per_token'] / 1e6:.1f} MFLOP per draft step "
             f"({meta['cost']['head_flops_per_token'] / meta['cost']['big_flops_per_token']:.1%} of the big "
             f"model's {meta['cost']['big_flops_per_token'] / 1e6:.0f}); measured (median, 1 thread, 64-token "
             f"context): {ms['head_step']:.2f} ms per draft step, {ms['propose']:.2f} ms per proposal with the gate "
             f"and the copy rule, against {ms['big_step']:.1f} ms per big-model decode step (transformers, "
             f"float32); draft vocabulary {meta['draft_vocab']['size']} "
             f"tokens, covering {pct(meta['draft_vocab']['big_argmax_covered']['val'])} of the big model's greedy "
             f"tokens on validation; trained on {meta['training_data']['head_positions']:,} positions.", "",
             "Pairs (t, s): since_big s = 1 .. the head's depth, the same pairs for both drafters (test split of "
             "each records folder). *First token*: the drafter's top candidate at s = 1 equals the big model's "
             "greedy token. *Coverage @99%*: the largest share of pairs a threshold on the drafter's gate score "
             "skips with >= 99% of them right (best threshold on these pairs). *Deployed*: the calibrated "
             "threshold's coverage / precision.", ""]
    hdr = ("| data | positions | copy share | first token: eagle / heads | non-copy first token: eagle / heads "
           "| coverage @99%: eagle / heads / copy / oracle | non-copy @99%: eagle / heads / oracle "
           "| deployed eagle: coverage / precision |")
    lines += [hdr, "|---" * (hdr.count("|") - 1) + "|"]
    for label, r in results.items():
        e, h = r["eagle"], r["heads"]
        lines.append(
            f"| {label} | {r['positions']:,} | {pct(r['copy_share'])} | {pct(e['all']['first_token_agreement'])} / "
            f"{pct(h['all']['first_token_agreement'])} | {pct(e['non_copy']['first_token_agreement'])} / "
            f"{pct(h['non_copy']['first_token_agreement'])} | {pct(e['all']['gate_coverage_at_99'])} / "
            f"{pct(h['all']['gate_coverage_at_99'])} / {pct(e['all']['copy_coverage_at_99'])} / "
            f"{pct(e['all']['oracle'])} | {pct(e['non_copy']['gate_coverage_at_99'])} / "
            f"{pct(h['non_copy']['gate_coverage_at_99'])} / {pct(e['non_copy']['oracle'])} | "
            f"{pct(e['all']['deployed_coverage'])} / {pct(e['all']['deployed_precision'])} |")
    lines += ["", "Agreement by depth (since_big), all positions: eagle / heads", "",
              "| data | " + " | ".join(f"s={k}" for k in next(iter(results.values()))["eagle"]["all"]
                                        ["agreement_by_depth"]) + " |",
              "|---|" + "---|" * len(next(iter(results.values()))["eagle"]["all"]["agreement_by_depth"])]
    for label, r in results.items():
        e, h = r["eagle"]["all"]["agreement_by_depth"], r["heads"]["all"]["agreement_by_depth"]
        lines.append(f"| {label} | " + " | ".join(f"{pct(e[k])} / {pct(h[k])}" for k in e) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--eagle", required=True, help="feature-head artifact (train.py fit --drafter eagle)")
    ap.add_argument("--heads", required=True, help="heads artifact (train.py fit)")
    ap.add_argument("--data", nargs="+", required=True, metavar="LABEL=RECORDS",
                    help="records folders to evaluate on (their test split), each labelled")
    ap.add_argument("--out", default="bench/results/eagle", help="output path without extension")
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
    eagle_dr = load_drafter(args.eagle, None)
    if not getattr(eagle_dr, "reads_all_hidden", False):
        print(f"error: --eagle {args.eagle}: not a feature-head drafter (train.py fit --drafter eagle)",
              file=sys.stderr)
        return 2
    cfg = FitConfig.from_options(**{k: v for k, v in eagle_dr.meta["config"].items()
                                    if k in FitConfig.__dataclass_fields__})
    with torch_threads(1):
        costs = step_costs(eagle_dr)
    print(f"[eagle] ms per step: {costs}", file=sys.stderr, flush=True)
    results = {label: one_dataset(label, records, args, eagle_dr, cfg) for label, records in data}
    cmd = "python bench/eagle.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_json(Path(args.out + ".json"), {"command": cmd, "results": results, "step_ms": costs, "eagle_meta": {
        k: eagle_dr.meta.get(k) for k in ("cost", "draft_vocab", "training_data", "calibration", "config")}})
    write_text(Path(args.out + ".md"), markdown(results, cmd, eagle_dr.meta, costs))
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
