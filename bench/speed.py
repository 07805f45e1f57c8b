#!/usr/bin/env python
"""Decoding speed on llama.cpp against the binding's own generate and prompt lookup, on a quiet machine.

    python bench/speed.py --corpus runs/genres/*/corpus [--model smollm2-135m] [--gate runs/demo/gate]
                          [--n-prompts 8] [--new-tokens 128] [--temperature 0] [--threads 2] [--force]

Methods, on the same GGUF, threads and prompt ids, in an order rotating per prompt: binding_generate and
binding_pld_N (llama-cpp-python's generate, plain and with N-token prompt lookup), big, copy (--verify, planned),
copy_fixed (--plan fixed), gate (with --gate, --verify) and gate_lossy (the gate at its calibrated threshold, audited,
its on-policy error checked afterwards). Speed is decode tokens/s without the prompt pass;
lossless methods are compared with `big` token for token (greedy). Refused when the load average is above 0.5
before the run (--force: the files then say "measured under load"). Writes --out .json and .md.
Each method: docs/bench.md; how it measures, and the results: docs/speed.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.decode import tie_gap  # noqa: E402
from bench.quiet import Quiet, load  # noqa: E402
from common.cpu import OtherCPU  # noqa: E402
from common.errors import ProjectError, fail  # noqa: E402
from common.files import write_result  # noqa: E402
from gate.decode.cost import MAX_CHAIN, cpu_name  # noqa: E402
from gate.decode.drafters import load_gate  # noqa: E402
from gate.decode.ledger import PLAN_COUNTS  # noqa: E402
from gate.decode.loop import Decoder, check_output  # noqa: E402
from gate.decode.policies import BigOnly, Copy, Gate  # noqa: E402
from gate.decode.session import audit_for, held_out_prompts, planner_for  # noqa: E402
from runtimes.open import open_models  # noqa: E402
from runtimes.sources import gguf_path  # noqa: E402


def parse(argv):
    ap = argparse.ArgumentParser(prog="bench/speed.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="packaged alias or .gguf file")
    ap.add_argument("--backend", default="llama.cpp", choices=("llama.cpp", "hf"),
                    help="hf: transformers float32; the runtime's own methods are then hf_generate and hf_pld_N "
                    "(generate(prompt_lookup_num_tokens=N))")
    ap.add_argument("--corpus", nargs="+", required=True, help="corpus folders whose held-out books give prompts")
    ap.add_argument("--split", default="test")
    ap.add_argument("--gate", help="a trained gate for --model: adds the method `gate`")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="default: one per core")
    ap.add_argument("--pld", default="2,4,8,10", help="num_pred_tokens of the binding's prompt lookup")
    ap.add_argument("--methods", default="binding_generate,binding_pld,big,copy,copy_fixed,gate")
    ap.add_argument("--force", action="store_true", help="run even on a busy machine (marked in the result)")
    ap.add_argument("--out", default="bench/results/speed")
    return ap.parse_args(argv)


# -- runners: (prompt ids, n, prompt index) -> (new ids, decode seconds after the first token, total seconds, ledger)
def binding_runner(llm, temperature: float, seed: int, eos):
    def run(ids, n, i):
        llm.reset()               # else generate() reuses a cached prompt: every method feeds the whole prompt
        if temperature > 0:
            llm.set_seed(seed + i)
        out, t0 = [], time.perf_counter()
        t_first = None
        kw = dict(temp=temperature, top_k=1 if temperature == 0 else 0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        for tok in llm.generate(ids, reset=True, **kw):
            if tok in eos:
                break
            out.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
            if len(out) == n:
                break
        end = time.perf_counter()
        return out, end - (t_first or end), end - t0, None
    return run


class FirstToken:
    """A transformers streamer that notes when the first generated token arrives (put() first gets the prompt)."""

    def __init__(self):
        self.calls, self.t_first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.t_first = time.perf_counter()

    def end(self):
        pass


def hf_runner(model, eos, temperature: float, seed: int, **kw):
    """transformers' own generate (greedy, or sampled without top-k/p); kw: prompt_lookup_num_tokens=N."""
    samp = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)

    @torch.inference_mode()
    def run(ids, n, i):
        torch.manual_seed(seed + i)
        st = FirstToken()
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=0, eos_token_id=list(eos),
                             pad_token_id=eos[0] if eos else None, streamer=st, **samp, **kw)
        end = time.perf_counter()
        new = out[0, len(ids):].tolist()
        while new and new[-1] in eos:
            new.pop()
        return new, end - (st.t_first or end), end - t0, None
    return run


def decoder_runner(rt, policy, temperature: float, seed: int, planned: bool, lossy: bool = False):
    """infer.py's decode of one policy: lossless (--verify; planned: chains sized by the planner) or, with `lossy`,
    the gate at its calibrated threshold with infer.py's default audit, its on-policy error checked afterwards by a
    teacher-forced big pass (not timed)."""
    planner = planner_for(policy, rt, argparse.Namespace(planned=planned), lossy=lossy)   # infer.py's
    audit_args = argparse.Namespace(audit=None, no_audit=False, verify_below=None, temperature=temperature)

    def run(ids, n, i):
        first = []
        verify = not lossy and (planned or policy.name != "big")
        dec = Decoder(rt.big, policy, verify=verify, temperature=temperature,
                      seed=seed + i, eos_ids=rt.eos_ids, planner=planner,
                      audit=audit_for(policy, audit_args, verify) if lossy else None,
                      on_final=lambda toks, src: first or first.append(time.perf_counter()))
        t0 = time.perf_counter()
        res = dec.generate(ids, n)
        end = time.perf_counter()
        led = {**res.ledger, "sources": res.sources}
        if lossy:
            led["check"] = check_output(rt.big, ids, res.ids)
        return res.ids, end - (first[0] if first else end), end - t0, led
    return run


def non_copy_skips(prompts, outputs, ledgers) -> dict:
    """Of the generated positions whose 4 tokens before occur nowhere earlier in the text (non-copy), and of the
    others, how many the method did not leave to the big model (drafts it kept)."""
    counts = {"non_copy": [0, 0], "copy": [0, 0]}
    for ids, out, led in zip(prompts, outputs, ledgers):
        text, seen = list(ids) + list(out), set()
        for j in range(len(ids), len(text)):
            if j - 5 >= 0:
                seen.add(tuple(text[j - 5:j - 1]))      # 4-grams that end before position j - 1
            kind = "copy" if j >= 4 and tuple(text[j - 4:j]) in seen else "non_copy"
            counts[kind][0] += 1
            counts[kind][1] += led["sources"][j - len(ids)] != "big"
    return {k: {"positions": n, "skipped": sk, "share": round(sk / n, 4) if n else None}
            for k, (n, sk) in counts.items()}


def make_methods(args, rt, gguf: str) -> dict:
    import llama_cpp


    wanted = args.methods.split(",")
    out = {}
    if args.backend == "hf":
        model = rt.hf_model()
        if "binding_generate" in wanted:
            out["hf_generate"] = hf_runner(model, rt.eos_ids, args.temperature, args.seed)
        if "binding_pld" in wanted and args.temperature == 0:
            for n in map(int, args.pld.split(",")):
                out[f"hf_pld_{n}"] = hf_runner(model, rt.eos_ids, 0.0, args.seed, prompt_lookup_num_tokens=n)
    elif "binding_generate" in wanted or "binding_pld" in wanted:
        kw = dict(n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        if "binding_generate" in wanted:
            out["binding_generate"] = binding_runner(llama_cpp.Llama(gguf, **kw), args.temperature, args.seed,
                                                         rt.eos_ids)
        if "binding_pld" in wanted and args.temperature == 0:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
            for n in map(int, args.pld.split(",")):
                llm = llama_cpp.Llama(gguf, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=n), **kw)
                out[f"binding_pld_{n}"] = binding_runner(llm, 0.0, args.seed, rt.eos_ids)
    t, s = args.temperature, args.seed
    if "big" in wanted:
        out["big"] = decoder_runner(rt, BigOnly(), t, s, planned=False)
    if "copy" in wanted:
        out["copy"] = decoder_runner(rt, Copy(min_match=1, max_skip=33), t, s, planned=True)
    if "copy_fixed" in wanted:
        out["copy_fixed"] = decoder_runner(rt, Copy(), t, s, planned=False)
    if ("gate" in wanted or "gate_lossy" in wanted) and args.gate:
        dr = load_gate(rt, args.gate)
        if "gate" in wanted:
            out["gate"] = decoder_runner(rt, Gate(dr, threshold=-float("inf"), free_max_skip=MAX_CHAIN + 1), t, s,
                                         planned=True)
        if "gate_lossy" in wanted and t == 0:
            out["gate_lossy"] = decoder_runner(rt, Gate(dr), t, s, planned=False, lossy=True)
    return out



def prompts_of(args, rt) -> list[list[int]]:
    per = [args.n_prompts // len(args.corpus) + (i < args.n_prompts % len(args.corpus))
           for i in range(len(args.corpus))]
    out = []
    for corpus, n in zip(args.corpus, per):
        if n:
            out += held_out_prompts(corpus, rt.tokenizer, n, args.prompt_tokens, args.split)
    return out


def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    quiet = Quiet.check(args.force, "bench/speed.py")
    rt = open_models(args.model, [], "float32", args.backend)
    gguf = str(gguf_path(args.model)) if args.backend == "llama.cpp" else args.model
    prompts = prompts_of(args, rt)
    for ids in prompts:
        rt.check_fits(len(ids), args.new_tokens)
    methods = make_methods(args, rt, gguf)
    for run in methods.values():            # warm-up: first-call allocations, page faults
        run(prompts[0][:16], 8, 0)
    names = list(methods)
    rows = {m: dict(tokens=0, decode_s=0.0, total_s=0.0, outputs=[], ledgers=[]) for m in names}
    for i, ids in enumerate(prompts):
        k = i % len(names)
        for m in names[k:] + names[:k]:
            before = load()
            with OtherCPU() as other:
                new, dec_s, tot_s, led = methods[m](ids, args.new_tokens, i)
            quiet.mark(m, before, load(), other.cores)
            r = rows[m]
            r["tokens"] += len(new)
            r["decode_tokens"] = r.get("decode_tokens", 0) + max(len(new) - 1, 0)
            r["decode_s"] += dec_s
            r["total_s"] += tot_s
            r["outputs"].append(new)
            r["ledgers"].append(led)
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
    res = summarise(args, rows, prompts, quiet, gguf)
    if args.temperature == 0 and "big" in rows:
        for m, d in res["methods"].items():
            if m != "big" and rows[m]["ledgers"][0] is not None:
                d["parted_from_big"] = parting(rt.big, prompts, rows[m]["outputs"], rows["big"]["outputs"])
    return res


def parting(big, prompts, outs, refs) -> list[dict]:
    """Where a lossless method's output first differs from big's: the position and the big model's logit gap
    between the two tokens there (bench/decode.py's tie_gap, not timed); a gap near 0 is a numerical near-tie
    (batched and one-token passes round differently on some weight formats)."""
    out = []
    for i, (ids, a, b) in enumerate(zip(prompts, outs, refs)):
        d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is not None:
            gap = tie_gap(big, list(ids) + list(b[:d]), b[d], a[d])
            out.append(dict(prompt=i, position=d, logit_gap=round(gap, 4)))
    return out


def summarise(args, rows, prompts, quiet, gguf) -> dict:
    tps = {m: r["decode_tokens"] / r["decode_s"] for m, r in rows.items() if r["decode_s"] > 0}
    big = rows.get("big", {}).get("outputs")
    own = "binding_generate" if "binding_generate" in tps else "hf_generate"
    pld = {m: v for m, v in tps.items() if m.startswith(("binding_pld_", "hf_pld_"))}
    best_pld = max(pld, key=pld.get) if pld else None
    methods = {}
    for m, r in rows.items():
        leds = [x for x in r["ledgers"] if x]
        calls = sum(x["predictor_calls"] for x in leds)
        d = dict(tokens=r["tokens"], decode_s=round(r["decode_s"], 3), total_s=round(r["total_s"], 3),
                 decode_tokens_per_s=round(tps.get(m, 0.0), 2),
                 over_big=round(tps[m] / tps["big"], 3) if "big" in tps and m in tps else None,
                 over_binding_generate=round(tps[m] / tps[own], 3) if own in tps and m in tps else None,
                 over_best_binding_pld=round(tps[m] / pld[best_pld], 3) if best_pld and m in tps else None,
                 identical_to_big=sum(a == b for a, b in zip(r["outputs"], big)) if big else None,
                 load_before_after=quiet.marks.get(m))
        if leds:
            n = sum(x["new_tokens"] for x in leds)
            d.update(big_calls_per_token=round(sum(x["big_calls"] for x in leds) / n, 3),
                     drafted=sum(x["drafted"] for x in leds), rollbacks=sum(x["rollbacks"] for x in leds),
                     policy_ms_per_proposal=round(1000 * sum(x["policy_s"] for x in leds) / calls, 4) if calls else None,
                     policy_share_of_wall=round(sum(x["policy_s"] for x in leds) / sum(x["wall_s"] for x in leds), 4))
            d["tokens_per_big_pass"] = round(n / max(1, sum(x["big_calls"] for x in leds)), 3)
            checks = [x["check"] for x in leds if x.get("check")]
            if checks:
                d["on_policy_error"] = round(sum(c["mismatches"] for c in checks) /
                                             max(1, sum(c["checked"] for c in checks)), 5)
            if len(leds) == len(prompts):
                d["skipped_by_position"] = non_copy_skips(prompts, r["outputs"], leds)
            plans = [x["plan"] for x in leds if x.get("plan")]
            if plans:
                d["plan"] = {k: sum(p.get(k, 0) for p in plans) for k in PLAN_COUNTS}
                d["plan"]["step_ms"] = plans[0]["step_ms"]
                d["plan"]["draft_ms"] = plans[-1]["draft_ms"]     # the planner's mean over the run's proposals
        methods[m] = d
    return dict(command="python " + " ".join(shlex.quote(a) for a in sys.argv), model=args.model, gguf=gguf,
                backend=args.backend,
                threads=args.threads, temperature=args.temperature, corpus=args.corpus, n_prompts=len(prompts),
                prompt_tokens=[len(p) for p in prompts], new_tokens=args.new_tokens, best_binding_pld=best_pld,
                load=quiet.to_dict(), load_note=quiet.note(), cpu=cpu_name(),
                llama_cpp_python=__import__("llama_cpp").__version__, methods=methods,
                outputs={m: r["outputs"] for m, r in rows.items()})


def markdown(res: dict) -> str:
    own = "transformers' generate" if res["backend"] == "hf" else "binding generate"
    lines = [f"# Decode speed on {res['backend']}: {res['model']}, {res['threads']} threads, T = {res['temperature']}",
             "",
             f"`{res['command']}`", "",
             f"{res['n_prompts']} prompts ({', '.join(Path(c).parent.name for c in res['corpus'])}) x "
             f"{res['new_tokens']} new tokens; decode tokens/s exclude the prompt pass. {res['load_note']}; "
             f"CPU {res['cpu']}, llama-cpp-python {res['llama_cpp_python']}.", "",
             f"| method | tokens/s | x big | x {own} | x best {own.split()[0]} PLD | identical to big | "
             "big calls/token | policy ms/proposal | load before/after, others' cores |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, d in res["methods"].items():
        def f(x):
            return "-" if x is None else x
        lines.append(f"| {m} | {d['decode_tokens_per_s']} | {f(d['over_big'])} | {f(d['over_binding_generate'])} | "
                     f"{f(d['over_best_binding_pld'])} | "
                     f"{'-' if d['identical_to_big'] is None else str(d['identical_to_big']) + '/' + str(res['n_prompts'])} | "
                     f"{f(d.get('big_calls_per_token'))} | {f(d.get('policy_ms_per_proposal'))} | "
                     f"{f(d['load_before_after'])} |")
    if res["best_binding_pld"]:
        lines += ["", f"Best prompt lookup of the runtime: {res['best_binding_pld']}."]
    for m, d in res["methods"].items():
        if d.get("parted_from_big"):
            lines += ["", f"{m} parts from big on {len(d['parted_from_big'])} prompt(s), at big-model logit gaps "
                      + ", ".join(f"{p['logit_gap']:g} (token {p['position']})" for p in d["parted_from_big"])
                      + ": near-ties where batched and one-token passes round differently, not wrong acceptances"
                      " (a gap well above 0.25 would be a bug)."]
    if res["temperature"] > 0:
        lines += ["", "Sampled: 'identical to big' is not expected (lossless means the same distribution, not the "
                  "same sample)."]
    pos = {m: d for m, d in res["methods"].items() if d.get("skipped_by_position")}
    if pos:
        lines += ["", "Tokens per big pass, and the generated positions each method did not leave to the big model, "
                  "on non-copy positions (the 4 tokens before occur nowhere earlier in the text) and copy positions:",
                  ""] + [f"- {m}: {d['tokens_per_big_pass']} tokens per big pass; non-copy "
                         f"{d['skipped_by_position']['non_copy']['skipped']}/"
                         f"{d['skipped_by_position']['non_copy']['positions']} ("
                         f"{100 * (d['skipped_by_position']['non_copy']['share'] or 0):.1f}%), copy "
                         f"{d['skipped_by_position']['copy']['skipped']}/{d['skipped_by_position']['copy']['positions']}"
                         f" ({100 * (d['skipped_by_position']['copy']['share'] or 0):.1f}%)" for m, d in pos.items()]
    errs = {m: d["on_policy_error"] for m, d in res["methods"].items() if d.get("on_policy_error") is not None}
    if errs:
        lines += ["", "On-policy error of the lossy runs (share of generated tokens that differ from the big model's "
                  "argmax on the same prefix, one teacher-forced pass afterwards): " +
                  ", ".join(f"{m} {100 * e:.2f}%" for m, e in errs.items())]
    plans = {m: d["plan"] for m, d in res["methods"].items() if d.get("plan")}
    if plans:
        lines += ["", "Planner: " + "; ".join(f"{m}: {p['chains']} chains, {p['kept']} drafts kept, "
                                            f"{p.get('draft_ms', 0):.2f} ms a proposal of the costly drafter, "
                                            f"{p['cut_to_zero']} cut to none, {p['skipped_starts']} starts skipped, "
                                            f"{p['free_drafts']} copy drafts while the drafter was held back"
                                            for m, p in plans.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    try:
        res = bench(args)
    except ProjectError as e:   # a user's mistake (no corpus there, a bad model name) is one line
        return fail("bench/speed.py", e)
    write_result(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
