#!/usr/bin/env python
"""Benchmark the decoder: big-model calls per token, speed against big-only, on-policy error, losslessness.

    python bench/decode.py [--model smollm2-135m] [--corpus runs/demo/corpus] [--gate runs/demo/gate]
                           [--small self:15] [--n-prompts 20] [--prompt-tokens 64] [--new-tokens 96] [--quick]

One process, one model load, prompts = openings of paragraphs of the held-out (test) books. Methods, run side
by side on every prompt (their order rotates from prompt to prompt, so the machine's drift hits all alike):
  big           our loop, big model only, greedy: the reference output and speed
  hf_greedy     transformers generate(), greedy: the same output from HF's loop
  hf_assisted   generate(assistant_model=--assistant) or, for a self:K small model, generate(assistant_early_exit=K)
  hf_pld        generate(prompt_lookup_num_tokens=10): prompt-lookup decoding
  ratio         seed 000 with the small model (lossy)
  entropy       seed 001 with the small model (lossy)
  spec_small    gate policy with the small LM as drafter (max-prob >= --small-threshold), --verify: lossless
  gate          the trained gate (--gate) at its calibrated threshold (or --threshold), lossy
  gate_sweep    gate@T: the same at the thresholds of --sweep (a cost / error curve), lossy
  gate_verify   gate_verify@T: the trained gate at the thresholds of --verify-sweep, --verify: lossless
  gate_dial     skip at score >= a, verify only skips scored below b (--dial a:b): between the two
Every output gets one teacher-forced big-model pass (not timed): on-policy error = share of tokens that differ
from the big model's argmax on the same prefix. Lossless methods are compared with `big` token by token; where
one differs, the first difference is classified as a numerical near-tie when the big model's two candidate
logits are within --tie-eps of each other on that prefix (bf16 logits near 25 are 0.125 apart).
Writes bench/results/decode.json and decode.md (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LOSSLESS = {"big", "hf_greedy", "hf_assisted", "hf_pld", "spec_small", "gate_verify"}
ALL = ["big", "hf_greedy", "hf_assisted", "hf_pld", "ratio", "entropy", "spec_small", "gate", "gate_sweep",
       "gate_verify", "gate_dial"]


def lossless(name: str) -> bool:
    return name.split("@")[0] in LOSSLESS


def parse(argv):
    ap = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", help="one or more, comma-separated (e.g. bfloat16,float32)")
    ap.add_argument("--corpus", default="runs/demo/corpus")
    ap.add_argument("--split", default="test")
    ap.add_argument("--gate", default="runs/demo/gate", help="trained drafter folder (skipped if missing)")
    ap.add_argument("--small", default="self:15", help="small model for ratio/entropy/spec_small (self:K or name)")
    ap.add_argument("--assistant", help="HF assistant model (default: --small; self:K -> assistant_early_exit)")
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="4 prompts x 32 new tokens (a few minutes)")
    ap.add_argument("--methods", default=",".join(ALL))
    ap.add_argument("--other-methods", default="big,hf_greedy,hf_pld,spec_small,gate,gate_verify,gate_dial",
                    help="methods for the second and later --dtype (a shorter list keeps the run short)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--min-tokens", type=int, default=10)
    ap.add_argument("--tau", type=float, default=0.08,
                    help="entropy threshold (the self:15 early exit is overconfident: 0.08 is its median)")
    ap.add_argument("--small-threshold", type=float, default=0.6)
    ap.add_argument("--threshold", type=float, help="gate threshold (default: the drafter's calibrated one)")
    ap.add_argument("--sweep", default="0.9,0.7,0.5", help="gate_sweep thresholds")
    ap.add_argument("--verify-sweep", default="0.5,0.3", help="gate_verify thresholds")
    ap.add_argument("--dial", default="0.5:0.9", help="gate_dial: skip threshold : verify-below value")
    ap.add_argument("--pld-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--tie-eps", type=float, default=None, help="near-tie logit gap (default 0.25 bf16, 1e-3 fp32)")
    ap.add_argument("--out", default="bench/results/decode", help="output path without extension")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_prompts, args.new_tokens, args.prompt_tokens = 4, 32, 48
    return args


class BigCallCounter:
    """Counts full big-model passes inside HF generate: a pre-hook on the last decoder block (an early-exit
    assistant never reaches it)."""

    def __init__(self, model):
        base = getattr(model, model.base_model_prefix)
        self.calls = self.tokens = 0
        self.handle = base.layers[-1].register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self.calls += 1
        self.tokens += h.shape[1]

    def reset(self):
        self.calls = self.tokens = 0


def hf_runner(model, eos, counter, **kw):
    pad = eos[0] if eos else None

    @torch.inference_mode()
    def run(ids, n):
        x = torch.tensor([ids])
        counter.reset()
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=list(eos), pad_token_id=pad, **kw)
        wall = time.perf_counter() - t0
        return dict(ids=out[0, len(ids):].tolist(), wall=wall, big_calls=counter.calls,
                    big_tokens_fed=counter.tokens)
    return run


def loop_runner(setup, make_policy, **kw):
    from gate.decode.loop import Decoder

    def run(ids, n):
        dec = Decoder(setup.big, make_policy(), eos_ids=setup.eos_ids, **kw)
        res = dec.generate(ids, n)
        led = res.ledger
        return dict(ids=res.ids, wall=led["wall_s"], big_calls=led["big_calls"],
                    big_tokens_fed=led["big_tokens_fed"], skipped=led["skipped"], rollbacks=led["rollbacks"],
                    predictor_calls=led["predictor_calls"], sources=res.sources)
    return run


@torch.inference_mode()
def tie_gap(big, prefix, a, b) -> float:
    """|logit(a) - logit(b)| of the big model after prefix (fresh cache)."""
    big.reset()
    logits, _ = big.forward(prefix, keep=1)
    big.reset()
    return abs(float(logits[-1, a] - logits[-1, b]))


def build(args, setup, notes):
    from gate.decode.cli import load_gate
    from gate.decode.drafters import SmallLMDrafter
    from gate.decode.policies import BigOnly, Entropy, Gate, Ratio

    small = setup.predictors.get(args.small)
    model = setup.big.model
    counter = BigCallCounter(model)
    runners, wanted = {}, args.methods.split(",")
    unknown = set(wanted) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(sorted(unknown))}; choose from {', '.join(ALL)}")
    runners["big"] = loop_runner(setup, BigOnly)
    runners["hf_greedy"] = hf_runner(model, setup.eos_ids, counter)
    assistant = args.assistant or args.small
    if assistant.startswith("self:"):
        runners["hf_assisted"] = hf_runner(model, setup.eos_ids, counter, assistant_early_exit=int(assistant[5:]))
        if "hf_assisted" in wanted:
            notes.append(f"hf_assisted: no smaller model shares {args.model}'s tokenizer here, so the assistant is "
                         f"HF's early exit after {assistant[5:]} layers (generate(assistant_early_exit=...), HF "
                         "defaults: up to 20 draft tokens, assistant confidence threshold 0.4); the model was not "
                         "trained for early exit, so its drafts are mostly rejected.")
    else:
        runners["hf_assisted"] = hf_runner(model, setup.eos_ids, counter,
                                           assistant_model=setup.predictors[assistant].model)
    if args.small.startswith("self:") and {"ratio", "entropy", "spec_small"} & set(wanted):
        notes.append(f"ratio, entropy, spec_small: the small model is {args.small}, the big model's first "
                     f"{args.small[5:]} layers + final norm + output layer (an untrained early exit; on Austen "
                     "text its argmax matched the big model's on ~16% of positions at 15 layers, and it is "
                     f"overconfident, hence entropy tau {args.tau:g}); ratio r={args.ratio:g} after "
                     f"{args.min_tokens} scaffold tokens; spec_small drafts where its max-probability >= "
                     f"{args.small_threshold:g}.")
    runners["hf_pld"] = hf_runner(model, setup.eos_ids, counter, prompt_lookup_num_tokens=args.pld_tokens)
    runners["ratio"] = loop_runner(setup, lambda: Ratio(small, args.ratio, args.min_tokens))
    runners["entropy"] = loop_runner(setup, lambda: Entropy(small, args.tau))
    runners["spec_small"] = loop_runner(
        setup, lambda: Gate(SmallLMDrafter(small, args.small_threshold), name="spec_small"), verify=True)
    if Path(args.gate).exists():
        drafter = load_gate(args.gate, setup.big_info)
        th = drafter.threshold if args.threshold is None else args.threshold
        runners["gate"] = loop_runner(setup, lambda: Gate(drafter, th))
        for t in [float(x) for x in args.sweep.split(",") if x]:
            runners[f"gate@{t:g}"] = loop_runner(setup, lambda t=t: Gate(drafter, t))
        for t in [float(x) for x in args.verify_sweep.split(",") if x]:
            runners[f"gate_verify@{t:g}"] = loop_runner(setup, lambda t=t: Gate(drafter, t), verify=True)
        a, b = (float(x) for x in args.dial.split(":"))
        runners["gate_dial"] = loop_runner(setup, lambda: Gate(drafter, a), verify=True, verify_below=b)
        cal = drafter.meta.get("calibration", {}).get(drafter.meta.get("primary_gate"), {})
        notes.append(
            f"gate: {args.gate}, calibrated threshold {drafter.threshold:.4g}"
            + (f" (certified: precision >= {cal.get('target_precision')} w.p. >= {1 - cal['delta']:.2f}, "
               f"validation coverage {cal.get('coverage', 0):.1%})" if cal.get("certified") else
               " (no threshold certified at the target precision: 2 = never skip)" if cal else "")
            + f", max_skip {drafter.max_skip}, hidden layer {drafter.hidden_layer}"
            + (f"; `gate` ran at --threshold {th:g}" if args.threshold is not None else "")
            + f". gate_dial skips at score >= {a:g} and verifies only skips scored below {b:g}.")
    else:
        notes.append(f"gate*: skipped, no trained drafter at {args.gate} (python train.py fit).")
    expand = {"gate_sweep": [k for k in runners if k.startswith("gate@")],
              "gate_verify": [k for k in runners if k.startswith("gate_verify@")]}
    wanted = [x for w in wanted for x in expand.get(w, [w])]
    return {k: runners[k] for k in wanted if k in runners}


def summarize(name, rows, ref_tps):
    toks = sum(len(r["ids"]) for r in rows)
    wall = sum(r["wall"] for r in rows)
    s = dict(method=name, prompts=len(rows), new_tokens=toks, wall_s=round(wall, 3),
             tokens_per_s=round(toks / wall, 3) if wall else 0.0,
             big_calls_per_token=round(sum(r["big_calls"] for r in rows) / toks, 4),
             # catch-up included, prompt (prefill) excluded: 1.0 for big-only
             big_tokens_fed_per_token=round(sum(r["big_tokens_fed"] - r["prompt_tokens"] for r in rows) / toks, 4),
             on_policy_error=round(sum(r["check"]["mismatches"] for r in rows) / toks, 5),
             on_policy_error_beyond_ties=round(sum(r["check"]["beyond_ties"] for r in rows) / toks, 5),
             nll=round(sum(r["check"]["nll"] * len(r["ids"]) for r in rows) / toks, 4))
    s["speed_vs_big"] = round(s["tokens_per_s"] / ref_tps, 3) if ref_tps else None
    if "skipped" in rows[0]:
        s["skipped_share"] = round(sum(r["skipped"] for r in rows) / toks, 4)
        s["rollbacks"] = sum(r["rollbacks"] for r in rows)
    if lossless(name):
        s["identical_to_big"] = sum(r["identical"] for r in rows)
        s["near_tie_divergences"] = sum(1 for r in rows if not r["identical"] and r["near_tie"])
    return s


def markdown(results, argv) -> str:
    best = max((s["tokens_per_s"], r["config"]["dtype"]) for r in results for s in r["summary"]
               if s["method"] == "big") if any(s["method"] == "big" for r in results for s in r["summary"]) \
        else (None, None)
    first = results[0]
    m = first["machine"]
    lines = [f"# Decoding benchmark ({first['config']['model']})", "",
             "Command: `python bench/decode.py " + " ".join(argv) + "`", "",
             f"{len(first['prompts'])} prompts of {first['config']['prompt_tokens']} tokens from the held-out "
             f"books of `{first['config']['corpus']}` ({first['config']['split']} split), up to "
             f"{first['config']['new_tokens']} new tokens each, greedy. Machine: {m['cpus']} CPUs, torch "
             f"{m['torch']}, {m['torch_threads']} torch thread(s); shared with other jobs (load average "
             f"{m['load_before']} at the start), so timings are noisy: methods alternate on every prompt and "
             "speeds are compared within one run.", "",
             "Columns: big calls / token = big-model forward passes per generated token (prefill included); "
             "fed / token = tokens fed to the big model per generated token (catch-up and rolled-back tokens "
             "included, prompt excluded); vs big = tokens/s relative to `big` in the same dtype"
             + (f", vs best = relative to the fastest big-only run ({best[1]})" if len(results) > 1 else "")
             + "; on-policy error = share of tokens that differ from the big model's argmax on the same "
             "prefix (teacher-forced), in brackets the share beyond numerical near-ties (logit gap > "
             f"{first['config']['tie_eps']}); identical = outputs token-identical to `big`, + those whose first "
             "difference is a near-tie.", ""]
    for res in results:
        cfg = res["config"]
        lines += [f"## {cfg['dtype']}", "",
                  "| method | lossless | big calls / token | fed / token | tokens/s | vs big | "
                  + ("vs best | " if len(results) > 1 else "") + "on-policy error | NLL | identical |",
                  "|---|---|---|---|---|---|" + ("---|" if len(results) > 1 else "") + "---|---|---|"]
        for s in res["summary"]:
            ident = "-"
            if "identical_to_big" in s:
                ident = f"{s['identical_to_big']}/{s['prompts']}"
                if s["near_tie_divergences"]:
                    ident += f" (+{s['near_tie_divergences']} near-tie)"
            vs_best = f"{s['tokens_per_s'] / best[0]:.2f}x | " if len(results) > 1 else ""
            lines.append(
                f"| {s['method']} | {'yes' if lossless(s['method']) else 'no'} | {s['big_calls_per_token']:.3f} | "
                f"{s['big_tokens_fed_per_token']:.2f} | {s['tokens_per_s']:.1f} | {s['speed_vs_big']:.2f}x | "
                f"{vs_best}{100 * s['on_policy_error']:.1f}% ({100 * s['on_policy_error_beyond_ties']:.1f}%) | "
                f"{s['nll']:.3f} | {ident} |")
        lines += [""]
    lines += ["Notes:"] + [f"- {n}" for n in first["notes"]]
    return "\n".join(lines) + "\n"


def run_dtype(args, dtype):
    from gate.decode.cli import held_out_prompts, open_models
    from gate.decode.loop import check_output

    load_before = os.getloadavg()
    setup = open_models(args.model, [args.small] + ([args.assistant] if args.assistant else []), dtype)
    prompts = held_out_prompts(args.corpus, setup.tokenizer, args.n_prompts, args.prompt_tokens, args.split)
    tie_eps = args.tie_eps if args.tie_eps is not None else (1e-3 if dtype in ("float32", "fp32") else 0.25)
    notes = []
    runners = build(args, setup, notes)
    names = list(runners)
    print(f"[bench] {dtype}: {len(prompts)} prompts x {args.new_tokens} tokens; methods: {', '.join(names)}",
          file=sys.stderr, flush=True)
    for name in names:   # warm-up: first calls allocate and pick kernels
        runners[name](prompts[0][:16], 4)
    rows = {n: [] for n in names}
    for i, ids in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        out = {}
        for name in order:
            out[name] = runners[name](ids, args.new_tokens)
        for name in names:
            r = out[name]
            r["prompt_tokens"] = len(ids)
            r["check"] = check_output(setup.big, ids, r["ids"], tie_eps)
            if lossless(name):
                ref = out["big"]["ids"] if "big" in out else r["ids"]
                r["identical"] = r["ids"] == ref
                r["near_tie"] = False
                if not r["identical"]:
                    d = next((j for j, (a, b) in enumerate(zip(r["ids"], ref)) if a != b), None)
                    r["first_difference"] = d
                    if d is not None:
                        r["tie_gap"] = tie_gap(setup.big, ids + ref[:d], ref[d], r["ids"][d])
                        r["near_tie"] = r["tie_gap"] <= tie_eps
            rows[name].append(r)
        print(f"[bench] {dtype} prompt {i + 1}/{len(prompts)}: " + "  ".join(
            f"{n} {len(out[n]['ids']) / out[n]['wall']:.1f}t/s" for n in names), file=sys.stderr, flush=True)
    ref_tps = None
    if "big" in rows:
        ref_tps = sum(len(r["ids"]) for r in rows["big"]) / sum(r["wall"] for r in rows["big"])
    code = {"big": "B", "scaffold": "S", "small": "s", "skip": "k"}
    return dict(
        config={**vars(args), "dtype": dtype, "tie_eps": tie_eps},
        machine=dict(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                     python=platform.python_version(), load_before=", ".join(f"{x:.1f}" for x in load_before),
                     load_after=", ".join(f"{x:.1f}" for x in os.getloadavg())),
        notes=notes, summary=[summarize(n, rows[n], ref_tps) for n in names],
        prompts=[dict(prompt_ids=p, prompt=setup.tokenizer.decode(p)) for p in prompts],
        runs={n: [{k: v for k, v in r.items() if k != "sources"}
                  | dict(sources="".join(code.get(x, "m") for x in r.get("sources", []))) for r in rows[n]]
              for n in names})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for i, dt in enumerate(args.dtype.split(",")):
        if i == 1:
            args.methods = args.other_methods
        results.append(run_dtype(args, dt))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(results=results), indent=1))
    md = markdown(results, argv)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
