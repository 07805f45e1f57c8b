#!/usr/bin/env python
"""The big/small pair benchmark: the router against the untrained rules, teacher-forced and in decoding.

    python bench/pair.py coverage --router runs/pair/router --records NAME=DIR[:SPLIT] ...
    python bench/pair.py decode   --router runs/pair/router --model qwen2.5-coder-1.5b --small qwen2.5-coder-0.5b \
                                  --backend llama.cpp --corpus runs/demo/corpus ... [--hf]

coverage: per records folder of the pair, the share of positions each rule (the router, the small model's
max-probability and entropy, the copy rule, the oracle) serves at the target precision, overall and on non-copy
positions, plus the router at its calibrated threshold. Writes OUT.json / OUT.md.
decode: the baseline policies, the router (lossy and --verify), the copy rule and speculative decoding with the
small model, on the same held-out prompts, one backend per run; every output gets a teacher-forced big-model
check. Writes OUT.json / OUT.md and OUT_curve.png. Each method and measure: docs/bench.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.decode import (  # noqa: E402
    BigCallCounter,
    hf_method,
    loop_method,
    machine_info,
    markdown_row,
    run_prompts,
    run_record,
    summarize,
)
from common.errors import ProjectError, fail  # noqa: E402
from common.files import write_json, write_text  # noqa: E402
from corpus_tools.records import open_records  # noqa: E402
from gate.decode.drafters import load_gate  # noqa: E402
from gate.decode.policies import BigOnly, Cascade, Copy, Entropy, Gate, Ratio  # noqa: E402
from gate.decode.session import held_out_prompts  # noqa: E402
from gate.model.load import read_meta  # noqa: E402
from gate.model.router import check_identity, load_router_parts, router_maps  # noqa: E402
from gate.train.fit_router import load_pair, pair_entries, routed, since_big, split_metrics  # noqa: E402
from runtimes.open import open_models  # noqa: E402

RULES = ("router", "max_prob", "entropy", "copy_rule", "big_informed", "oracle")


# -- coverage --------------------------------------------------------------------------------------------------
def coverage_of(router: str, name: str, spec: str, target: float) -> dict:
    """split_metrics of the router and the rules on one records folder (spec: DIR or DIR:SPLIT)."""
    path, _, split = spec.partition(":")
    rec = open_records(path)
    meta = read_meta(router)
    big, small = pair_entries(rec, path, meta["big_model"]["name"])
    check_identity(meta["big_model"], big, "big", path)
    feats, gate = load_router_parts(router, meta, small)
    split = split or ("test" if "test" in rec.splits else rec.splits[0])
    d = load_pair(rec, path, split, big, small)
    rows, s = since_big(d, meta["max_skip"], 7, meta["features"]["big_hidden"])
    score, correct = routed(feats, gate, d, rows, s, maps=router_maps(meta, router))   # the threshold's scale
    out = split_metrics(d, score, correct, rows, meta["threshold"], target)
    return {"name": name, "records": path, "split": split, **out}


def coverage_md(res: dict, argv) -> str:
    t = res["target"]
    lines = [f"# Router coverage at {t:.0%} precision ({res['big']} / {res['small']})", "",
             "Command: `python bench/pair.py " + " ".join(argv) + "`", "",
             f"Share of positions each rule serves with precision >= {t:.0%} against the big model's argmax "
             "(teacher-forced records; the router's validation-calibrated threshold is "
             f"{res['threshold']:.4f}). router: train.py fit --drafter router; max_prob / entropy: the small "
             "model's own confidence, untrained; copy_rule: prompt lookup (score = match length); oracle: the "
             "share where the small model's argmax is the big model's (no rule on the small model's token can "
             "serve more at full precision); big_informed: not a router, the big model's own probability of the small "
             "model's token, which needs the big model's pass at that position (what the small model's features "
             "cannot know). x best rule = router / max(max_prob, entropy); x oracle = router / "
             "oracle. At threshold: the router at its calibrated threshold (coverage, precision).", "",
             "| records | positions | subset | router | max_prob | entropy | copy_rule | big_informed | oracle | "
             "x best rule | x oracle | at threshold |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["sets"]:
        for subset in ("all", "non_copy"):
            m = r[subset]
            best = max(m["max_prob"], m["entropy"])
            at = m["router_at_threshold"]
            prec = f"{at['precision']:.1%}" if at["precision"] is not None else "-"
            x_best = f"{m['router'] / best:.1f}x" if best > 0 else "-"
            x_oracle = f"{m['router'] / m['oracle']:.0%}" if m["oracle"] > 0 else "-"
            lines.append(f"| {r['name']} | {m['positions']:,} | {subset} | "
                         + " | ".join(f"{m[k]:.1%}" for k in RULES)
                         + f" | {x_best} | {x_oracle} | {at['coverage']:.1%} ({prec}) |")
    return "\n".join(lines) + "\n"


def cmd_coverage(args, argv) -> int:
    meta = read_meta(args.router)
    sets = []
    for item in args.records:
        name, _, spec = item.partition("=")
        sets.append(coverage_of(args.router, name, spec, args.target))
        print(f"[pair] coverage {name}: router {sets[-1]['all']['router']:.1%}, oracle {sets[-1]['all']['oracle']:.1%}",
              file=sys.stderr)
    res = {"target": args.target, "threshold": meta["threshold"], "big": meta["big_model"]["name"],
           "small": meta["small_model"]["name"], "router": args.router, "sets": sets}
    write_json(Path(args.out + ".json"), res)
    write_text(Path(args.out + ".md"), coverage_md(res, argv))
    print(coverage_md(res, argv))
    return 0


# -- decode ----------------------------------------------------------------------------------------------------
def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def lossy_methods(rt, args, drafter) -> dict:
    """name -> (Method, family): the curve's points (lossy) on the --small model and the router."""
    small, tok = rt.predictor(args.small), rt.tokenizer
    out = {f"ratio@{r:g}": (Ratio(small, r, args.min_tokens), "ratio") for r in floats(args.ratios)}
    out.update({f"entropy@{t:g}": (Entropy(small, t), "entropy") for t in floats(args.taus)})
    t0 = floats(args.taus)[len(floats(args.taus)) // 2]
    out.update({f"entropy_span4@{t0:g}": (Entropy(small, t0, span=4), "entropy variants"),
                f"entropy_lookahead3@{t0:g}": (Entropy(small, t0, lookahead=3), "entropy variants"),
                f"entropy_adaptive@{t0:g}": (Entropy(small, t0, adaptive=True), "entropy variants"),
                f"entropy_pattern@{t0:g}": (Entropy(small, t0, pattern=r"[\n(\[{]", tokenizer=tok),
                                            "entropy variants")})
    out.update({f"small_maxprob@{t:g}": (Gate.small_lm(small, t, name="small_maxprob"), "small max-prob")
                for t in floats(args.maxprob)})
    out.update({f"router@{t:g}": (Gate(drafter, t, name="router"), "router") for t in floats(args.router_sweep)})
    out["router@calibrated"] = (Gate(drafter, name="router"), "router")
    out["copy"] = (Copy(), "copy rule")
    return {k: (loop_method(rt, p), fam) for k, (p, fam) in out.items()}


def lossless_methods(rt, args, drafter) -> dict:
    small = rt.predictor(args.small)
    out = {"big": loop_method(rt, BigOnly(), lossless=True),
           "copy_verify": loop_method(rt, Copy(), verify=True),
           "spec_small": loop_method(rt, Gate.small_lm(small, 0.6, name="spec_small"), verify=True)}
    for t in floats(args.verify_sweep):
        out[f"router_verify@{t:g}"] = loop_method(rt, Gate(drafter, t, name="router_verify"), verify=True)
    return out


def hf_methods(rt, args) -> dict:
    """transformers only: HF greedy, HF assisted generation with the small model, the three-level cascade."""
    model = rt.hf_model()
    counter = BigCallCounter(model)
    out = {"hf_greedy": (hf_method("hf_greedy", model, rt.eos_ids, counter), None),
           "hf_assisted": (hf_method("hf_assisted", model, rt.eos_ids, counter,
                                     assistant_model=rt.hf_model(args.small)), None)}
    levels = [rt.predictor(args.early_exit), rt.predictor(args.small)]
    for t in floats(args.taus):
        out[f"cascade@{t:g}"] = (loop_method(rt, Cascade(levels, [t, t])), "cascade")
    return out


def curve_png(summary: list[dict], families: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for fam in dict.fromkeys(f for f in families.values() if f):
        pts = sorted((s["big_calls_per_token"], 100 * s["on_policy_error"]) for s in summary
                     if families.get(s["method"]) == fam)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=fam)
    ax.set_xlabel("big-model calls per generated token")
    ax.set_ylabel("on-policy error (% tokens != big model's argmax)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decode_md(res: dict, argv) -> str:
    cfg = res["config"]
    lines = [f"# Pair decoding: {cfg['model']} with {cfg['small']} ({cfg['backend']} backend)", "",
             "Command: `python bench/pair.py " + " ".join(argv) + "`", "",
             f"{len(res['prompts'])} prompts of {cfg['prompt_tokens']} tokens from the held-out books of "
             f"{', '.join(cfg['corpus'])}, {cfg['new_tokens']} new tokens each, greedy; methods alternate on "
             f"every prompt. Machine: {res['machine']['cpus']} CPUs (load {res['machine']['load_before']} at the "
             "start). Columns as in bench/results/decode.md: big calls / token, fed / token, tokens/s, vs big, "
             "on-policy error (beyond near-ties), NLL under the big model, identical to `big`, copy share, "
             "skips on copy / non-copy positions.", "",
             "| method | lossless | big calls / token | fed / token | tokens/s | vs big | on-policy error | NLL | "
             "identical | copy | skips c / n-c |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [markdown_row(s, None) for s in res["summary"]]
    lines += ["", f"![error vs big calls]({Path(cfg['out']).name}_curve.png)", "", "Notes:"]
    lines += [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def cmd_decode(args, argv) -> int:
    load_before = os.getloadavg()
    smalls = [args.small] + ([args.early_exit] if args.hf else [])
    rt = open_models(args.model, smalls, "float32", args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    drafter = load_gate(rt, args.router)
    share = [args.n_prompts // len(args.corpus) + (i < args.n_prompts % len(args.corpus))
             for i in range(len(args.corpus))]
    prompts = [p for c, n in zip(args.corpus, share) if n
               for p in held_out_prompts(c, rt.tokenizer, n, args.prompt_tokens)]
    for p in prompts:
        rt.check_fits(len(p), args.new_tokens, "--prompt-tokens prompt", "--new-tokens")
    methods, families = lossless_methods(rt, args, drafter), {}
    for name, (m, fam) in {**lossy_methods(rt, args, drafter), **(hf_methods(rt, args) if args.hf else {})}.items():
        methods[name], families[name] = m, fam
    if args.only:
        keep = tuple(args.only.split(","))
        methods = {k: m for k, m in methods.items() if k == "big" or k.split("@")[0] in keep}
    print(f"[pair] {len(prompts)} prompts x {args.new_tokens} tokens; methods: {', '.join(methods)}",
          file=sys.stderr)
    t0 = time.time()
    rows = run_prompts(rt, methods, prompts, args.new_tokens, 1e-3, "float32")
    ref = sum(len(r["ids"]) for r in rows["big"]) / sum(r["ledger"].wall_s for r in rows["big"])
    notes = [f"router: {args.router}, calibrated threshold {drafter.threshold:.4f}; small model {args.small}.",
             f"ratio: --min-tokens {args.min_tokens} scaffold tokens first; entropy variants at tau {floats(args.taus)[len(floats(args.taus)) // 2]:g}: "
             "span 4, lookahead 3, adaptive, pattern (the big model after a newline or an opening bracket).",
             "spec_small: the small model drafts where its max-probability >= 0.6, verified (lossless).",
             f"run took {time.time() - t0:.0f} s."]
    if args.hf:
        notes.append(f"cascade: {args.early_exit} (the big model's early exit) -> {args.small} -> {args.model}, "
                     "the same tau at both levels; hf_assisted: transformers generate(assistant_model=small).")
    res = {"config": {**vars(args), "out": args.out}, "machine": machine_info(load_before), "notes": notes,
           "families": families, "summary": [summarize(n, m, rows[n], ref) for n, m in methods.items()],
           "prompts": [dict(prompt_ids=p, prompt=rt.tokenizer.decode(p)) for p in prompts],
           "runs": {n: [run_record(r) for r in rows[n]] for n in methods}}
    write_json(Path(args.out + ".json"), res)
    curve_png(res["summary"], families, Path(args.out + "_curve.png"),
              f"{args.model} + {args.small} ({args.backend}): error vs big calls")
    write_text(Path(args.out + ".md"), decode_md(res, argv))
    print(decode_md(res, argv))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="bench/pair.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("coverage", help="teacher-forced coverage table from pair records")
    c.add_argument("--router", required=True)
    c.add_argument("--records", nargs="+", required=True, help="NAME=DIR or NAME=DIR:SPLIT (default split: test)")
    c.add_argument("--target", type=float, default=0.99)
    c.add_argument("--out", default="bench/results/pair_coverage")
    d = sub.add_parser("decode", help="the policies and the router in decoding")
    d.add_argument("--router", required=True)
    d.add_argument("--model", default="qwen2.5-coder-1.5b")
    d.add_argument("--small", default="qwen2.5-coder-0.5b")
    d.add_argument("--backend", default="llama.cpp", choices=("hf", "llama.cpp"))
    d.add_argument("--threads", type=int)
    d.add_argument("--corpus", nargs="+", default=["runs/demo/corpus"])
    d.add_argument("--n-prompts", type=int, default=6)
    d.add_argument("--prompt-tokens", type=int, default=48)
    d.add_argument("--new-tokens", type=int, default=48)
    d.add_argument("--min-tokens", type=int, default=10)
    d.add_argument("--ratios", default="0.25,0.5,0.75")
    d.add_argument("--taus", default="0.05,0.1,0.2,0.3")
    d.add_argument("--maxprob", default="0.9,0.7,0.5")
    d.add_argument("--router-sweep", default="0.9,0.7,0.5")
    d.add_argument("--verify-sweep", default="0.5,0.2")
    d.add_argument("--hf", action="store_true", help="add the transformers-only methods (needs --backend hf)")
    d.add_argument("--only", help="keep only these methods (comma-separated names before '@', e.g. "
                   "router_verify,hf_assisted; `big` is always kept)")
    d.add_argument("--early-exit", default="self:14", help="the cascade's first level with --hf")
    d.add_argument("--out", default="bench/results/pair_decode")
    args = ap.parse_args(argv)
    if getattr(args, "hf", False) and args.backend != "hf":
        ap.error("--hf needs --backend hf")
    try:
        return cmd_coverage(args, argv) if args.cmd == "coverage" else cmd_decode(args, argv)
    except (ProjectError, ValueError) as e:   # a user's mistake (a missing folder, another pair's records) is one line
        return fail("bench/pair.py", e)


if __name__ == "__main__":
    sys.exit(main())
