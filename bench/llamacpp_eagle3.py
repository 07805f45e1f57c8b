#!/usr/bin/env python
"""The exported feature head in llama.cpp's own speculative decoding, against llama.cpp without it and with its own
n-gram drafters, on held-out prompts and a quiet machine.

    python bench/llamacpp_eagle3.py --gate runs/eagle3/gate --corpus runs/genres/*/corpus
    python bench/llamacpp_eagle3.py --export runs/eagle3/export --corpus ... [--model smollm2-135m]
        [--n-prompts 8] [--prompt-tokens 64] [--new-tokens 128] [--threads 2] [--draft-max 3]
        [--ngram ngram-simple,ngram-map-k,ngram-map-k4v,ngram-mod,ngram-cache] [--force]

Every method is a llama.cpp program on the same GGUF, threads and prompt text (the held-out prompts' ids decoded;
llama.cpp tokenizes them again), greedy (--temp 0), in an order rotating per prompt: `plain` is llama-completion
(llama-simple where it is not built), `eagle3_kK` llama-speculative-simple --spec-type draft-eagle3 -md
OUT/draft.gguf --spec-draft-n-max K, `ngram-*` the same program with llama.cpp's own n-gram drafters (no draft
model). Reported per method: decode tokens/s as each program prints it (the prompt pass excluded), x plain, drafted
and accepted tokens and llama.cpp's acceptance (accepted / drafted), tokens per target pass (generated / passes,
a pass = one verify of [last token + drafts]), llama.cpp's own statistics line, and whether each output is plain's
(the speculative program may end a draft past -n: over the common length the shorter text must be a prefix of the
other's). Refused when other processes keep the cores busy (bench/quiet.py; --force: the files then say
"measured under load"). Needs `make llama-tools`. Writes --out .json and .md with the command and the load.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.quiet import Quiet, load  # noqa: E402
from common.cpu import OtherCPU  # noqa: E402
from common.errors import ProjectError, UsageError, fail  # noqa: E402
from common.files import write_result  # noqa: E402
from gate.decode.cost import cpu_name  # noqa: E402
from gate.decode.session import held_out_prompts  # noqa: E402
from gate.train.export import export_eagle3  # noqa: E402
from runtimes.llama_tools import (  # noqa: E402
    LLAMA_CPP_PYTHON,
    REQUIRED_TOOLS,
    STAMP,
    find_tool,
    plain_greedy,
    require_tool,
    speculative_simple,
)
from runtimes.loading import load_tokenizer  # noqa: E402
from runtimes.sources import gguf_path  # noqa: E402

NGRAMS = "ngram-simple,ngram-map-k,ngram-map-k4v,ngram-mod,ngram-cache"   # this llama.cpp's n-gram drafters


def parse(argv):
    ap = argparse.ArgumentParser(prog="bench/llamacpp_eagle3.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gate", help="a feature head (train.py fit --drafter eagle): exported into a temporary folder")
    src.add_argument("--export", help="a folder written by train.py export (with draft.gguf)")
    ap.add_argument("--model", default=None, help="the target: packaged alias or .gguf (default: the head's own)")
    ap.add_argument("--corpus", nargs="+", required=True, help="corpus folders whose held-out books give prompts")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="default: one per core")
    ap.add_argument("--draft-max", default="3", help="comma-separated --spec-draft-n-max values for the head")
    ap.add_argument("--ngram", default=NGRAMS, help="llama.cpp's n-gram drafters to run ('' for none)")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--force", action="store_true", help="run even on a busy machine (marked in the result)")
    ap.add_argument("--out", default="bench/results/llamacpp_eagle3")
    return ap.parse_args(argv)


def target_of(args, export_dir: Path) -> str:
    if args.model:
        return args.model
    cfg = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    name = (cfg.get("skipgate") or {}).get("target")
    if not name:
        raise UsageError(f"{export_dir}/config.json does not name its target; pass --model")
    return name


def methods_of(args, draft: Path) -> dict:
    """name -> keyword arguments of speculative_simple (None: the plain decode)."""
    out = {"plain": None}
    for k in (int(x) for x in args.draft_max.split(",") if x):
        out[f"eagle3_k{k}"] = dict(spec_type="draft-eagle3", draft=draft, draft_max=k)
    for t in (x.strip() for x in args.ngram.split(",") if x.strip()):
        out[t] = dict(spec_type=t, draft_max=None)        # llama.cpp's own settings for its n-gram drafters
    return out


def bench(args, export_dir: Path) -> dict:
    for tool in REQUIRED_TOOLS:
        require_tool(tool)
    draft = export_dir / "draft.gguf"
    if not draft.is_file():
        raise UsageError(f"{draft}: missing (train.py export without --no-gguf writes it)")
    model = target_of(args, export_dir)
    gguf = gguf_path(model)
    tok = load_tokenizer(model)
    prompts = []
    per = [args.n_prompts // len(args.corpus) + (i < args.n_prompts % len(args.corpus)) for i in range(len(args.corpus))]
    for corpus, n in zip(args.corpus, per):
        if n:
            prompts += [tok.decode(ids) for ids in held_out_prompts(corpus, tok, n, args.prompt_tokens, args.split)]
    methods = methods_of(args, draft)
    quiet = Quiet.check(args.force, "bench/llamacpp_eagle3.py")

    def run(name, prompt, n):
        kw = methods[name]
        if kw is None:
            return plain_greedy(gguf, prompt, n, threads=args.threads, ctx=args.ctx)
        return speculative_simple(gguf, prompt, n, threads=args.threads, ctx=args.ctx, **kw)

    names = list(methods)
    for m in names:                        # warm-up: page cache, first-call allocations
        run(m, prompts[0], 8)
    rows = {m: [] for m in names}
    for i, prompt in enumerate(prompts):
        k = i % len(names)
        for m in names[k:] + names[:k]:
            before = load()
            with OtherCPU() as other:
                r = run(m, prompt, args.new_tokens)
            quiet.mark(m, before, load(), other.cores)
            rows[m].append(r)
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
    return summarise(args, rows, prompts, quiet, model, gguf, draft)


def same_tokens(a: str, b: str) -> bool:
    """The two outputs agree over their common length (a speculative run may end a draft past -n)."""
    return a.startswith(b) or b.startswith(a)


def summarise(args, rows, prompts, quiet, model, gguf, draft) -> dict:
    plain = rows["plain"]
    methods = {}
    for m, rs in rows.items():
        tokens = sum(r["n_predict"] or 0 for r in rs)
        timed = sum(r["decode_tokens"] or 0 for r in rs)
        secs = sum(r["decode_s"] or 0.0 for r in rs)
        d = dict(tokens=tokens, decode_s=round(secs, 3), decode_tokens_per_s=round(timed / secs, 2) if secs else None,
                 program=rs[0].get("program", "llama-speculative-simple"), load_before_after=quiet.marks.get(m))
        if m != "plain":
            drafted, accepted = sum(r["n_drafted"] or 0 for r in rs), sum(r["n_accept"] or 0 for r in rs)
            passes = sum(r.get("target_passes") or 0 for r in rs)
            d.update(drafted=drafted, accepted=accepted, acceptance=round(accepted / drafted, 4) if drafted else None,
                     tokens_per_pass=round(tokens / passes, 3) if passes else None,
                     identical_to_plain=sum(same_tokens(r["text"], p["text"]) for r, p in zip(rs, plain)),
                     llama_cpp_stats=[r["stats"] for r in rs])
        methods[m] = d
    base = methods["plain"]["decode_tokens_per_s"]
    for d in methods.values():
        d["over_plain"] = round(d["decode_tokens_per_s"] / base, 3) if base and d["decode_tokens_per_s"] else None
    stamp = find_tool(REQUIRED_TOOLS[0]).parent / STAMP
    return dict(command="python " + " ".join(shlex.quote(a) for a in sys.argv), model=model, gguf=str(gguf),
                draft=str(draft), threads=args.threads, corpus=args.corpus, n_prompts=len(prompts),
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, load=quiet.to_dict(),
                load_note=quiet.note(), cpu=cpu_name(), llama_cpp_python=LLAMA_CPP_PYTHON,
                tools={t: str(find_tool(t)) for t in REQUIRED_TOOLS + ("llama-completion",) if find_tool(t)},
                build=stamp.read_text() if stamp.is_file() else None, methods=methods,
                commands={m: rs[0]["command"] for m, rs in rows.items()}, prompts=prompts,
                outputs={m: [r["text"] for r in rs] for m, rs in rows.items()})


def markdown(res: dict) -> str:
    lines = [f"# llama.cpp speculative decoding with the exported feature head: {res['model']}, {res['threads']} "
             "threads, greedy", "", f"`{res['command']}`", "",
             f"{res['n_prompts']} held-out prompts ({', '.join(Path(c).parent.name for c in res['corpus'])}) x "
             f"{res['new_tokens']} new tokens; decode tokens/s as each program prints them (prompt pass excluded). "
             f"{res['load_note']}; CPU {res['cpu']}, llama.cpp of llama-cpp-python {res['llama_cpp_python']}.", "",
             "| method | program | tokens/s | x plain | drafted | accepted | acceptance | tokens per pass | "
             "identical to plain | load before/after, others' cores |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else x

    for m, d in res["methods"].items():
        ident = "-" if "identical_to_plain" not in d else f"{d['identical_to_plain']}/{res['n_prompts']}"
        lines.append(f"| {m} | {d['program']} | {f(d['decode_tokens_per_s'])} | {f(d['over_plain'])} | "
                     f"{f(d.get('drafted'))} | {f(d.get('accepted'))} | {f(d.get('acceptance'))} | "
                     f"{f(d.get('tokens_per_pass'))} | {ident} | {f(d['load_before_after'])} |")
    lines += ["", "Commands (PROMPT: each prompt's text): " + "; ".join(
        f"{m}: `{' '.join(shlex.quote(a) if a != p else 'PROMPT' for a in c)}`"
        for m, (c, p) in ((m, (c, res["prompts"][0])) for m, c in res["commands"].items()))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    try:
        if args.export:
            res = bench(args, Path(args.export))
        else:
            with tempfile.TemporaryDirectory(prefix="eagle3-export-") as tmp:
                out = export_eagle3(args.gate, Path(tmp) / "export", target=args.model,
                                    log=lambda m: print(m, file=sys.stderr))
                res = bench(args, Path(out))
                res["exported_from"] = args.gate
    except ProjectError as e:
        return fail("bench/llamacpp_eagle3.py", e)
    write_result(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
