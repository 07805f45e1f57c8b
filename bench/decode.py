#!/usr/bin/env python
"""Benchmark the decoder: big-model calls per token, speed against big-only, on-policy error, losslessness.

    python bench/decode.py [--model smollm2-135m] [--corpus runs/demo/corpus] [--gate runs/demo/gate]
                           [--small self:15] [--n-prompts 20] [--prompt-tokens 64] [--new-tokens 96] [--quick]

One process, one model load, prompts = openings of paragraphs of the held-out (test) books. Methods (--help
lists them), run side by side on every prompt in rotating order: transformers baselines (hf_greedy, hf_assisted,
hf_pld), every registered decode policy built as infer.py builds it (`big` is the reference) and variants of the
gate (spec_small, gate_sweep, gate_verify, gate_dial). Every output gets one teacher-forced big-model pass
(on-policy error); lossless methods are compared with `big` token by token (near-ties: --tie-eps).
Writes bench/results/decode.json and decode.md (--out to change). Each method and measure: docs/bench.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from common.errors import ProjectError, fail  # noqa: E402
from common.files import write_result  # noqa: E402
from gate.decode.audit import DEFAULT_TARGET, Audit, calibrated_target, sum_audits  # noqa: E402
from gate.decode.contract import BIG_SOURCES
from gate.decode.drafters import load_gate
from gate.decode.ledger import Ledger  # noqa: E402
from gate.decode.loop import Decoder, check_output  # noqa: E402
from gate.decode.policies import BigOnly, Copy, Gate  # noqa: E402
from gate.decode.registry import add_policy_args, registered
from gate.decode.session import add_runtime_args, held_out_prompts  # noqa: E402
from gate.model.copyrule import copy_rule, is_copy_position  # noqa: E402
from runtimes.open import open_models  # noqa: E402

HF_BASELINES = ("hf_greedy", "hf_assisted", "hf_pld")
GATE_VARIANTS = ("spec_small", "copy_verify", "gate_sweep", "gate_audit", "gate_audit_job", "gate_verify",
                 "gate_dial", "eagle", "eagle_verify", "eagle_chain")
# the self:15 early exit is overconfident: tau 0.08 is its median normalised entropy
BENCH_DEFAULTS = dict(small="self:15", tau=0.08, gate="runs/demo/gate")
SOURCE_CODES = {"big": "B", "scaffold": "S", "small": "s", "skip": "k"}   # runs' sources as one string


def method_names(policies) -> list[str]:
    """Every method this benchmark knows: `big`, the HF baselines, the other policies, the gate variants."""
    return ["big", *HF_BASELINES, *(n for n in policies if n != "big"), *GATE_VARIANTS]


def parse(argv, policies=None):
    policies = registered() if policies is None else policies
    names = method_names(policies)
    ap = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__.split("\n\n")[0],
                                 epilog="methods: " + ", ".join(names) + "\n\npolicy option defaults that differ "
                                 "from infer.py's: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                 for k, v in BENCH_DEFAULTS.items()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(ap, dtype_help="one or more, comma-separated (e.g. bfloat16,float32)", auto=False)
    ap.add_argument("--corpus", default=["runs/demo/corpus"], nargs="+",
                    help="corpus folder(s) whose held-out books give the prompts (--n-prompts split among them)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--assistant", help="HF assistant model (default: --small; self:K -> assistant_early_exit)")
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="4 prompts x 32 new tokens (a few minutes)")
    ap.add_argument("--methods", default=",".join(names))
    ap.add_argument("--other-methods", default="big,hf_greedy,hf_pld,spec_small,gate,gate_verify,gate_dial",
                    help="methods for the second and later --dtype (a shorter list keeps the run short)")
    ap.add_argument("--small-threshold", type=float, default=0.6, help="spec_small: max-probability to draft")
    ap.add_argument("--sweep", default="0.9,0.7,0.5", help="gate_sweep thresholds")
    ap.add_argument("--verify-sweep", default="0.5,0.3", help="gate_verify thresholds")
    ap.add_argument("--dial", default="0.5:0.9", help="gate_dial: skip threshold : verify-below value")
    ap.add_argument("--eagle", metavar="PATH", help="a feature-head drafter (train.py fit --drafter eagle): adds "
                    "the methods eagle (lossy, calibrated), eagle_verify (lossless at --verify-sweep) and "
                    "eagle_chain (lossless at --chain-cuts)")
    ap.add_argument("--chain-cuts", default="0.4,0.2", help="eagle_chain cuts (see --chain-cut in infer.py)")
    ap.add_argument("--pld-tokens", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (lossless methods must match `big` token for token); > 0: the sampled "
                    "workload (every method samples at this temperature from the full distribution; lossless "
                    "methods keep the big model's distribution by the speculative-sampling rule)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i)")
    ap.add_argument("--tie-eps", type=float, default=None, help="near-tie logit gap (default 0.25 bf16, 1e-3 fp32)")
    ap.add_argument("--out", default="bench/results/decode", help="output path without extension")
    add_policy_args(ap.add_argument_group("policy options (as in infer.py)"), policies)
    ap.set_defaults(**{k: ([v] if k == "tau" else v) for k, v in BENCH_DEFAULTS.items()})
    args = ap.parse_args(argv)
    if args.quick:
        args.n_prompts, args.new_tokens, args.prompt_tokens = 4, 32, 48
    return args


# -- methods ---------------------------------------------------------------------------------------------------
@dataclass
class Method:
    run: Callable[..., dict]                 # (prompt ids, new tokens, prompt index) -> dict(ids, sources, ledger)
    lossless: bool
    loop: bool = True                        # our decode loop (skips and rollbacks are counted)


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


def hf_method(name, model, eos, counter, temperature: float = 0.0, seed: int = 0, **kw) -> Method:
    pad = eos[0] if eos else None
    # sampled: the full distribution at the temperature, as our loop samples (no top-k / top-p cut)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)

    @torch.inference_mode()
    def run(ids, n, prompt_index: int = 0):
        x = torch.tensor([ids])
        counter.reset()
        torch.manual_seed(seed + prompt_index)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, eos_token_id=list(eos),
                             pad_token_id=pad, **sampling, **kw)
        wall = time.perf_counter() - t0
        new = out[0, len(ids):].tolist()
        led = Ledger(policy=name, verify=False, verify_below=None, temperature=temperature, seed=seed + prompt_index,
                     prompt_tokens=len(ids), new_tokens=len(new), big_calls=counter.calls,
                     big_tokens_fed=counter.tokens, wall_s=wall)
        return dict(ids=new, sources=[], ledger=led)
    return Method(run, lossless=True, loop=False)


def loop_method(rt, policy, lossless: bool = False, temperature: float = 0.0, seed: int = 0, **kw) -> Method:
    def run(ids, n, prompt_index: int = 0):
        dec = Decoder(rt.big, policy, eos_ids=rt.eos_ids, temperature=temperature, seed=seed + prompt_index, **kw)
        res = dec.generate(ids, n)
        return dict(ids=res.ids, sources=res.sources, ledger=Ledger.from_dict(res.ledger))
    return Method(run, lossless=lossless or kw.get("verify", False))


def sampling(args) -> dict:
    """The workload's sampling settings, passed to every method alike."""
    return dict(temperature=args.temperature, seed=args.seed)


def hf_methods(args, rt, notes) -> dict[str, Method]:
    model = rt.hf_model()
    counter = BigCallCounter(model)
    samp = sampling(args)
    out = {"hf_greedy": hf_method("hf_greedy", model, rt.eos_ids, counter, **samp),
           "hf_pld": hf_method("hf_pld", model, rt.eos_ids, counter, prompt_lookup_num_tokens=args.pld_tokens,
                               **samp)}
    assistant = args.assistant or args.small
    if assistant.startswith("self:"):
        out["hf_assisted"] = hf_method("hf_assisted", model, rt.eos_ids, counter,
                                       assistant_early_exit=int(assistant[5:]), **samp)
        notes.append(f"hf_assisted: no smaller model shares {args.model}'s tokenizer here, so the assistant is "
                     f"HF's early exit after {assistant[5:]} layers (generate(assistant_early_exit=...), HF "
                     "defaults: up to 20 draft tokens, assistant confidence threshold 0.4); the model was not "
                     "trained for early exit, so its drafts are mostly rejected.")
    else:
        out["hf_assisted"] = hf_method("hf_assisted", model, rt.eos_ids, counter,
                                       assistant_model=rt.hf_model(assistant), **samp)
    return out


def policy_methods(args, rt, policies, wanted, notes) -> dict[str, Method]:
    """One method per wanted registered policy, built by its from_args (lossy; `big` is the reference)."""
    out = {}
    for name in wanted:
        try:
            policy = policies[name].from_args(args, rt)
        except ValueError as e:
            notes.append(f"{name}: skipped ({e}).")
            continue
        out[name] = loop_method(rt, policy, lossless=isinstance(policy, BigOnly), **sampling(args))
    if args.small.startswith("self:") and {"ratio", "entropy", "spec_small"} & set(wanted):
        notes.append(f"ratio, entropy, spec_small: the small model is {args.small}, the big model's first "
                     f"{args.small[5:]} layers + final norm + output layer (an untrained early exit; on Austen "
                     "text its argmax matched the big model's on ~16% of positions at 15 layers, and it is "
                     f"overconfident, hence entropy tau {' '.join(f'{t:g}' for t in args.tau)}); ratio "
                     f"r={args.ratio:g} after {args.min_tokens} scaffold tokens; spec_small drafts where its "
                     f"max-probability >= {args.small_threshold:g}.")
    return out


def gate_variants(args, rt, notes, wanted) -> dict[str, Method]:
    """spec_small, and the trained gate at other thresholds / with verification (when --gate exists)."""
    samp = sampling(args)
    out = {"copy_verify": loop_method(rt, Copy.from_args(args, rt), verify=True, **samp)}
    if "spec_small" in wanted:
        out["spec_small"] = loop_method(rt, Gate.small_lm(rt.predictor(args.small), args.small_threshold,
                                                          name="spec_small"), verify=True, **samp)
    if not Path(args.gate).exists():
        notes.append(f"gate*: skipped, no trained drafter at {args.gate} (python train.py fit).")
        return out
    drafter = load_gate(rt, args.gate)
    for t in [float(x) for x in args.sweep.split(",") if x]:
        out[f"gate@{t:.10g}"] = loop_method(rt, Gate(drafter, t), **samp)
    if samp["temperature"] <= 0:   # infer.py's lossy default: the audit raises the bar when skips go wrong
        target = calibrated_target(drafter.meta) or DEFAULT_TARGET
        out["gate_audit"] = loop_method(rt, Gate(drafter), audit=Audit(target), **samp)
        # infer.py --audit-scope job: the bar and its evidence carry on from prompt to prompt
        out["gate_audit_job"] = loop_method(rt, Gate(drafter), audit=Audit(target, carry=True), **samp)
    for t in [float(x) for x in args.verify_sweep.split(",") if x]:
        out[f"gate_verify@{t:.10g}"] = loop_method(rt, Gate(drafter, t), verify=True, **samp)
    a, b = (float(x) for x in args.dial.split(":"))
    out["gate_dial"] = loop_method(rt, Gate(drafter, a), verify=True, verify_below=b, **samp)
    notes.append(gate_note(args, drafter, a, b))
    if args.eagle:
        out.update(eagle_variants(args, rt, notes, samp))
    return out


def eagle_variants(args, rt, notes, samp) -> dict[str, Method]:
    """The feature-head drafter (--eagle): lossy at its calibrated threshold, lossless at --verify-sweep."""
    drafter = load_gate(rt, args.eagle)
    out = {"eagle": loop_method(rt, Gate(drafter), **samp)}
    for t in [float(x) for x in args.verify_sweep.split(",") if x]:
        out[f"eagle_verify@{t:g}"] = loop_method(rt, Gate(drafter, t), verify=True, **samp)
    for c in [float(x) for x in args.chain_cuts.split(",") if x]:
        out[f"eagle_chain@{c:g}"] = loop_method(rt, Gate(drafter, 0.0, chain_cut=c), verify=True, **samp)
    cal = drafter.meta.get("calibration", {}).get("gate", {})
    notes.append(f"eagle: the feature head {args.eagle} (train.py fit --drafter eagle), calibrated threshold "
                 f"{drafter.threshold:.4g} (validation coverage {cal.get('coverage', 0):.1%}), at most "
                 f"{drafter.max_skip - 1} drafts per big pass; eagle_chain@C drafts (lossless, --verify) while the "
                 "product of the gate's scores since the last big pass is >= C (EAGLE-2's dynamic draft length).")
    return out


def gate_note(args, drafter, a: float, b: float) -> str:
    cal = drafter.meta.get("calibration", {}).get(drafter.meta.get("primary_gate"), {})
    certified = (f" (certified: precision >= {cal.get('target_precision')} w.p. >= {1 - cal['delta']:.2f}, "
                 f"validation coverage {cal.get('coverage', 0):.1%})" if cal.get("certified") else
                 " (no threshold certified at the target precision: 2 = never skip)" if cal else "")
    return (f"gate: {args.gate}, calibrated threshold {drafter.threshold:.4g}{certified}, max_skip "
            f"{drafter.max_skip}, hidden layer {drafter.hidden_layer}"
            + (f"; `gate` ran at --threshold {args.threshold:g}" if args.threshold is not None else "")
            + f". gate_dial skips at score >= {a:g} and verifies only skips scored below {b:g}.")


def build(args, rt, notes, policies=None) -> dict[str, Method]:
    """The wanted methods (--methods), in order; gate_sweep / gate_verify expand to one per threshold."""
    policies = registered() if policies is None else policies
    wanted = args.methods.split(",")
    unknown = set(wanted) - set(method_names(policies))
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(method_names(policies))}")
    methods: dict[str, Method] = {}
    if set(HF_BASELINES) & set(wanted):
        methods.update(hf_methods(args, rt, notes))
    methods.update(policy_methods(args, rt, policies, [w for w in wanted if w in policies], notes))
    if set(GATE_VARIANTS) & set(wanted):
        methods.update(gate_variants(args, rt, notes, wanted))
    expand = {"gate_sweep": [k for k in methods if k.startswith("gate@")],
              "gate_verify": [k for k in methods if k.startswith("gate_verify@")],
              "eagle_verify": [k for k in methods if k.startswith("eagle_verify@")],
              "eagle_chain": [k for k in methods if k.startswith("eagle_chain@")]}
    wanted = [x for w in wanted for x in expand.get(w, [w])]
    return {k: methods[k] for k in wanted if k in methods}


# -- running ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def tie_gap(big, prefix, a, b) -> float:
    """|logit(a) - logit(b)| of the big model after prefix (fresh cache)."""
    big.reset()
    logits, _ = big.forward(prefix, keep=1)
    big.reset()
    return abs(float(logits[-1, a] - logits[-1, b]))


def compare_to_big(r: dict, ref: list[int], rt, ids: list[int], tie_eps: float) -> None:
    """identical / first_difference / tie_gap / near_tie of a lossless method's output against `big`'s."""
    r["identical"] = r["ids"] == ref
    r["near_tie"] = False
    if r["identical"]:
        return
    d = next((j for j, (a, b) in enumerate(zip(r["ids"], ref)) if a != b), None)
    r["first_difference"] = d
    if d is not None:
        r["tie_gap"] = tie_gap(rt.big, ids + ref[:d], ref[d], r["ids"][d])
        r["near_tie"] = r["tie_gap"] <= tie_eps


def copy_marks(prompt: list[int], new: list[int]) -> list[bool]:
    """Per generated token: was it at a copy position (the 4 tokens before it occurred earlier in the text)?"""
    import numpy as np


    if not new:
        return []
    text = np.array(prompt + new[:-1], dtype=np.int64)
    marks = is_copy_position(copy_rule(text, np.zeros(len(text), dtype=np.int64))[1])
    return marks[len(prompt) - 1:].tolist()


def run_prompts(rt, methods: dict[str, Method], prompts, new_tokens: int, tie_eps: float, dtype: str,
                greedy: bool = True) -> dict:
    """Every method on every prompt (rotating order), each output checked; method -> list of rows. Lossless
    methods are compared with `big` token by token only when greedy (sampled outputs differ by design)."""
    names = list(methods)
    for name in names:   # warm-up: first calls allocate and pick kernels
        methods[name].run(prompts[0][:16], 4)
    rows = {n: [] for n in names}
    for i, ids in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        out = {name: methods[name].run(ids, new_tokens, i) for name in order}
        for name in names:
            r = out[name]
            r["prompt_tokens"] = len(ids)
            r["check"] = check_output(rt.big, ids, r["ids"], tie_eps)
            r["copy"] = copy_marks(ids, r["ids"])
            if methods[name].lossless and greedy:
                compare_to_big(r, out["big"]["ids"] if "big" in out else r["ids"], rt, ids, tie_eps)
            rows[name].append(r)
        print(f"[bench] {dtype} prompt {i + 1}/{len(prompts)}: " + "  ".join(
            f"{n} {len(out[n]['ids']) / out[n]['ledger'].wall_s:.1f}t/s" for n in names), file=sys.stderr, flush=True)
    return rows


def copy_skip_shares(rows: list[dict]) -> dict:
    """Share of generated tokens at copy positions, and of skips on the copy / non-copy positions."""
    copy = [c for r in rows for c in r["copy"]]
    skipped = [src not in BIG_SOURCES for r in rows for src in r["sources"]]
    out = {"copy_share": round(sum(copy) / max(len(copy), 1), 4)}
    if skipped:
        n_nc = sum(1 for c in copy if not c)
        out["skipped_non_copy"] = round(sum(1 for c, k in zip(copy, skipped) if k and not c) / max(n_nc, 1), 4)
        out["skipped_copy"] = round(sum(1 for c, k in zip(copy, skipped) if k and c) / max(sum(copy), 1), 4)
    return out


def summarize(name: str, method: Method, rows: list[dict], ref_tps: float | None) -> dict:
    leds = [r["ledger"] for r in rows]
    toks = sum(len(r["ids"]) for r in rows)
    wall = sum(led.wall_s for led in leds)
    s = dict(method=name, lossless=method.lossless, prompts=len(rows), new_tokens=toks, wall_s=round(wall, 3),
             tokens_per_s=round(toks / wall, 3) if wall else 0.0,
             big_calls_per_token=round(sum(led.big_calls for led in leds) / toks, 4),
             # catch-up included, prompt (prefill) excluded: 1.0 for big-only
             big_tokens_fed_per_token=round(sum(led.big_tokens_fed - r["prompt_tokens"]
                                                for led, r in zip(leds, rows)) / toks, 4),
             on_policy_error=round(sum(r["check"]["mismatches"] for r in rows) / toks, 5),
             on_policy_error_beyond_ties=round(sum(r["check"]["beyond_ties"] for r in rows) / toks, 5),
             nll=round(sum(r["check"]["nll"] * len(r["ids"]) for r in rows) / toks, 4))
    s["speed_vs_big"] = round(s["tokens_per_s"] / ref_tps, 3) if ref_tps else None
    s.update(copy_skip_shares(rows))
    if method.loop:
        s["skipped_share"] = round(sum(led.skipped for led in leds) / toks, 4)
        s["rollbacks"] = sum(led.rollbacks for led in leds)
    audits = [led.audit for led in leds if led.audit]
    if audits:
        a = sum_audits(audits)
        s["audit"] = {k: a[k] for k in ("target", "audited", "mismatches", "error", "bound", "runs_raised")}
    if method.lossless and "identical" in rows[0]:
        s["identical_to_big"] = sum(r["identical"] for r in rows)
        s["near_tie_divergences"] = sum(1 for r in rows if not r["identical"] and r["near_tie"])
    return s


def run_record(r: dict) -> dict:
    """A row as written to the JSON file: the ledger as a dict, the sources as one letter per token."""
    return {**{k: v for k, v in r.items() if k not in ("sources", "ledger")}, "ledger": r["ledger"].to_dict(),
            "sources": "".join(SOURCE_CODES.get(x, "m") for x in r["sources"])}


def machine_info(load_before) -> dict:
    return dict(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), load_before=", ".join(f"{x:.1f}" for x in load_before),
                load_after=", ".join(f"{x:.1f}" for x in os.getloadavg()))


def models_to_open(args, policies) -> list[str]:
    """The predictors of the wanted policies (those with complete options), --small and --assistant."""
    wanted = args.methods.split(",")
    names = [args.small] if {"spec_small", "hf_assisted"} & set(wanted) else []
    names += [args.assistant] if args.assistant and "hf_assisted" in wanted else []
    for name in wanted:
        if name in policies:
            try:
                big, smalls = policies[name].model_names(args)
            except ValueError:
                continue   # reported when the method is built
            names += smalls if big == args.model else []
    return list(dict.fromkeys(names))


def run_dtype(args, dtype, policies=None) -> dict:
    policies = registered() if policies is None else policies
    load_before = os.getloadavg()
    rt = open_models(args.model, models_to_open(args, policies), dtype, args.backend)
    share = [args.n_prompts // len(args.corpus) + (i < args.n_prompts % len(args.corpus))
             for i in range(len(args.corpus))]
    prompts = [p for c, n in zip(args.corpus, share) if n
               for p in held_out_prompts(c, rt.tokenizer, n, args.prompt_tokens, args.split)]
    for p in prompts:   # prompt + new tokens within every model's context, before any method runs
        rt.check_fits(len(p), args.new_tokens, "--prompt-tokens prompt", "--new-tokens")
    tie_eps = args.tie_eps if args.tie_eps is not None else (1e-3 if dtype in ("float32", "fp32") else 0.25)
    notes = []
    methods = build(args, rt, notes, policies)
    print(f"[bench] {dtype}: {len(prompts)} prompts x {args.new_tokens} tokens; methods: {', '.join(methods)}",
          file=sys.stderr, flush=True)
    rows = run_prompts(rt, methods, prompts, args.new_tokens, tie_eps, dtype, greedy=args.temperature <= 0)
    ref_tps = None
    if "big" in rows:
        ref_tps = sum(len(r["ids"]) for r in rows["big"]) / sum(r["ledger"].wall_s for r in rows["big"])
    return dict(
        config={**vars(args), "dtype": dtype, "tie_eps": tie_eps}, machine=machine_info(load_before),
        notes=notes, summary=[summarize(n, m, rows[n], ref_tps) for n, m in methods.items()],
        prompts=[dict(prompt_ids=p, prompt=rt.tokenizer.decode(p)) for p in prompts],
        runs={n: [run_record(r) for r in rows[n]] for n in methods})


# -- report ----------------------------------------------------------------------------------------------------
def fastest_big(results) -> tuple[float | None, str | None]:
    bigs = [(s["tokens_per_s"], r["config"]["dtype"]) for r in results for s in r["summary"] if s["method"] == "big"]
    return max(bigs) if bigs else (None, None)


def markdown_intro(results, argv, best) -> list[str]:
    first = results[0]
    cfg, m = first["config"], first["machine"]
    return [f"# Decoding benchmark ({cfg['model']})", "",
            "Command: `python bench/decode.py " + " ".join(argv) + "`", "",
            f"{len(first['prompts'])} prompts of {cfg['prompt_tokens']} tokens from the held-out "
            f"books of `{', '.join(cfg['corpus'])}` ({cfg['split']} split), up to "
            f"{cfg['new_tokens']} new tokens each, "
            + (f"sampled at temperature {cfg['temperature']:g} (seed {cfg['seed']} + prompt index; every method "
               "samples from the full distribution, lossless ones keep the big model's distribution by the "
               "speculative-sampling rule, so their outputs differ from `big`'s by design)"
               if cfg.get("temperature", 0) > 0 else "greedy") + f". Machine: {m['cpus']} CPUs, torch "
            f"{m['torch']}, {m['torch_threads']} torch thread(s); shared with other jobs (load average "
            f"{m['load_before']} at the start), so timings are noisy: methods alternate on every prompt and "
            "speeds are compared within one run.", "",
            "Columns: big calls / token = big-model forward passes per generated token (prefill included); "
            "fed / token = tokens fed to the big model per generated token (catch-up and rolled-back tokens "
            "included, prompt excluded); vs big = tokens/s relative to `big` in the same dtype"
            + (f", vs best = relative to the fastest big-only run ({best[1]})" if len(results) > 1 else "")
            + "; on-policy error = share of tokens that differ from the big model's argmax on the same "
            "prefix (teacher-forced), in brackets the share beyond numerical near-ties (logit gap > "
            f"{cfg['tie_eps']}); identical = outputs token-identical to `big`, + those whose first "
            "difference is a near-tie; copy = share of the generated tokens at copy positions (the 4 tokens "
            "before them occurred earlier in prompt + output: prompt lookup could have them); skips c / n-c = "
            "share of the copy / non-copy positions that were skipped (drafted without a big-model pass).", ""]


def markdown_row(s: dict, best_tps: float | None) -> str:
    ident = "-"
    if "identical_to_big" in s:
        ident = f"{s['identical_to_big']}/{s['prompts']}"
        if s["near_tie_divergences"]:
            ident += f" (+{s['near_tie_divergences']} near-tie)"
    vs_best = f"{s['tokens_per_s'] / best_tps:.2f}x | " if best_tps else ""
    skips = (f"{100 * s['skipped_copy']:.0f}% / {100 * s['skipped_non_copy']:.0f}%"
             if "skipped_non_copy" in s else "-")
    return (f"| {s['method']} | {'yes' if s['lossless'] else 'no'} | {s['big_calls_per_token']:.3f} | "
            f"{s['big_tokens_fed_per_token']:.2f} | {s['tokens_per_s']:.1f} | {s['speed_vs_big']:.2f}x | "
            f"{vs_best}{100 * s['on_policy_error']:.1f}% ({100 * s['on_policy_error_beyond_ties']:.1f}%) | "
            f"{s['nll']:.3f} | {ident} | {100 * s['copy_share']:.0f}% | {skips} |")


def skip_error(s: dict) -> float | None:
    """Share of a lossy method's skipped tokens that are not the big model's argmax (only a skip can differ)."""
    return s["on_policy_error"] / s["skipped_share"] if s.get("skipped_share") else None


def audit_lines(summary: list[dict]) -> list[str]:
    """Each audited run beside the oracle threshold: of the runs without audit (the calibrated threshold and the
    sweep), the one with the fewest big calls whose skips were right at the audit's target precision on this
    text (the threshold one would pick knowing the answers)."""
    runs = [s for s in summary if s["method"] == "gate" or s["method"].startswith("gate@")]
    out = []
    for audit in (s for s in summary if "audit" in s):
        a = audit["audit"]
        line = (f"{audit['method']}: {a['mismatches']} of {a['audited']} audited skips wrong "
                f"({100 * a['error']:.2f}%, 90% bound {100 * a['bound']:.2f}%, target {100 * a['target']:.2g}%); "
                f"the bar rose in {a['runs_raised']} of {audit['prompts']} prompts; on-policy error "
                f"{100 * audit['on_policy_error']:.2f}% of all tokens.")
        ok = [s for s in runs if skip_error(s) is not None and skip_error(s) <= a["target"]]
        if ok:
            o = min(ok, key=lambda s: s["big_calls_per_token"])
            line += (f" Oracle threshold ({o['method']}: {100 * skip_error(o):.2f}% of its skips wrong, the fewest "
                     f"big calls among the runs without audit within the target): {o['big_calls_per_token']:.3f} "
                     f"big calls / token against {audit['big_calls_per_token']:.3f} "
                     f"({audit['big_calls_per_token'] / o['big_calls_per_token'] - 1:+.1%}).")
        else:
            line += f" No run without audit kept its skips' error within {100 * a['target']:.2g}%."
        out += [line, ""]
    return out


def markdown(results, argv) -> str:
    best = fastest_big(results)
    multi = len(results) > 1
    lines = markdown_intro(results, argv, best)
    for res in results:
        lines += [f"## {res['config']['dtype']}", "",
                  "| method | lossless | big calls / token | fed / token | tokens/s | vs big | "
                  + ("vs best | " if multi else "") + "on-policy error | NLL | identical | copy | skips c / n-c |",
                  "|---|---|---|---|---|---|" + ("---|" if multi else "") + "---|---|---|---|---|"]
        lines += [markdown_row(s, best[0] if multi else None) for s in res["summary"]] + [""]
        lines += audit_lines(res["summary"])
    lines += ["Notes:"] + [f"- {n}" for n in results[0]["notes"]]
    return "\n".join(lines) + "\n"


def run_all(args) -> list[dict]:
    results = []
    for i, dt in enumerate(args.dtype.split(",")):
        if i == 1:
            args.methods = args.other_methods
        results.append(run_dtype(args, dt))
    return results


def main(argv=None) -> int:
    from transformers.utils import logging as hf_logging

    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = run_all(args)
    except ProjectError as e:   # a user's mistake (a prompt past the context, a bad model name) is one line
        return fail("bench/decode.py", e)
    out = Path(args.out)
    write_result(out, dict(results=results), markdown(results, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
