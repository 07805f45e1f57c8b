#!/usr/bin/env python
"""Benchmark the llama.cpp backend against llama.cpp's own generate and the transformers backend.

    python bench/llamacpp.py [--model smollm2-135m] [--threads 2] [--n-prompts 4] [--new-tokens 64] [--no-hf]
                             [--gate PATH [--small M]]

One process, one load of each model, the same GGUF, threads and prompt token ids; methods in rotating order:
llama_big, llama_generate, llama_pld, llama_copy_verify and llama_gate_verify (with --gate) on llama.cpp, and
hf_big, hf_copy_verify and hf_gate_verify on the transformers backend. Each timing covers the whole generation
(the prompt pass and --new-tokens decode steps). Writes bench/results/llamacpp.json and .md (--out to change).
Each method and the targets: docs/bench.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from gate.decode.drafters import load_gate, router_meta  # noqa: E402
from gate.decode.loop import Decoder  # noqa: E402
from gate.decode.policies import BigOnly, Copy, Gate  # noqa: E402
from runtimes.open import open_models  # noqa: E402
from runtimes.sources import gguf_path  # noqa: E402

PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that",
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite matter to "
    "us. His grey eyes shone and twinkled, and his usually pale face was flushed and animated. The fire",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see",
]


def parse(argv):
    ap = argparse.ArgumentParser(prog="bench/llamacpp.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="packaged alias or .gguf file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-prompts", type=int, default=4, help=f"at most {len(PROMPTS)}")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="passes over the prompts")
    ap.add_argument("--no-hf", action="store_true", help="skip the hf_* methods (no transformers load)")
    ap.add_argument("--gate", help="a drafter for --model (train.py fit): adds llama_gate_verify / hf_gate_verify")
    ap.add_argument("--small", help="the small model a router --gate runs over (default: the one it names)")
    ap.add_argument("--gate-threshold", type=float, default=0.5,
                    help="skip threshold of the verified gate (lossless at any value)")
    ap.add_argument("--out", default="bench/results/llamacpp", help="output path without extension")
    return ap.parse_args(argv)


# -- runners: each maps (prompt ids, n new tokens) -> (new ids, wall seconds) ------------------------------------
def decoder_runner(backend, policy=None, **kw):
    policy = policy or BigOnly()

    def run(ids, n):
        t0 = time.perf_counter()
        res = Decoder(backend, policy, **kw).generate(ids, n)
        return res.ids, time.perf_counter() - t0
    return run


def generate_runner(llm):
    def run(ids, n):
        out = []
        t0 = time.perf_counter()
        llm.reset()   # else generate() reuses a cached prompt prefix: every method feeds the whole prompt
        for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out, time.perf_counter() - t0
    return run


def make_runners(args, gguf: str):
    import llama_cpp

    n_ctx = 1024
    llm = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False, flash_attn=True)
    pld = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False, flash_attn=True,
                          draft_model=llama_cpp.llama_speculative.LlamaPromptLookupDecoding(num_pred_tokens=10))
    runners = {"llama_generate": generate_runner(llm), "llama_pld": generate_runner(pld)}
    runners.update(runtime_runners(args, "llama.cpp", "llama"))
    if not args.no_hf:
        runners.update(runtime_runners(args, "hf", "hf"))
    return runners, llm


def runtime_runners(args, kind: str, prefix: str) -> dict:
    """big, copy --verify and (with --gate) gate --verify through the project's runtime on one backend."""
    small = args.small or (router_meta(args.gate) or {}).get("small_model", {}).get("name") if args.gate else None
    rt = open_models(args.model, [small] if small else [], "float32", kind)
    out = {f"{prefix}_big": decoder_runner(rt.big),
           f"{prefix}_copy_verify": decoder_runner(rt.big, Copy(), verify=True)}
    if args.gate:
        drafter = load_gate(rt, args.gate)
        out[f"{prefix}_gate_verify"] = decoder_runner(
            rt.big, Gate(drafter, args.gate_threshold), verify=True)
    return out


# -- the run ------------------------------------------------------------------------------------------------
def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    gguf = str(gguf_path(args.model))
    runners, llm = make_runners(args, gguf)
    prompts = [llm.tokenize(p.encode(), add_bos=False) for p in PROMPTS[:args.n_prompts]]
    for run in runners.values():                      # warm-up: first-call allocations, page faults
        run(prompts[0][:8], 4)
    names = list(runners)
    totals = {m: dict(tokens=0, wall=0.0) for m in names}
    outputs: dict[str, list] = {m: [] for m in names}
    load0 = os.getloadavg()
    for r in range(args.repeats):
        for i, ids in enumerate(prompts):
            k = (i + r) % len(names)
            for m in names[k:] + names[:k]:
                new, wall = runners[m](ids, args.new_tokens)
                totals[m]["tokens"] += len(new)
                totals[m]["wall"] += wall
                if r == 0:
                    outputs[m].append(new)
    return summarise(args, gguf, totals, outputs, prompts, load0)


def summarise(args, gguf, totals, outputs, prompts, load0) -> dict:
    tps = {m: t["tokens"] / t["wall"] for m, t in totals.items()}
    ref = outputs["llama_generate"]
    same = {m: sum(a == b for a, b in zip(o, ref)) for m, o in outputs.items()}
    same_big = {m: sum(a == b for a, b in zip(o, outputs["hf_big" if m.startswith("hf_") else "llama_big"]))
                for m, o in outputs.items()}
    res = dict(
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        model=args.model, gguf=gguf, threads=args.threads, n_prompts=len(prompts),
        prompt_tokens=[len(p) for p in prompts], new_tokens=args.new_tokens, repeats=args.repeats,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version(),
                     torch=torch.__version__, llama_cpp_python=__import__("llama_cpp").__version__,
                     loadavg_start=[round(x, 2) for x in load0],
                     loadavg_end=[round(x, 2) for x in os.getloadavg()]),
        methods={m: dict(tokens=t["tokens"], wall_s=round(t["wall"], 3), tokens_per_s=round(tps[m], 2),
                         prompts_identical_to_llama_generate=same[m],
                         prompts_identical_to_big=same_big[m]) for m, t in totals.items()},
        ratios=dict(llama_big_over_llama_generate=round(tps["llama_big"] / tps["llama_generate"], 3)),
    )
    for m in tps:
        if m.startswith("hf_") and m != "hf_big" and "hf_big" in tps:
            res["ratios"][f"{m}_over_hf_big"] = round(tps[m] / tps["hf_big"], 3)
        elif m not in ("llama_big", "llama_generate") and m.startswith("llama_"):
            res["ratios"][f"{m}_over_llama_big"] = round(tps[m] / tps["llama_big"], 3)
    if "hf_big" in tps:
        res["ratios"]["llama_big_over_hf_big"] = round(tps["llama_big"] / tps["hf_big"], 2)
    return res


def markdown(res: dict) -> str:
    lines = [
        "# llama.cpp backend: greedy `big` speed", "",
        f"`{res['command']}`", "",
        f"Model {res['model']} ({Path(res['gguf']).name}), {res['threads']} threads, {res['n_prompts']} prompts "
        f"({', '.join(map(str, res['prompt_tokens']))} tokens) x {res['new_tokens']} new tokens x "
        f"{res['repeats']} pass(es); wall time per generation includes the prompt pass. Machine: "
        f"{res['machine']['cpus']} CPUs, shared (load average {res['machine']['loadavg_start'][0]} at start, "
        f"{res['machine']['loadavg_end'][0]} at end): compare ratios within this run.", "",
        "| method | tokens | wall s | tokens/s | outputs identical to llama_generate | identical to its backend's big |",
        "|---|---|---|---|---|---|",
    ]
    for m, v in res["methods"].items():
        lines.append(f"| {m} | {v['tokens']} | {v['wall_s']} | {v['tokens_per_s']} | "
                     f"{v['prompts_identical_to_llama_generate']}/{res['n_prompts']} | "
                     f"{v['prompts_identical_to_big']}/{res['n_prompts']} |")
    lines += ["", "Ratios (targets: llama_big / llama_generate >= 0.85; llama_big / hf_big >= 4; a lossless gate "
              "ahead of big and of prompt lookup on its backend):", ""]
    lines += [f"- {k}: {v}" for k, v in res["ratios"].items()]
    if "hf_big" in res["methods"]:
        lines += ["", "hf_big runs the GGUF de-quantised to float32 weights in transformers, while llama.cpp "
                  "multiplies the quantised weights with 8-bit-quantised activations: a different numerical "
                  "model, so its greedy text may part from llama.cpp's after a few tokens (not a bug)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    res = bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
