#!/usr/bin/env python
"""What does `--audit` cost? Wall time of a lossy gate decode with the audit off, counting only, and on.

    python bench/audit_cost.py --gate runs/demo/gate [--corpus runs/demo/corpus] [--n-prompts 8] [-m 128]
        [--repeats 3] [--model smollm2-135m] [--backend auto] [--threads N] [--out bench/results/audit_cost]

off: no audit (the decode before issue #19 part 3). count: the catch-up passes keep the skipped rows and count
mismatches but never move the threshold, so the text is off's (up to float rounding) and the difference is the
audit's own cost (output-layer rows, argmax). on: infer.py's default (the threshold may rise: fewer skips, a
different text). The variants take turns on each prompt, in a rotating order; medians over --repeats.
Run it on an idle machine (docs/speed.md); the numbers belong in docs/decode.md#the-audit-gatedecodeauditpy.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from bench.quiet import Quiet
from common.files import write_result
from gate.decode.audit import Audit
from gate.decode.cli import build_parser, settle_args
from gate.decode.loop import Decoder
from gate.decode.registry import registered
from gate.decode.session import (
    add_runtime_args,
    audit_for,
    configure_torch,
    held_out_prompts,
    make_policy,
    open_runtime,
)

VARIANTS = ("off", "count", "on")


class CountOnly(Audit):
    """An audit that counts but never moves the bar: the cost of auditing without its effect on the text."""

    def start(self, bar):
        super().start(None)


def decode(rt, policy, ids, args, variant: str) -> dict:
    audit = audit_for(policy, args, verify=False)
    if variant == "off":
        audit = None
    elif variant == "count":
        audit = CountOnly(audit.target)
    res = Decoder(rt.big, policy, temperature=0.0, seed=args.seed, eos_ids=rt.eos_ids, audit=audit).generate(
        ids, args.max_new_tokens)
    led = res.ledger
    return dict(wall_s=led["wall_s"], new_tokens=led["new_tokens"], skipped=led["skipped"], ids=res.ids,
                audit=led.get("audit"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/audit_cost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gate", required=True, help="a trained gate artifact (train.py fit)")
    ap.add_argument("--corpus", default="runs/demo/corpus", help="held-out prompts from this corpus")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("-m", "--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/audit_cost", help="output path without extension")
    ap.add_argument("--force", action="store_true", help="run even on a busy machine (marked in the result)")
    add_runtime_args(ap)
    own = ap.parse_args(argv)
    quiet = Quiet.check(own.force, "bench/audit_cost.py")
    infer = ["-", "--policy", "gate", "--gate", own.gate, "--model", own.model, "--dtype", own.dtype,
             "--backend", own.backend, "-m", str(own.max_new_tokens)] + (["--threads", str(own.threads)]
                                                                          if own.threads else [])
    args = build_parser().parse_args(infer)
    settle_args(args)
    configure_torch(args)
    policies = registered()
    rt = open_runtime(args, policies)
    policy = make_policy(args, rt, policies)
    prompts = held_out_prompts(own.corpus, rt.tokenizer, own.n_prompts, own.prompt_tokens)
    walls = {v: [] for v in VARIANTS}
    rows = []
    decode(rt, policy, prompts[0], args, "off")   # warm-up: first-call allocations out of the numbers
    for r in range(own.repeats):
        for i, ids in enumerate(prompts):
            order = VARIANTS[(r + i) % 3:] + VARIANTS[:(r + i) % 3]
            out = {v: decode(rt, policy, ids, args, v) for v in order}
            for v in VARIANTS:
                walls[v].append(out[v]["wall_s"] / max(out[v]["new_tokens"], 1))
            rows.append(dict(repeat=r, prompt=i, same_text_count=out["count"]["ids"] == out["off"]["ids"],
                             **{v: {k: x for k, x in out[v].items() if k != "ids"} for v in VARIANTS}))
    med = {v: statistics.median(w) * 1000 for v, w in walls.items()}
    summary = dict(ms_per_token=med, count_over_off=med["count"] / med["off"], on_over_off=med["on"] / med["off"],
                   same_text_count=sum(r["same_text_count"] for r in rows), runs=len(rows), load=quiet.to_dict(),
                   backend=type(rt.big).__name__,
                   command="python bench/audit_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    md = "\n".join(["# The audit's cost", "", f"Command: `{summary['command']}`", "",
                    f"{quiet.note()}; backend {summary['backend']}.", "",
                    "| variant | ms / token (median) | vs off |", "|---|---|---|"]
                   + [f"| {v} | {med[v]:.2f} | {med[v] / med['off']:.3f} |" for v in VARIANTS]
                   + ["", f"count gave off's text in {summary['same_text_count']} of {len(rows)} runs."]) + "\n"
    write_result(own.out, dict(summary=summary, runs=rows), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
