"""One decode run, shared by infer.py (cli.py, batch.py) and the benchmarks: options -> runtime -> policy -> text.

    add_runtime_args(group)                      # --model --dtype --backend --threads
    option_problem("seed", value)                # the one rule for -m / -t / --seed and a batch line's options
    backend_of(args, policies)                   # (kind, why) the models will open on, known before loading
    rt = open_runtime(args, policies)            # the models the chosen policy needs (gate/decode/registry.py)
    policy = make_policy(args, rt, policies)     # built by its class; ValueErrors become UsageErrors
    ids = encode(rt, text, chat=False)           # user text is text: special-token strings stay literal
    row = run_one(rt, policy, ids, args)         # decode (the cost planner under --verify, the audit if lossy)
    held_out_prompts(corpus, tokenizer, n, n_tokens)
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from common.errors import UsageError
from corpus_tools.selfgen import split_prompts
from corpus_tools.tokens import chat_ids as template_ids
from corpus_tools.tokens import encode_text
from gate.decode.audit import DEFAULT_TARGET, Audit, calibrated_target
from gate.decode.cost import Planner, load_or_measure
from gate.decode.drafters import gate_layer
from gate.decode.loop import Decoder, check_output
from gate.decode.policies import BigOnly, Gate
from gate.decode.registry import registered
from runtimes.open import BACKENDS, Runtime, auto_backend, open_models

MIN_TEMPERATURE = 1e-4   # below it (but above 0) a temperature is refused: it overflows float32 in the softmax
SEED_LIMIT = 2 ** 63     # seeds are in [0, 2**63): what torch's and the decoder's generators take


def option_problem(name: str, value) -> str | None:
    """Why `value` cannot be the decoding option `name` (max_new_tokens, temperature or seed), or None: the one
    rule for -m / -t / --seed and for a line's "max_new_tokens" / "temperature" / "seed". The text follows the
    option's name ("-m must be ...", "'seed' must be ...")."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = number and isinstance(value, int)
    shown = f"{value:g}" if isinstance(value, float) else repr(value)   # -1, not -1.0; 'a' with its quotes
    if name == "max_new_tokens" and not (integer and value >= 1):
        return f"must be an integer >= 1, got {shown}"
    if name == "temperature":
        if not (number and math.isfinite(value) and value >= 0):
            return f"must be a finite number >= 0, got {shown}"
        if 0 < value < MIN_TEMPERATURE:   # 1e-300 overflowed float32 in the softmax
            return (f"{shown} is below {MIN_TEMPERATURE:g}: sampling there is greedy in all but name and overflows "
                    "float32; write 0 for greedy")
    if name == "seed" and not (integer and 0 <= value < SEED_LIMIT):
        return f"must be an integer in [0, 2**63), got {shown}"
    return None


def add_runtime_args(g, dtype_help: str = "model dtype (default: %(default)s)", auto: bool = True) -> None:
    """The runtime's options (infer.py and bench/decode.py): big model, dtype, backend, threads."""
    g.add_argument("--model", default="smollm2-135m", help="the big model (default: %(default)s)")
    g.add_argument("--dtype", default="float32", help=dtype_help)
    g.add_argument("--backend", default="auto" if auto else "hf", choices=(["auto"] if auto else []) + list(BACKENDS),
                   help="model runtime (default: %(default)s); llama.cpp runs GGUF models (a packaged alias or a "
                   ".gguf file) several times faster than transformers on a CPU; auto picks it for runs that read "
                   "the big model's last hidden layer or none, transformers for an inner layer")
    g.add_argument("--threads", type=int, help="torch's and llama.cpp's threads (default: one per core, the fastest "
                   "on an idle machine; on a machine busy with other jobs fewer threads and OMP_WAIT_POLICY=PASSIVE "
                   "avoid stalls: docs/speed.md)")


def held_out_prompts(corpus: str, tokenizer, n: int, n_tokens: int, split: str = "test") -> list[list[int]]:
    """n prompts of n_tokens tokens: the openings of long paragraphs spread over the held-out books."""
    if not Path(corpus, "manifest.jsonl").exists():
        raise UsageError(f"{corpus}: not a corpus folder (no manifest.jsonl; build it with train.py corpus)")
    try:
        return split_prompts(corpus, tokenizer, n, n_tokens, split)
    except ValueError as e:
        raise UsageError(str(e)) from None


def model_names(args, policies) -> tuple[str, list[str]]:
    """(big model, predictors) the chosen policy opens."""
    try:
        return policies[args.policy].model_names(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def backend_of(args, policies) -> tuple[str, str]:
    """(kind, why) of the backend open_runtime opens the models on, known before loading any: --backend, or what
    auto picks for these models."""
    if args.backend != "auto":
        return args.backend, f"--backend {args.backend}"
    big, smalls = model_names(args, policies)
    gate = getattr(args, "gate", None)
    return auto_backend(big, smalls, args.dtype, layer=gate_layer(gate) if gate else None)


def open_runtime(args, policies) -> Runtime:
    big, smalls = model_names(args, policies)
    gate = getattr(args, "gate", None)
    return open_models(big, smalls, args.dtype, args.backend, layer=gate_layer(gate) if gate else None,
                       log=lambda m: print(m, file=sys.stderr))


def make_policy(args, rt: Runtime, policies=None):
    """The chosen policy, built by its class from the options; its ValueErrors become user errors."""
    policies = registered() if policies is None else policies
    try:
        return policies[args.policy].from_args(args, rt)
    except ValueError as e:
        raise UsageError(str(e)) from None


def configure_torch(args) -> None:
    from transformers.utils import logging as hf_logging  # here: importing transformers takes seconds

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


def run_one(rt: Runtime, policy, prompt_ids: list[int], args, stream=None, verify=None) -> dict:
    verify = args.verify if verify is None else verify
    dec = Decoder(rt.big, policy, verify=verify, verify_below=args.verify_below if verify else math.inf,
                  temperature=args.temperature, seed=args.seed, eos_ids=rt.eos_ids, on_final=stream,
                  planner=planner_for(policy, rt, args, lossy=not verify), audit=audit_for(policy, args, verify))
    res = dec.generate(prompt_ids, args.max_new_tokens)
    ledger = res.ledger
    ledger["models"] = {"big": rt.big_info.name, **ledger["models"]}
    if args.check:
        ledger["check"] = check_output(rt.big, prompt_ids, res.ids)
    tok = rt.tokenizer
    return dict(prompt=tok.decode(prompt_ids), prompt_ids=list(prompt_ids), output_ids=res.ids,
                text=tok.decode(res.ids, skip_special_tokens=True), sources=res.sources,
                config={k: (None if isinstance(v, float) and math.isinf(v) else v)
                        for k, v in vars(args).items() if k != "prompt"}, ledger=ledger)


def planner_for(policy, rt: Runtime, args, lossy: bool = False):
    """The policy's draft planner (made once per policy, so a batch or the demo keeps learning), or None
    without --plan cost and a lossless --verify. `lossy`: a gate decode without --verify, whose planner only holds
    back a costly drafter whose proposals have not paid for their time (None for a free drafter)."""
    if lossy:
        if not isinstance(policy, Gate) or getattr(policy.drafter, "copies", None) is None:
            return None
    elif not getattr(args, "planned", False) or isinstance(policy, BigOnly):
        return None
    if getattr(policy, "planner", None) is None:
        hidden = bool(policy.needs_big_hidden and policy.hidden_layer is not None)
        profile = load_or_measure(rt.big, hidden=hidden, log=lambda m: print(m, file=sys.stderr))
        policy.planner = Planner(profile, policy.acceptance(), backoff=not policy.free)
    return policy.planner


def audits(args, verify: bool) -> bool:
    """Do these options audit a gate decode: lossy (no --verify, or --verify-below T), greedy, not --no-audit?"""
    lossless = verify and math.isinf(args.verify_below)
    return getattr(args, "audit", None) is not False and not lossless and args.temperature <= 0


def audit_for(policy, args, verify: bool) -> Audit | None:
    """The run's audit (gate/decode/audit.py): --audit, by default on for --policy gate when the decode is lossy
    (no --verify, or --verify-below T) and greedy; off with --no-audit, a lossless --verify or -t > 0."""
    if not audits(args, verify) or not (isinstance(policy, Gate) and policy.name == Gate.name):
        return None
    target = getattr(args, "audit_target", None)
    if target is None:
        target = calibrated_target(getattr(policy.drafter, "meta", None)) or DEFAULT_TARGET
    if getattr(args, "audit_scope", "prompt") != "job":
        return Audit(target)
    if policy.job_audit is None or policy.job_audit.target != target:   # one audit for the process's prompts
        policy.job_audit = Audit(target, carry=True)
    return policy.job_audit


def user_text(text: str, what: str, from_bytes: bool = True) -> str:
    """`text` unless it holds something that is not UTF-8 text: bytes of another encoding in an argument (Python
    passes each as a lone surrogate, U+DC80..U+DCFF, which the tokenizer refuses with an obscure TypeError) or a
    lone surrogate from a JSON escape (from_bytes=False). `what` names where the text came from."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        byte = from_bytes and 0xDC80 <= ord(c) <= 0xDCFF
        bad = f"byte 0x{ord(c) - 0xDC00:02x}" if byte else f"lone surrogate {ascii(c)}"
        raise UsageError(f"{what}: not UTF-8 text ({bad} at character {e.start + 1}); give UTF-8 text "
                         "(convert it with iconv, or use --prompt-file with a UTF-8 file)") from None
    return text


def chat_ids(tok, text: str, parse_special: bool) -> list[int]:
    """corpus_tools.tokens.chat_ids, its ValueError as a usage error."""
    try:
        return template_ids(tok, text, parse_special)
    except ValueError as e:
        raise UsageError(f"--chat: {e}") from None


def encode(rt: Runtime, text: str, chat: bool, parse_special: bool = False) -> list[int]:
    """Prompt ids of user text: special-token strings stay literal text unless `parse_special` (--parse-special)."""
    tok = rt.tokenizer
    if chat:
        ids = chat_ids(tok, text, parse_special)
    else:
        ids = list(tok(text).input_ids) if parse_special else encode_text(tok, text)
    if not ids:
        raise UsageError("the prompt is empty after tokenization")
    return ids
