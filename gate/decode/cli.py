"""`python infer.py`: generate text, skipping big-model passes where a policy allows; print the cost ledger."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

EPILOG = """\
policies:
  big      the big model only (baseline)
  small    the predictor only: --small M (a small LM), or --gate PATH with every proposal accepted
  ratio    seed 000: after --min-tokens big-model scaffold tokens, the small model takes every int(1/r)-th
  entropy  seed 001: the small model writes; the big model takes over where the small model's entropy
           (normalised by log|V|; --raw-entropy for nats) exceeds --tau
  cascade  --models M1 M2 ... MN (smallest first, the last is the big model), one --tau per smaller model
  gate     the learned gate: --gate PATH (from `train.py fit`), or --small M to use a small LM's
           max-probability as the gate score; skips while score >= --threshold

A small model is a model name with the big model's tokenizer, or self:K = the big model's first K layers +
final norm + output layer (an untrained early exit: weak, but always available).
--verify makes any policy lossless under greedy decoding: skipped tokens are checked at the next big-model
pass and the first wrong one is replaced (output token-identical to --policy big). --verify-below T checks
only skips whose score is below T (the dial between lossy and lossless).

examples:
  python infer.py "It is a truth universally acknowledged" -m 60
  python infer.py "It is a truth universally acknowledged" --policy gate --gate runs/demo/gate
  python infer.py "It is a truth universally acknowledged" --policy gate --gate runs/demo/gate --verify
  python infer.py "Call me Ishmael." --policy gate --gate runs/demo/gate --verify-below 0.99 --json out.json --check
  python infer.py "Call me Ishmael." --policy ratio --small self:8 -r 0.5 --min-tokens 10
  python infer.py "Call me Ishmael." --policy entropy --small self:20 --tau 0.3 --span line --adaptive
  python infer.py "Call me Ishmael." --policy cascade --models self:10 self:20 smollm2-135m --tau 0.2 0.3
  python infer.py "def fib(n):" --model qwen2.5-coder-1.5b --policy gate --small qwen2.5-coder-0.5b --verify
  python infer.py --demo --corpus runs/demo/corpus --gate runs/demo/gate

colors (on a terminal, unless --no-color): light blue = big-model scaffold (ratio), plain = big model,
red = small model / skipped by the gate, yellow = middle levels of a cascade.
"""

COLORS = {"scaffold": "\033[94m", "big": "", "small": "\033[91m", "skip": "\033[91m"}
MID_COLOR, RESET, DIM = "\033[93m", "\033[0m", "\033[2m"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="infer.py", description="Generate text with a big model, skipping its forward passes where a "
        "policy allows; prints the cost ledger.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="the prompt ('-' reads stdin)")
    ap.add_argument("--prompt-file", help="read the prompt from a file")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g = ap.add_argument_group("models")
    g.add_argument("--model", default="smollm2-135m", help="the big model (default: %(default)s)")
    g.add_argument("--small", help="small model: a name, or self:K (the big model's first K layers)")
    g.add_argument("--models", nargs="+", metavar="M", help="cascade: smallest first, the last is the big model")
    g.add_argument("--gate", metavar="PATH", help="trained gate artifact (train.py fit)")
    g.add_argument("--dtype", default="float32", help="model dtype (default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's choice; on a busy machine "
                   "--threads 1 avoids stalls: 2 threads on 2 busy cores ran 8x slower here)")
    g = ap.add_argument_group("policy")
    g.add_argument("--policy", default="big", choices=["big", "small", "ratio", "entropy", "cascade", "gate"])
    g.add_argument("-m", "--max-new-tokens", type=int, default=128)
    g.add_argument("-r", "--ratio", type=float, default=0.5, help="ratio: share of small-model tokens")
    g.add_argument("--min-tokens", type=int, default=10, help="ratio: big-model scaffold tokens first")
    g.add_argument("--tau", type=float, nargs="+", default=None,
                   help="entropy threshold (cascade: one per smaller model); default 0.3")
    g.add_argument("--raw-entropy", action="store_true", help="tau in nats instead of normalised by log|V|")
    g.add_argument("--span", default="1", help="entropy: the big model keeps N tokens once triggered, or 'line'")
    g.add_argument("--lookahead", type=int, default=1, help="entropy: decide on the mean over K small tokens")
    g.add_argument("--adaptive", action="store_true", help="entropy: adapt tau to runs of high/low entropy")
    g.add_argument("--pattern", help="entropy: regex; the big model speaks where the text so far ends with it")
    g.add_argument("--threshold", type=float, help="gate threshold (default: the gate's calibrated one; "
                   "0.8 for a small-LM gate)")
    g.add_argument("--max-skip", type=int, help="gate: at most this distance from the last big pass")
    g = ap.add_argument_group("verification and sampling")
    g.add_argument("--verify", action="store_true", help="check skipped tokens at catch-up (lossless greedy)")
    g.add_argument("--verify-below", type=float, metavar="T2",
                   help="verify only skips whose score is below T2 (implies --verify)")
    g.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write prompt, output ids/text, sources and ledger as JSON")
    g.add_argument("--check", action="store_true",
                   help="teacher-forced big-model pass: on-policy error and NLL of the output")
    g.add_argument("--no-color", action="store_true")
    g.add_argument("--quiet", action="store_true", help="do not stream the text")
    g = ap.add_argument_group("demo")
    g.add_argument("--demo", action="store_true",
                   help="generate from prompts of held-out corpus books with big, with the chosen policy "
                   "(default: gate, --gate runs/demo/gate) and with it + --verify; print the ledgers side by "
                   "side (--check is on)")
    g.add_argument("--corpus", default="runs/demo/corpus", help="demo: corpus folder (default: %(default)s)")
    g.add_argument("--n-prompts", type=int, default=2, help="demo: prompts (default: %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=48, help="demo: prompt length (default: %(default)s)")
    return ap


# -- models ------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    tokenizer: object
    big: object                      # HFBackend
    big_info: object                 # ModelInfo
    predictors: dict = field(default_factory=dict)   # name -> HFBackend
    eos_ids: tuple = ()


def open_models(big_name: str, small_names: list[str], dtype: str) -> Setup:
    """Load the big model and the predictors; refuse models whose tokenizers differ."""
    from corpus_tools.models import check_same_tokenizer, load
    from gate.decode.backend import HFBackend, early_exit_view

    big = load(big_name, dtype)
    fps = {big_name: big.info.fingerprint}
    setup = Setup(big.tokenizer, HFBackend(big.model, big_name), big.info, eos_ids=eos_ids_of(big))
    loaded = {big_name: big}
    for name in small_names:
        if name in setup.predictors:
            continue
        if name.startswith("self:"):
            try:
                setup.predictors[name] = HFBackend(early_exit_view(big.model, int(name[5:])), name)
            except ValueError as e:
                raise CliError(f"{name!r}: self:K needs a layer count K in 1..{big.info.n_layers} ({e})") from None
            continue
        lm = loaded.get(name) or load(name, dtype)
        loaded[name] = lm
        fps[name] = lm.info.fingerprint
        setup.predictors[name] = HFBackend(lm.model, name)
    check_same_tokenizer(fps)
    return setup


def eos_ids_of(lm) -> tuple:
    ids = set()
    gc = getattr(lm.model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids.update(e if isinstance(e, (list, tuple)) else ([e] if e is not None else []))
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return tuple(sorted(ids))


def load_gate(path: str, big_info):
    from gate.model.drafter import ArtifactError, load_drafter

    if not Path(path).exists():
        raise CliError(f"--gate {path}: no such folder (train a gate with `python train.py fit`)")
    try:
        return load_drafter(path, big_info)   # TokenizerMismatch passes through: main reports it
    except ArtifactError as e:
        raise CliError(str(e)) from e


def small_names(args) -> list[str]:
    if args.policy == "cascade":
        if not args.models or len(args.models) < 2:
            raise CliError("--policy cascade needs --models M1 ... MN (at least 2; the last is the big model)")
        return list(args.models[:-1])
    return [args.small] if args.small else []


def make_policy(args, setup: Setup):
    try:
        return _make_policy(args, setup)
    except ValueError as e:   # bad option values, reported by the policies themselves
        raise CliError(str(e)) from e


def _make_policy(args, setup: Setup):
    from gate.decode.drafters import SmallLMDrafter
    from gate.decode.policies import BigOnly, Cascade, Entropy, Gate, Ratio, SmallOnly

    p = args.policy
    small = setup.predictors.get(args.small) if args.small else None
    taus = args.tau or [0.3]
    if p == "big":
        return BigOnly()
    if p == "small":
        if args.gate:
            return Gate(load_gate(args.gate, setup.big_info), threshold=-math.inf, max_skip=args.max_skip,
                        name="small")
        if small is None:
            raise CliError("--policy small needs --small M or --gate PATH")
        return SmallOnly(small)
    if p == "ratio":
        if small is None and args.ratio > 0:
            raise CliError("--policy ratio needs --small M (or -r 0 for the big model only)")
        return Ratio(small, args.ratio, args.min_tokens)
    if p == "entropy":
        if small is None:
            raise CliError("--policy entropy needs --small M")
        span = "line" if args.span == "line" else _int(args.span, "--span")
        return Entropy(small, taus[0], normalize=not args.raw_entropy, span=span, lookahead=args.lookahead,
                       adaptive=args.adaptive, pattern=args.pattern, tokenizer=setup.tokenizer)
    if p == "cascade":
        levels = [setup.predictors[n] for n in args.models[:-1]]
        if len(taus) == 1:
            taus = taus * len(levels)
        return Cascade(levels, taus, normalize=not args.raw_entropy)
    if p == "gate":
        if args.gate:
            drafter = load_gate(args.gate, setup.big_info)
        elif small is not None:
            drafter = SmallLMDrafter(small, threshold=0.8)
        else:
            raise CliError("--policy gate needs --gate PATH (a trained gate) or --small M (a small LM as gate)")
        return Gate(drafter, threshold=args.threshold, max_skip=args.max_skip)
    raise CliError(f"unknown policy {p}")


def _int(s: str, flag: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise CliError(f"{flag} takes an integer or 'line', got {s!r}") from None


# -- streaming -----------------------------------------------------------------------------------------------
class Streamer:
    """Prints tokens as they become final, colored by source; holds back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, color: bool, out=None):
        self.tok, self.color, self.out = tokenizer, color, out or sys.stdout   # looked up now: it may be swapped
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, ids: list[int], sources: list[str]) -> None:
        for t, s in zip(ids, sources):
            self.ids.append(t)
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue                  # a multi-byte character continues in the next token
            piece, self.printed = text[len(self.printed):], text
            if self.color and piece:
                c = COLORS.get(s, MID_COLOR)
                piece = f"{c}{piece}{RESET}" if c else piece
            self.out.write(piece)
        self.out.flush()


# -- ledger --------------------------------------------------------------------------------------------------
ROWS = [  # (label, how to get it from a ledger)
    ("new tokens", lambda l: f"{l['new_tokens']} ({l['stopped']})"),
    ("by source", lambda l: " ".join(f"{k}={v}" for k, v in sorted(l["by_source"].items()))),
    ("big calls", lambda l: f"{l['big_calls']} ({l['big_calls_per_token']:.2f}/token)"),
    ("big tokens fed", lambda l: f"{l['big_tokens_fed']} (cropped {l['big_tokens_cropped']})"),
    ("predictor calls", lambda l: f"{l['predictor_calls']} (fed {l['predictor_tokens_fed']})"),
    ("skipped", lambda l: f"{l['skipped']} of {l['drafted']} drafted"),
    ("verified", lambda l: f"{l['verified']} ({l['rollbacks']} rollbacks, -{l['rolled_back_tokens']} tok)"),
    ("wall time", lambda l: f"{l['wall_s']:.2f} s"),
    ("tokens/s", lambda l: f"{l['tokens_per_s']:.1f}"),
    ("on-policy error", lambda l: (f"{100 * l['check']['on_policy_error']:.1f}% "
                                   f"({l['check']['mismatches']}/{l['check']['checked']}, "
                                   f"{l['check']['beyond_ties']} beyond ties)") if "check" in l else "-"),
    ("NLL (nats/token)", lambda l: f"{l['check']['nll']:.3f}" if "check" in l else "-"),
]


def policy_label(ledger: dict) -> str:
    if not ledger["verify"]:
        return ledger["policy"]
    vb = ledger.get("verify_below")
    return f"{ledger['policy']}+verify" + (f"<{vb:g}" if vb is not None else "")


def format_ledgers(columns: dict[str, dict]) -> str:
    """Ledgers side by side: one row per quantity, one column per run."""
    heads = list(columns)
    cells = [[label] + [fn(columns[h]) for h in heads] for label, fn in ROWS]
    table = [["ledger"] + heads] + cells
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------------------------
def run_one(setup: Setup, policy, prompt_ids: list[int], args, stream=None, verify=None) -> dict:
    from gate.decode.loop import Decoder, check_output

    verify = args.verify if verify is None else verify
    dec = Decoder(setup.big, policy, verify=verify, verify_below=args.verify_below if verify else math.inf,
                  temperature=args.temperature, seed=args.seed, eos_ids=setup.eos_ids, on_final=stream)
    res = dec.generate(prompt_ids, args.max_new_tokens)
    ledger = res.ledger
    ledger["models"] = {"big": setup.big_info.name, **ledger["models"]}
    if args.check:
        ledger["check"] = check_output(setup.big, prompt_ids, res.ids)
    tok = setup.tokenizer
    return dict(prompt=tok.decode(prompt_ids), prompt_ids=list(prompt_ids), output_ids=res.ids,
                text=tok.decode(res.ids, skip_special_tokens=True), sources=res.sources,
                config={k: (None if isinstance(v, float) and math.isinf(v) else v)
                        for k, v in vars(args).items() if k != "prompt"}, ledger=ledger)


def read_prompt(args) -> str:
    if args.prompt_file:
        return Path(args.prompt_file).read_text()
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt:
        return args.prompt
    raise CliError("give a prompt (or '-' for stdin, --prompt-file F, or --demo)")


def encode(setup: Setup, text: str, chat: bool) -> list[int]:
    tok = setup.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise CliError("--chat: this tokenizer has no chat template")
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    ids = tok(text).input_ids
    if not ids:
        raise CliError("the prompt is empty after tokenization")
    return list(ids)


def held_out_prompts(corpus: str, tokenizer, n: int, n_tokens: int, split: str = "test") -> list[list[int]]:
    """n prompts of n_tokens tokens: the openings of long paragraphs spread over the held-out books."""
    from corpus_tools.selfgen import split_prompts

    if not Path(corpus, "manifest.jsonl").exists():
        raise CliError(f"{corpus}: not a corpus folder (no manifest.jsonl; build it with train.py corpus)")
    try:
        return split_prompts(corpus, tokenizer, n, n_tokens, split)
    except ValueError as e:
        raise CliError(str(e)) from None


def run_demo(args, setup: Setup) -> int:
    """Prompts from held-out books, each generated with big, the policy, and the policy with --verify."""
    from gate.decode.policies import BigOnly

    prompts = held_out_prompts(args.corpus, setup.tokenizer, args.n_prompts, args.prompt_tokens)
    color = sys.stdout.isatty() and not args.no_color
    policy = make_policy(args, setup)
    runs, totals = [], {}
    for i, ids in enumerate(prompts, 1):
        print(f"\n=== prompt {i}: {len(ids)} tokens from a held-out book ===")
        print((DIM + setup.tokenizer.decode(ids) + RESET) if color else setup.tokenizer.decode(ids))
        cols = {}
        for pol, verify in ((BigOnly(), False), (policy, False), (policy, True)):
            r = run_one(setup, pol, ids, args, verify=verify)
            label = policy_label(r["ledger"])
            print(f"\n--- {label} ---")
            Streamer(setup.tokenizer, color)(r["output_ids"], r["sources"])
            print()
            cols[label] = r["ledger"]
            totals.setdefault(label, []).append(r["ledger"])
            runs.append(r)
        print()
        print(format_ledgers(cols))
    if len(prompts) > 1:
        print(f"\n=== all {len(prompts)} prompts ===")
        print(format_ledgers({k: sum_ledgers(v) for k, v in totals.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(runs=runs), indent=1))
    return 0


def sum_ledgers(ls: list[dict]) -> dict:
    """Totals over runs, in the shape format_ledgers reads."""
    out = dict(ls[0])
    for k in ("new_tokens", "big_emitted", "skipped", "big_calls", "big_tokens_fed", "big_tokens_cropped",
              "predictor_calls", "predictor_tokens_fed", "drafted", "verified", "rollbacks",
              "rolled_back_tokens", "wall_s"):
        out[k] = sum(x[k] for x in ls)
    out["by_source"] = {}
    for x in ls:
        for s, n in x["by_source"].items():
            out["by_source"][s] = out["by_source"].get(s, 0) + n
    n = out["new_tokens"]
    out["big_calls_per_token"] = out["big_calls"] / n if n else 0.0
    out["tokens_per_s"] = n / out["wall_s"] if out["wall_s"] else 0.0
    out["stopped"] = f"{len(ls)} runs"
    if all("check" in x for x in ls):
        mism, checked = sum(x["check"]["mismatches"] for x in ls), sum(x["check"]["checked"] for x in ls)
        out["check"] = dict(on_policy_error=mism / checked if checked else 0.0, mismatches=mism,
                            checked=checked, beyond_ties=sum(x["check"]["beyond_ties"] for x in ls),
                            nll=sum(x["check"]["nll"] * x["check"]["checked"] for x in ls) / max(checked, 1))
    return out


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from corpus_tools.models import ModelSourceError, TokenizerMismatch

    args = build_parser().parse_args(argv)
    if args.verify_below is not None:
        args.verify = True
    args.verify_below = math.inf if args.verify_below is None else args.verify_below
    if args.demo:
        args.check = True
        args.policy = "gate" if args.policy == "big" else args.policy
        if args.policy == "gate" and not args.gate and not args.small:
            args.gate = "runs/demo/gate"
    try:
        import torch
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        torch.manual_seed(args.seed)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.temperature < 0:
            raise CliError("--temperature must be >= 0")
        if args.max_new_tokens < 1:
            raise CliError("-m must be >= 1")
        big_name = args.models[-1] if args.policy == "cascade" and args.models else args.model
        names = small_names(args)
        text = None if args.demo else read_prompt(args)
        setup = open_models(big_name, names, args.dtype)
        if args.demo:
            return run_demo(args, setup)
        policy = make_policy(args, setup)
        prompt_ids = encode(setup, text, args.chat)
        color = sys.stdout.isatty() and not args.no_color
        stream = None if args.quiet else Streamer(setup.tokenizer, color)
        if stream:
            sys.stdout.write(text if not args.chat else "")
            sys.stdout.flush()
        r = run_one(setup, policy, prompt_ids, args, stream=stream)
        if stream:
            print()
        print(format_ledgers({policy_label(r["ledger"]): r["ledger"]}), file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
        return 0
    except (CliError, TokenizerMismatch, ModelSourceError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
