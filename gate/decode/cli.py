"""`python infer.py`: generate text, skipping big-model passes where a policy allows; print the cost ledger.

The CLI knows no policy by name: its --policy choices, the policy options and the 'policies:' part of --help
come from the registry (gate/decode/registry.py); opening models, building the policy and running one prompt
are gate/decode/session.py's; the ledger table is gate/decode/ledger.py's. What is left here is the parser,
prompt handling, streaming and the demo; --input/--output hands over to gate/decode/batch.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from common.errors import BROKEN_PIPE, INTERRUPTED, ProjectError, UsageError, fail
from common.files import check_output_file, json_text, write_json
from gate.decode.batch import carries_audit, check_batch_output, run_batch
from gate.decode.contract import number
from gate.decode.ledger import Ledger, format_ledgers, policy_label, sum_ledgers
from gate.decode.policies import BigOnly, check_audit_target
from gate.decode.registry import add_policy_args, policies_help, policy_examples, registered, unread_options
from gate.decode.session import (
    add_runtime_args,
    configure_torch,
    encode,
    held_out_prompts,
    make_policy,
    open_runtime,
    option_problem,
    planner_for,
    run_one,
    user_text,
)
from runtimes.llamacpp import import_binding
from runtimes.open import Runtime

NOTES = """\
A small model is a model name with the big model's tokenizer, or self:K = the big model's first K layers +
final norm + output layer (an untrained early exit: weak, but always available).
--verify makes any policy lossless under greedy decoding: skipped tokens are checked at the next big-model
pass and the first wrong one is replaced (output token-identical to --policy big). --verify-below T checks
only skips whose score is below T (the dial between lossy and lossless). A lossy greedy gate decode is audited
(--no-audit: not): the catch-up pass compares each unchecked skip with the big model's own token, the ledger counts
the mismatches, and the threshold rises while their error bound exceeds the target (docs/decode.md).
A prompt (argument, stdin, --prompt-file, a batch line) is literal text: "<|endoftext|>" typed in it stays
text unless --parse-special. Prompt + new tokens must fit the model's context length (refused otherwise:
past it a model gives garbage, not an error)."""

COLORS_HELP = """\
colors (on a terminal, unless --no-color): light blue = big-model scaffold (ratio), plain = big model,
red = small model / skipped by the gate, yellow = middle levels of a cascade."""

BATCH_HELP = """\
--input F --output R decodes every prompt of F with one model load: a line is {"prompt": "text"} or
{"prompt_ids": [ids]}, optionally with "id" (default: the line number), "max_new_tokens", "temperature",
"seed". Each result (id, line, prompt_ids, output_ids, text, sources, ledger) is appended to R as it
finishes; a re-run skips the ids already there (resume after a kill), and refuses rows made from another
line or by another model, tokenizer, policy or setting (--rerun-mismatched runs those lines again). A bad
line, or one whose decoding fails, is reported as F:LINE on stderr and written as an error row {id, line,
error} (tried again on a re-run) while the rest goes on; exit status 2 if some line was bad, else 0. A second
run into the same R (under any name of it) is refused. Ctrl-C stops after saving every finished row (exit status
130; the same command resumes). --input - reads stdin; --output - streams to stdout."""

COLORS = {"scaffold": "\033[94m", "big": "", "small": "\033[91m", "skip": "\033[91m"}
MID_COLOR, RESET, DIM = "\033[93m", "\033[0m", "\033[2m"


def epilog(policies) -> str:
    examples = policy_examples(policies) + [
        "  python infer.py --demo --corpus runs/demo/corpus --gate runs/demo/gate",
        "  python infer.py --prompt-file story.txt -m 64 --json out.json",
        "  python infer.py --chat \"Write a haiku about tea\" --policy copy --verify",
        "  python infer.py --input prompts.jsonl --output results.jsonl --policy gate --gate runs/demo/gate --verify",
        "      (prompts.jsonl: {\"prompt\": \"Once upon a time\"} / {\"id\": \"b\", \"prompt_ids\": [504, 3458], "
        "\"max_new_tokens\": 32})"]
    return "\n\n".join([policies_help(policies), NOTES, "examples:\n" + "\n".join(examples), COLORS_HELP])


def build_parser(policies=None) -> argparse.ArgumentParser:
    """The infer.py parser for `policies` (default: every registered policy)."""
    policies = registered() if policies is None else policies
    ap = argparse.ArgumentParser(
        prog="infer.py", description="Generate text with a big model, skipping its forward passes where a "
        "policy allows; prints the cost ledger.", epilog=epilog(policies),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="the prompt ('-' reads stdin)")
    ap.add_argument("--prompt-file", help="read the prompt from a file")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (the "
                    "prompt stays literal text inside it: a typed '<|im_start|>' cannot open a turn)")
    ap.add_argument("--parse-special", action="store_true",
                    help="parse special-token strings typed in the prompt ('<|endoftext|>', '<|im_start|>') as "
                    "control tokens; by default a prompt is literal text")
    g = ap.add_argument_group("models")
    add_runtime_args(g)
    g.add_argument("--shared-cpu", action="store_true", help="a machine busy with other jobs: OpenMP threads "
                   "sleep while they wait (OMP_WAIT_POLICY=PASSIVE, read by infer.py before torch loads; about 3x "
                   "slower on an idle machine, much faster than spinning on a loaded one)")
    g = ap.add_argument_group("policy", "each option lists the policies that read it in [brackets]")
    g.add_argument("--policy", default="big", choices=list(policies))
    g.add_argument("-m", "--max-new-tokens", type=int, default=128)
    add_policy_args(g, policies)
    g = ap.add_argument_group("verification and sampling")
    g.add_argument("--verify", action="store_true", help="check skipped tokens at catch-up (lossless greedy)")
    g.add_argument("--verify-below", type=float, metavar="T2",
                   help="verify only skips whose score is below T2 (implies --verify)")
    g.add_argument("--plan", choices=("cost", "fixed"),
                   help="with a lossless --verify (refused without one): 'cost' (default) sizes each draft chain by "
                   "the measured cost of a verify pass and the learned chance of acceptance, down to no draft where "
                   "none pays (the cost curve is measured once per model file, runtime, threads and CPU and cached); "
                   "'fixed' drafts while the policy's --threshold / --max-skip allow")
    g.add_argument("-t", "--temperature", type=float, default=0.0,
                   help="0 = greedy (default); a temperature above 0 but below 1e-4 is refused (write 0): there "
                   "sampling is greedy in all but name, and logits / T overflow float32 further down")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, in [0, 2**63) (default: %(default)s)")
    g = ap.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write prompt, output ids/text, sources and ledger as JSON ('-': "
                   "to stdout, in place of the streamed text)")
    g.add_argument("--check", action="store_true",
                   help="teacher-forced big-model pass: on-policy error and NLL of the output")
    g.add_argument("--no-color", action="store_true")
    g.add_argument("--quiet", action="store_true", help="do not stream the text")
    g = ap.add_argument_group("batch", BATCH_HELP)
    g.add_argument("--input", metavar="PROMPTS.jsonl", help="prompts, one JSON object a line (see above)")
    g.add_argument("--output", metavar="RESULTS.jsonl", help="results, one JSON object a line; an existing file "
                   "is resumed (its prompts are skipped); '-': stream to stdout")
    g.add_argument("--parallel", metavar="N", help="decode up to N prompts side by side in one "
                   "llama.cpp context (outputs as one at a time on models whose batched passes are bit-exact, e.g. "
                   "SmolLM2 Q4_1; K-quants can part at near-ties); default auto: the N the measured cost of a pass "
                   "over n sequences favours, or 1 where passes are not bit-exact and the output is meant to be "
                   "the big model's greedy (big, lossless --verify) (docs/batch.md); 1: one prompt at a time")
    g.add_argument("--rerun-mismatched", action="store_true", help="resuming: run again the lines whose row in "
                   "--output was made from another line or with another model, tokenizer, policy or setting "
                   "(default: refuse)")
    g = ap.add_argument_group("demo")
    g.add_argument("--demo", action="store_true",
                   help="generate from prompts of held-out corpus books with big, the copy rule + --verify, the "
                   "chosen policy (default: gate, --gate runs/demo/gate) and it + --verify; print the ledgers side "
                   "by side, speeds as x big (--check is on)")
    g.add_argument("--corpus", default="runs/demo/corpus", help="demo: corpus folder (default: %(default)s)")
    g.add_argument("--n-prompts", type=int, default=2, help="demo: prompts (default: %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=48, help="demo: prompt length (default: %(default)s)")
    return ap


# -- options -> runtime and policy ----------------------------------------------------------------------------
def settle_args(args) -> None:
    """Check the options that are not a policy's and fill in the implied ones (--verify-below, --demo). An option
    that would change nothing in this run is refused, as a batch line's is (one rule: never ignored in silence)."""
    for name, flag in (("temperature", "--temperature"), ("max_new_tokens", "-m"), ("seed", "--seed")):
        problem = option_problem(name, getattr(args, name))   # the same rule as a batch line's options
        if problem:
            raise UsageError(f"{flag} {problem}")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    try:
        number("--verify-below", args.verify_below)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.verify_below is not None:
        args.verify = True
    args.verify_below = math.inf if args.verify_below is None else args.verify_below
    lossless = args.verify and math.isinf(args.verify_below)
    if args.plan is not None and not (lossless or args.demo):
        raise UsageError(f"--plan {args.plan}: it sizes the draft chains of a lossless --verify, and this run "
                         f"{'verifies only skips below --verify-below' if args.verify else 'has no --verify'}: drop "
                         "it, or add --verify")
    args.plan = args.plan or "cost"
    args.planned = lossless and args.plan == "cost"
    if args.json:   # before any work: a typo fails at once
        check_output_file(args.json, "--json", parents=False, stdout=True)   # '-': stdout
        if args.json == "-" and args.demo:
            raise UsageError("--json -: the demo prints its text to stdout; name a file for the JSON")
    settle_batch(args)
    if args.demo:
        if args.n_prompts < 1 or args.prompt_tokens < 1:
            raise UsageError("--n-prompts and --prompt-tokens must be >= 1")
        args.check = True
        args.policy = "gate" if args.policy == "big" else args.policy
        if args.policy == "gate" and not args.gate and not args.small:
            args.gate = "runs/demo/gate"
    gate = getattr(args, "gate", None)   # (only when a policy reads --gate)
    if gate and not Path(gate).is_dir():   # before loading any model
        raise UsageError(f"--gate {gate}: {'not a folder' if Path(gate).exists() else 'no such folder'} "
                         "(train a gate with `python train.py fit`)")


def settle_audit(args) -> None:
    """The audit's options (read by --policy gate; after unread_options) against the run: refused where they
    contradict it or would change nothing (the audit is off), --audit-target's value checked before any model
    loads. --audit-scope job also needs prompts one at a time."""
    audit, target = getattr(args, "audit", None), getattr(args, "audit_target", None)
    job = getattr(args, "audit_scope", "prompt") == "job"
    lossless = args.verify and math.isinf(args.verify_below)
    if audit and lossless:
        raise UsageError("--audit watches a lossy decode, and --verify checks every skip already: drop one "
                         "(or audit the unchecked skips of --verify-below T)")
    if audit and args.temperature > 0:
        raise UsageError("--audit compares skips with the big model's greedy token: it needs -t 0")
    off = "--no-audit" if audit is False else "a lossless --verify checks every skip" if lossless else \
        f"-t {args.temperature:g} samples, and the audit compares with the greedy token" \
        if args.temperature > 0 and not args.input else None   # (a batch line may still be greedy)
    given = [f for f, v in (("--audit-target", target is not None), ("--audit-scope job", job)) if v]
    if given and off:
        raise UsageError(f"{given[0]}: the audit is off ({off}), so it would change nothing: drop it")
    try:
        check_audit_target(target)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.input and isinstance(args.parallel, int) and args.parallel > 1 and carries_audit(args):
        raise UsageError(f"--audit-scope job carries the audit from one prompt to the next: it needs "
                         f"--parallel 1 (or auto), not {args.parallel}")


def settle_batch(args) -> None:
    """--input/--output: both or neither, not with a single prompt or the demo, the output path checked now;
    the batch's own options only with them."""
    if args.input is None and args.output is None:
        given = [f for f, v in (("--parallel", args.parallel is not None),
                                ("--rerun-mismatched", args.rerun_mismatched)) if v]
        if given:
            raise UsageError(f"{given[0]} is an option of a batch (--input F --output R): drop it")
        return
    if not (args.input and args.output):
        raise UsageError("--input and --output go together (prompts in, results out)")
    others = [f for f, v in (("a prompt", args.prompt), ("--prompt-file", args.prompt_file), ("--demo", args.demo),
                             ("--json", args.json)) if v]
    if others:
        raise UsageError(f"--input takes its prompts from the file: drop {others[0]} (the results go to --output)")
    args.parallel = args.parallel or "auto"
    if args.parallel != "auto":
        try:
            args.parallel = int(args.parallel)
        except ValueError:
            args.parallel = 0
        if args.parallel < 1:
            raise UsageError("--parallel must be a whole number >= 1 or auto")
    check_batch_output(args)   # every path the run writes: the output ('-': stdout), its lock, its summary
    if "-" not in (args.input, args.output) and Path(args.input).resolve() == Path(args.output).resolve():
        raise UsageError(f"--output {args.output}: the same file as --input")


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


# -- running -------------------------------------------------------------------------------------------------
def read_prompt(args) -> str:
    """The prompt text from the argument, stdin ('-') or --prompt-file, checked to be UTF-8 text."""
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
        if args.prompt:
            raise UsageError("give either a prompt or --prompt-file, not both")
        return nonempty(text, f"--prompt-file {args.prompt_file}")
    if args.prompt == "-":
        try:
            return nonempty(sys.stdin.buffer.read().decode("utf-8"), "stdin")
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if args.prompt:
        return user_text(args.prompt, "the prompt argument")
    raise UsageError("give a prompt (or '-' for stdin, --prompt-file F, --input F.jsonl, or --demo)")


def nonempty(text: str, what: str) -> str:
    if not text:
        raise UsageError(f"{what}: the prompt is empty")
    return text


def save_json(path: str, obj) -> None:
    """--json PATH ('-': stdout)."""
    if path == "-":
        sys.stdout.write(json_text(obj))
        sys.stdout.flush()
        return
    try:
        write_json(path, obj)
    except OSError as e:
        raise UsageError(f"--json {path}: {e.strerror or e}") from None


def use_color(args) -> bool:
    return sys.stdout.isatty() and not args.no_color


def run_prompt(args, policies) -> int:
    """Generate from one prompt, streaming the text to stdout and the ledger to stderr."""
    text = read_prompt(args)
    rt = open_runtime(args, policies)
    policy = make_policy(args, rt, policies)
    planner_for(policy, rt, args, lossy=not args.verify)   # a first run measures pass costs before the text streams
    prompt_ids = encode(rt, text, args.chat, args.parse_special)
    rt.check_fits(len(prompt_ids), args.max_new_tokens)
    if args.json == "-" and not args.quiet:
        print("infer.py: --json -: the JSON goes to stdout in place of the streamed text (it holds the text)",
              file=sys.stderr)
    stream = None if args.quiet or args.json == "-" else Streamer(rt.tokenizer, use_color(args))
    if stream:
        sys.stdout.write(text if not args.chat else "")
        sys.stdout.flush()
    r = run_one(rt, policy, prompt_ids, args, stream=stream)
    if stream:
        print()
    led = Ledger.from_dict(r["ledger"])
    print(format_ledgers({policy_label(led): led}), file=sys.stderr)
    if args.json:
        save_json(args.json, r)
    return 0


def run_demo(args, policies) -> int:
    """Prompts from held-out books, each generated with big, the copy rule with --verify (no training), the policy,
    and the policy with --verify (chains sized by the planner), speeds as ratios to big; on llama.cpp the binding's
    own generate speed on the same GGUF is named beside them."""
    rt = open_runtime(args, policies)
    prompts = held_out_prompts(args.corpus, rt.tokenizer, args.n_prompts, args.prompt_tokens)
    for ids in prompts:
        rt.check_fits(len(ids), args.max_new_tokens, "demo prompt")
    policy = make_policy(args, rt, policies)
    lossless = argparse.Namespace(**{**vars(args), "verify": True, "planned": args.plan == "cost"})
    verified = make_policy(lossless, rt, policies)
    copy = make_policy(argparse.Namespace(**{**vars(lossless), "policy": "copy", "min_match": None,
                                             "max_skip": None}), rt, policies)      # the rule that needs no training
    runs, totals = [], {}
    for i, ids in enumerate(prompts, 1):
        print(f"\n=== prompt {i}: {len(ids)} tokens from a held-out book ===")
        print((DIM + rt.tokenizer.decode(ids) + RESET) if use_color(args) else rt.tokenizer.decode(ids))
        cols = {}
        for pol, a in ((BigOnly(), args), (copy, lossless), (policy, args), (verified, lossless)):
            r = run_one(rt, pol, ids, a)
            led = Ledger.from_dict(r["ledger"])
            print(f"\n--- {policy_label(led)} ---")
            Streamer(rt.tokenizer, use_color(args))(r["output_ids"], r["sources"])
            print()
            cols[policy_label(led)] = led
            totals.setdefault(policy_label(led), []).append(led)
            runs.append(r)
        print()
        print(format_ledgers(cols))
    if len(prompts) > 1:
        print(f"\n=== all {len(prompts)} prompts ===")
        print(format_ledgers({k: sum_ledgers(v) for k, v in totals.items()}))
    own = binding_speed(rt, prompts, args.max_new_tokens)
    if own:
        print(f"\nllama-cpp-python's own generate on the same GGUF and threads: {own:.1f} tokens/s (greedy, prompt "
              "pass included, as in the ledgers above)")
    if args.json:
        save_json(args.json, dict(runs=runs, binding_generate_tokens_per_s=own))
    return 0


def binding_speed(rt: Runtime, prompts, n: int) -> float | None:
    """Tokens/s of llama-cpp-python's own greedy generate over the prompts (None unless the big model runs on
    llama.cpp): the speed a user of the binding alone gets, the yardstick for every method."""
    path = getattr(rt.big, "path", None)
    if path is None or not hasattr(rt.big, "n_threads"):
        return None
    llama_cpp = import_binding()
    llm = llama_cpp.Llama(str(path), n_ctx=rt.big.n_ctx, n_threads=rt.big.n_threads,
                          n_threads_batch=rt.big.n_threads, verbose=False)
    tokens, t0 = 0, time.perf_counter()
    for ids in prompts:
        llm.reset()
        for k, tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True), 1):
            if tok in rt.eos_ids or k > n:
                break
            tokens += 1
    return tokens / (time.perf_counter() - t0)


def main(argv=None, policies=None) -> int:
    """infer.py; `policies` replaces the registry (a test's own policy)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    policies = registered() if policies is None else policies
    args = build_parser(policies).parse_args(argv)
    try:
        settle_args(args)
        unread_options(args, policies)
        settle_audit(args)
        configure_torch(args)
        if args.input:
            return run_batch(args, policies)   # (says itself what an interrupt saved)
        return run_demo(args, policies) if args.demo else run_prompt(args, policies)
    except ProjectError as e:   # a user's mistake is one line; anything else is a bug and keeps its traceback
        return fail("infer.py", e)
    except KeyboardInterrupt:   # Ctrl-C: no traceback; a batch's finished rows are saved (run_batch says which)
        print("infer.py: interrupted" + ("; run the same command again to resume" if args.input and
                                         args.output != "-" else ""), file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:     # stdout's reader went away (`| head`): nothing more can be shown, end quietly
        quiet_stdout()
        return BROKEN_PIPE


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of a closed pipe says nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):   # no file descriptor (a captured stdout)
        pass


if __name__ == "__main__":
    sys.exit(main())
