#!/usr/bin/env python
"""Offline throughput: many prompts decoded side by side in one llama.cpp context against one at a time.

    python bench/parallel.py --corpus runs/genres/*/corpus [--model smollm2-135m] [--n-prompts 64]
                             [--new-tokens 128] [--parallel auto 4 8 16 32] [--policies big copy] [--force]

Methods, each over all prompts (the same prompt ids), in rotating order over --rounds rounds:
  binding_generate   llama-cpp-python's own greedy generate, one prompt at a time (the yardstick)
  one_big            the project's decoder, one prompt at a time, big model only (infer.py --parallel 1)
  par{N}_{policy}    N prompts side by side (infer.py --parallel N), policy big, or copy with --verify
Throughput = total new tokens / wall time; every output is compared with one_big; memory per method (peak RSS,
and what it adds over the loaded model: KV caches, buffers).
Refused when the load average is above 0.5 before the run. Writes --out .json and .md. Notes: docs/bench.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from bench.quiet import Quiet, load  # noqa: E402
from bench.speed import binding_runner  # noqa: E402
from common.cpu import OtherCPU  # noqa: E402
from common.errors import ProjectError, fail  # noqa: E402
from common.files import write_result  # noqa: E402
from gate.decode.cost import batch_curve  # noqa: E402
from gate.decode.loop import Decoder  # noqa: E402
from gate.decode.parallel import choose_parallel, run_parallel, slot_context  # noqa: E402
from gate.decode.policies import BigOnly  # noqa: E402
from gate.decode.registry import registered  # noqa: E402
from gate.decode.session import held_out_prompts, run_one  # noqa: E402
from runtimes.llamacpp import import_binding  # noqa: E402
from runtimes.open import open_models  # noqa: E402


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", nargs="+", required=True, help="corpus folders whose held-out books give prompts")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--parallel", nargs="+", default=["auto", "4", "8", "16", "32"])
    ap.add_argument("--policies", nargs="+", default=["big", "copy"], choices=("big", "copy"))
    ap.add_argument("--rounds", type=int, default=1, help="rounds over the methods (order rotated)")
    ap.add_argument("--commands", nargs="*", default=["auto", "1"], metavar="N",
                    help="also time whole `infer.py --input --parallel N` commands (process start, model load and "
                    "auto's measuring included; 'auto' runs twice: with an empty curve cache, then cached), each "
                    "compared with the --parallel 1 command's output (default: auto 1; none: --commands)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="default: one per core")
    ap.add_argument("--force", action="store_true", help="run even on a busy machine (marked in the result)")
    ap.add_argument("--out", default="bench/results/parallel")
    return ap.parse_args(argv)


def rss_mb() -> float:
    """Resident set of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """The highest resident set seen while the block runs (sampled every 20 ms), minus the one at its start: the
    memory a method adds on top of the loaded model (its KV caches and buffers), MB."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.added_mb = round(max(self.peak, rss_mb()) - self.start, 1)


def decode_args(args, policy: str) -> argparse.Namespace:
    """The options infer.py would have for `policy` (copy: --verify with the cost planner)."""
    verify = policy != "big"
    return argparse.Namespace(model=args.model, policy=policy, verify=verify, verify_below=float("inf"),
                              planned=verify, plan="cost", temperature=0.0, seed=0, max_new_tokens=args.new_tokens,
                              check=False, min_match=None, max_skip=None, gate=None, small=None)


def command_runs(args, prompts, tmp: Path) -> dict:
    """{name: (tokens/s, wall s, output ids per prompt)} of whole infer.py commands over the prompts as a JSONL
    file. cmd_auto_first runs with an empty cost-curve cache (what a user's first run pays for measuring)."""
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(dict(id=i, prompt_ids=p)) + "\n" for i, p in enumerate(prompts)))
    cache = tmp / "cache"
    real = Path(os.environ.get("SKIPGATE_CACHE", Path.home() / ".cache" / "skipgate"))
    cache.mkdir()
    for sub in ("models", "tokenizers", "exact_pass"):      # what a user has after make demo, curves left out
        if (real / sub).exists():
            (cache / sub).symlink_to(real / sub)
    runs = {}
    plan = [("cmd_auto_first", "auto")] * ("auto" in args.commands) + [(f"cmd_{n}", n) for n in args.commands]
    for name, n in plan:
        out = tmp / f"{name}.jsonl"
        cmd = [sys.executable, "infer.py", "--input", str(src), "--output", str(out), "--parallel", n,
               "-m", str(args.new_tokens), "--threads", str(args.threads), "--quiet"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, SKIPGATE_CACHE=str(cache)), capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        rows = {r["id"]: r["output_ids"] for r in map(json.loads, out.read_text().splitlines())}
        ids = [rows[i] for i in range(len(prompts))]
        runs[name] = (round(sum(map(len, ids)) / wall, 2), round(wall, 2), ids,
                      [line for line in done.stderr.splitlines() if "parallel" in line or "measured" in line])
        print(f"{name}: {runs[name][0]} tok/s, {wall:.1f} s", file=sys.stderr)
    return runs


def one_at_a_time(rt, prompts, n):
    dec = Decoder(rt.big, BigOnly(), eos_ids=rt.eos_ids)
    return [dec.generate(ids, n).ids for ids in prompts]


def binding(rt, prompts, n):
    """The binding's own greedy generate, one prompt at a time (bench/speed.py's runner)."""
    llm = import_binding().Llama(str(rt.big.path), n_ctx=rt.big.n_ctx, n_threads=rt.big.n_threads,
                                 n_threads_batch=rt.big.n_threads, verbose=False)
    run = binding_runner(llm, 0.0, 0, rt.eos_ids)
    outs = [run(ids, n, i)[0] for i, ids in enumerate(prompts)]
    del llm
    return outs


def side_by_side(rt, prompts, n_slots: int, args, policy: str):
    dargs = decode_args(args, policy)
    rows = {}
    info = run_parallel(rt, list(range(len(prompts))), n_slots, slot_context([len(p) + args.new_tokens
                                                                             for p in prompts], rt),
                        dargs, registered(), lambda srt, pol, i: run_one(srt, pol, prompts[i], dargs),
                        lambda i, row: rows.__setitem__(i, row), log=lambda m: print(m, file=sys.stderr))
    calls = sum(r["ledger"]["big_calls"] for r in rows.values())
    return [rows[i]["output_ids"] for i in range(len(prompts))], dict(info, big_calls=calls)


def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    quiet = Quiet.check(args.force, "bench/parallel.py")
    rt = open_models(args.model, [], "float32", "llama.cpp")
    rt.big.set_threads(args.threads)
    per = [args.n_prompts // len(args.corpus) + (i < args.n_prompts % len(args.corpus)) for i in range(len(args.corpus))]
    prompts = [p for c, k in zip(args.corpus, per) if k for p in held_out_prompts(c, rt.tokenizer, k, args.prompt_tokens,
                                                                                    args.split)]
    curve, step_ms, _ = batch_curve(rt.big, len(prompts), refresh=True, log=lambda m: print(m, file=sys.stderr))
    exact = rt.big.exact_pass        # infer.py decodes one prompt at a time when passes are not exact
    auto = choose_parallel(curve, len(prompts)) if exact is None else 1
    methods = {"binding_generate": lambda: (binding(rt, prompts, args.new_tokens), {}),
               "one_big": lambda: (one_at_a_time(rt, prompts, args.new_tokens), {})}
    for p in args.parallel:
        if p == "auto" and auto == 1:     # that is one_big
            continue
        n = auto if p == "auto" else int(p)
        for pol in args.policies:
            name = f"par{n}_{pol}" + ("_auto" if p == "auto" else "")
            methods[name] = (lambda n=n, pol=pol: side_by_side(rt, prompts, n, args, pol))
    res = {m: dict(tokens=0, wall_s=0.0) for m in methods}
    outs = {}
    names = list(methods)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for m in order:
            before = load()
            with PeakRSS() as mem, OtherCPU() as other:
                t0 = time.perf_counter()
                out, info = methods[m]()
                wall = time.perf_counter() - t0
            quiet.mark(m, before, load(), other.cores)
            res[m]["tokens"] += sum(map(len, out))
            res[m]["wall_s"] += wall
            res[m].update(info, added_mb=max(mem.added_mb, res[m].get("added_mb", 0.0)), rss_mb=round(mem.peak, 1))
            outs[m] = out
            print(f"{m}: {sum(map(len, out)) / wall:.1f} tok/s", file=sys.stderr)
    base = res["one_big"]["tokens"] / res["one_big"]["wall_s"]
    yard = res["binding_generate"]["tokens"] / res["binding_generate"]["wall_s"]
    for m, d in res.items():
        d["tokens_per_s"] = round(d["tokens"] / d["wall_s"], 2)
        d["x_one_big"] = round(d["tokens_per_s"] / base, 3)
        d["x_binding"] = round(d["tokens_per_s"] / yard, 3)
        d["identical_to_one_big"] = sum(a == b for a, b in zip(outs[m], outs["one_big"]))
    commands = {}
    if args.commands:
        with tempfile.TemporaryDirectory() as tmp:
            runs = command_runs(args, prompts, Path(tmp))
        ref = runs.get("cmd_1", next(iter(runs.values())))
        for name, (tps, wall, ids, said) in runs.items():
            commands[name] = dict(tokens_per_s=tps, wall_s=wall, x_cmd_1=round(tps / ref[0], 3),
                                  identical_to_cmd_1=sum(a == b for a, b in zip(ids, ref[2])), said=said)
    return dict(command="python " + " ".join(map(shlex.quote, sys.argv)), model=args.model, gguf=str(rt.big.path),
                threads=args.threads, prompts=len(prompts), new_tokens=args.new_tokens, step_ms=step_ms,
                batch_curve=curve, auto_parallel=auto, exact_pass=exact, methods=res, commands=commands,
                load=quiet.to_dict(), note=quiet.note())


def markdown(r: dict) -> str:
    lines = [f"# Offline throughput: {r['model']} on llama.cpp, {r['prompts']} prompts x {r['new_tokens']} new tokens",
             "", f"`{r['command']}`", "", r["note"] + f"; {r['threads']} threads; one-token step {r['step_ms']} ms.", "",
             "Pass over n sequences (one token each), cost in one-token steps and gain n / cost: " +
             ", ".join(f"{n}: {c:.2f} ({n / c:.1f}x)" for n, c in sorted(r["batch_curve"].items(), key=lambda kv: int(kv[0]))) +
             f". `--parallel auto` picks {r['auto_parallel']}" + ("." if r.get("exact_pass") is None else
             f": passes of more than {r['exact_pass']} tokens are not bit-exact on this file (one-token steps "
             "differ), so auto decodes one prompt at a time; the N below are explicit."), "",
             "| method | tokens/s | x one at a time | x binding generate | identical to one_big | big calls | "
             "peak RSS MB | MB added by the method |", "|---|---|---|---|---|---|---|---|"]
    for m, d in r["methods"].items():
        lines.append(f"| {m} | {d['tokens_per_s']} | {d['x_one_big']} | {d['x_binding']} | "
                     f"{d['identical_to_one_big']}/{r['prompts']} | {d.get('big_calls', '-')} | {d['rss_mb']} | "
                     f"{d['added_mb']} |")
    if r.get("commands"):
        lines += ["", "Whole commands (`infer.py --input --output --parallel N`, process start, model load and "
                  "measuring included; cmd_auto_first with no cost curve cached):", "",
                  "| command | tokens/s | wall s | x --parallel 1 | identical | what it said |", "|---|---|---|---|---|---|"]
        for m, d in r["commands"].items():
            lines.append(f"| {m} | {d['tokens_per_s']} | {d['wall_s']} | {d['x_cmd_1']} | "
                         f"{d['identical_to_cmd_1']}/{r['prompts']} | {'; '.join(d['said'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    try:
        res = bench(args)
    except ProjectError as e:
        return fail("bench/parallel.py", e)
    out = Path(args.out)
    write_result(out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
