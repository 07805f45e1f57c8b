"""Switching policies: each decides, position by position, whether a predictor or the big model speaks.

    big       the big model only (baseline)
    small     the predictor only: a small LM, or a drafter with every proposal accepted
    ratio     fixed-ratio alternation: the small model takes every int(1/r)-th token after `min_tokens` big ones
    entropy   entropy-gated switching: the small model generates; the big model takes over where the small
              model's entropy (normalised by log|V| by default) exceeds tau; variants span/lookahead/adaptive/pattern
    cascade   entropy-gated switching over three or more models: level l speaks if its entropy <= tau_l, else l+1
    gate      the learned gate: a Drafter proposes a token and a score; skip while score >= threshold
    copy      the copy rule: prompt lookup as a gate (no model, no training)

A policy only returns drafts (the loop does the rest); a new policy is one @register class here (docs/decode.md).
"""
from __future__ import annotations

import argparse
import math
import re

import torch

from gate.decode.contract import DecodeState, Draft, Policy, arg, at_least, draft_probs, number, register, unit_interval
from gate.decode.cost import MAX_CHAIN, copy_acceptance
from gate.decode.drafters import SmallLMDrafter, load_gate, router_meta
from gate.model.base import Drafter
from gate.model.copyrule import MAX_N, CopyIndex
from runtimes.backend import LM, Backend

# -- options shared by several policies (one Arg each: the parser adds it once) ----------------------------
SMALL = arg("--small", help="small model: a name with the big model's tokenizer, or self:K (the big model's "
            "first K layers)")
GATE = arg("--gate", metavar="PATH", help="trained gate artifact (train.py fit)")
TAU = arg("--tau", type=float, nargs="+", default=None,
          help="entropy threshold, default 0.3: entropy takes one value; cascade one per smaller model, or one "
          "value applied to every level")
RAW_ENTROPY = arg("--raw-entropy", action="store_true", help="tau in nats instead of normalised by log|V|")
THRESHOLD = arg("--threshold", type=float, help="gate threshold in [0, 1] (default: the gate's calibrated one; "
                "0.8 for a small-LM gate)")
MAX_SKIP = arg("--max-skip", type=int, help="at most this distance from the last big pass")
AUDIT = arg("--audit", action=argparse.BooleanOptionalAction, default=None,
            help="compare each unchecked skip with the big model's argmax when its catch-up pass comes (nothing "
            "is rolled back), count the mismatches and raise the threshold while the error bound exceeds "
            "--audit-target (default: on for lossy greedy decoding; off under a lossless --verify; "
            "docs/decode.md#the-audit-gatedecodeauditpy)")
AUDIT_TARGET = arg("--audit-target", type=float, metavar="E", help="the error the audit holds skips to (default: "
                   "1 - the target precision the gate was calibrated for, else 0.01)")
AUDIT_SCOPE = arg("--audit-scope", choices=("prompt", "job"), default="prompt",
                  help="prompt: every prompt's audit starts at the calibrated threshold (a prompt's output does not "
                  "depend on the others); job: the raised threshold and its evidence carry on to the next prompt "
                  "of an --input file (one prompt at a time), so a job's mismatches hold the whole job to the "
                  "target (a text of a few hundred tokens holds too few skips to tell 2%% from 1%%)")
CHAIN_CUT = arg("--chain-cut", type=float, help="gate: also stop skipping when the product of the scores since "
                "the last big pass (the chance every draft of the run is right) falls below this (EAGLE-2's dynamic "
                "draft length; for --verify)")



def check_audit_target(target: float | None) -> float | None:
    """--audit-target unless it is outside (0, 1) or nan (None: not given); infer.py checks it before loading."""
    if target is not None and not 0 < target < 1:   # also refuses nan
        raise ValueError(f"--audit-target must be a number in (0, 1), got {target:g}")
    return target


DEFAULT_TAU = 0.3
SMALL_LM_GATE_THRESHOLD = 0.8


def lm_draft(logits: torch.Tensor, state: DecodeState, source: str) -> Draft:
    """The small LM's token (argmax, or sampled at the run's temperature) with its max-probability as score."""
    tok = state.sample(logits)
    score = float(torch.softmax(logits, -1).max())
    return Draft(tok, source, score, draft_probs(logits, state.temperature))


def entropy(logits: torch.Tensor, normalize: bool = True) -> float:
    lsm = torch.log_softmax(logits, -1)
    h = float(-(lsm.exp() * lsm).sum())
    return h / math.log(logits.shape[-1]) if normalize else h


def predictor(args, rt, policy: str):
    """The --small backend, or a one-line error naming what the policy needs."""
    if not args.small:
        raise ValueError(f"--policy {policy} needs --small M")
    return rt.predictor(args.small)


def planned(args) -> bool:
    """Does the draft planner size the chains (lossless --verify with the default --plan cost)?"""
    return bool(getattr(args, "planned", False))


def taus_of(args) -> list[float]:
    taus = args.tau or [DEFAULT_TAU]
    for t in taus:
        number("--tau", t)
    return taus


@register
class BigOnly(Policy):
    name = "big"
    summary = "the big model only (baseline)"
    examples = ('"It is a truth universally acknowledged" -m 60',)


@register
class SmallOnly(Policy):
    """The small LM writes everything; the big model is never run (except to verify, if asked)."""
    name = "small"
    summary = "the predictor only: --small M (a small LM), or --gate PATH with every proposal accepted"
    args = (SMALL, GATE, MAX_SKIP)

    def __init__(self, small: Backend):
        self.small = LM(small)
        super().__init__([self.small])

    def propose(self, state):
        self.calls += 1
        return [lm_draft(self.small(state.ids), state, self.source)]

    @classmethod
    def from_args(cls, args, rt):
        if args.gate:
            return Gate(load_gate(rt, args.gate), threshold=-math.inf,
                        max_skip=at_least("--max-skip", args.max_skip, 1), name="small")
        if not args.small:
            raise ValueError("--policy small needs --small M or --gate PATH")
        return cls(rt.predictor(args.small))


@register
class Ratio(Policy):
    """Fixed-ratio alternation: generated token i (0-based) comes from the small model iff
    i >= min_tokens and (i - min_tokens) % int(1/r) == 0; tokens before min_tokens are the big model's
    scaffold. r = 0 is the big model only."""
    name = "ratio"
    summary = ("fixed-ratio alternation: after --min-tokens big-model scaffold tokens, the small model takes\n"
               "every int(1/r)-th token")
    args = (SMALL, arg("-r", "--ratio", type=float, default=0.5, help="share of small-model tokens, in [0, 1]"),
            arg("--min-tokens", type=int, default=10, help="big-model scaffold tokens first"))
    examples = ('"Call me Ishmael." --policy ratio --small self:8 -r 0.5 --min-tokens 10',)

    def __init__(self, small: Backend | None, ratio: float, min_tokens: int = 10):
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1] (share of small-model tokens), got {ratio}")
        if min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if ratio > 0 and small is None:
            raise ValueError("ratio > 0 needs a small model")
        self.small = LM(small) if small is not None else None
        super().__init__([self.small] if self.small is not None else [])
        self.ratio, self.min_tokens = ratio, min_tokens
        self.interval = int(1 / ratio) if ratio > 0 else 0

    def use_small(self, i: int) -> bool:
        return self.interval > 0 and i >= self.min_tokens and (i - self.min_tokens) % self.interval == 0

    def propose(self, state):
        if not self.use_small(state.n_new):
            return []
        self.calls += 1
        return [lm_draft(self.small(state.ids), state, self.source)]

    def big_source(self, state):
        return "scaffold" if state.n_new < self.min_tokens else "big"

    @classmethod
    def from_args(cls, args, rt):
        if not args.small and args.ratio > 0:
            raise ValueError("--policy ratio needs --small M (or -r 0 for the big model only)")
        return cls(rt.predictor(args.small) if args.small else None, args.ratio, args.min_tokens)


def suffix_regex(pattern: str, what: str = "pattern") -> re.Pattern:
    """A regex that matches where a text ends with a match of `pattern`; a bad pattern is a ValueError
    naming `what` and the problem in the user's own pattern."""
    try:
        re.compile(pattern)
        return re.compile(f"(?:{pattern})\\Z")
    except re.error as e:
        raise ValueError(f"{what} {pattern!r}: not a regular expression ({e})") from None


@register
class Entropy(Policy):
    """Entropy-gated switching: the small model generates; the big model takes the next token when the small
    model's entropy exceeds tau (normalised by log|V| unless normalize=False).

    span: the big model keeps the next `span` tokens once triggered, or "line": until it emits a newline.
    lookahead k: the small model drafts k tokens; all k are kept if their mean entropy is <= tau, else they
      are dropped and the big model takes the next token.
    adaptive: after `adapt_run` consecutive triggers tau shrinks by `adapt_step` (down to tau/2); after
      `adapt_run` consecutive confident decisions it grows (up to 2 tau).
    pattern: a regex; where the text so far ends with a match, the big model takes the next token
      (e.g. r"[(\\[{]" after an opening bracket, r"\\n" at a line start).
    """
    name = "entropy"
    summary = ("entropy-gated switching: the small model writes; the big model takes over where the small\n"
               "model's entropy (normalised by log|V|; --raw-entropy for nats) exceeds --tau")
    args = (SMALL, TAU, RAW_ENTROPY,
            arg("--span", default="1", help="the big model keeps N tokens once triggered, or 'line'"),
            arg("--lookahead", type=int, default=1, help="decide on the mean entropy over K small tokens"),
            arg("--adaptive", action="store_true", help="adapt tau to runs of high/low entropy"),
            arg("--pattern", help="regex; the big model speaks where the text so far ends with it"))
    examples = ('"Call me Ishmael." --policy entropy --small self:20 --tau 0.3 --span line --adaptive',)

    def __init__(self, small: Backend, tau: float, *, normalize: bool = True, span: int | str = 1,
                 lookahead: int = 1, adaptive: bool = False, pattern: str | None = None, tokenizer=None,
                 adapt_run: int = 4, adapt_step: float = 0.1):
        if span != "line" and (not isinstance(span, int) or span < 1):
            raise ValueError(f"span must be a positive integer or 'line', got {span!r}")
        if lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        if (span == "line" or pattern) and tokenizer is None:
            raise ValueError("span='line' and pattern need the tokenizer")
        self.small = LM(small)
        super().__init__([self.small])
        self.tau, self.normalize = tau, normalize
        self.span, self.lookahead, self.adaptive = span, lookahead, adaptive
        self.pattern = suffix_regex(pattern) if pattern else None
        self.tokenizer = tokenizer
        self.adapt_run, self.adapt_step = adapt_run, adapt_step

    def start(self):
        self.tau_now = self.tau
        self.big_left, self.in_line = 0, False
        self.high_run = self.low_run = 0
        self.triggers = 0

    def propose(self, state):
        if self.big_left > 0:              # inside a big-model span
            self.big_left -= 1
            return []
        if self.in_line:                   # inside a big-model line: until the big model emits a newline
            if "\n" not in self.tokenizer.decode(state.ids[-1:]):
                return []
            self.in_line = False
        if self.pattern is not None and self.pattern.search(self.tokenizer.decode(state.ids[-32:])):
            return self.trigger()
        if self.tau_now == -math.inf:      # nothing is confident enough: do not even run the small model
            return self.trigger()
        drafts, hs = self.look_ahead(state)
        high = not sum(hs) / len(hs) <= self.tau_now
        self.adapt(high)
        return self.trigger() if high else drafts   # a refused lookahead leaves the small cache: the loop crops

    def look_ahead(self, state) -> tuple[list[Draft], list[float]]:
        """Up to `lookahead` small-model drafts and their entropies (stopping at max_new or EOS)."""
        drafts, hs, ids = [], [], list(state.ids)
        for _ in range(self.lookahead):
            logits = self.small(ids)
            self.calls += 1
            hs.append(entropy(logits, self.normalize))
            d = lm_draft(logits, state, self.source)
            drafts.append(d)
            ids.append(d.token)
            if state.n_new + len(drafts) >= state.max_new or d.token in state.eos:
                break
        return drafts, hs

    def trigger(self):
        self.triggers += 1
        if self.span == "line":
            self.in_line = True
        else:
            self.big_left = self.span - 1
        return []

    def adapt(self, high: bool) -> None:
        if not self.adaptive:
            return
        self.high_run, self.low_run = (self.high_run + 1, 0) if high else (0, self.low_run + 1)
        if self.high_run >= self.adapt_run:
            self.tau_now, self.high_run = max(self.tau / 2, self.tau_now * (1 - self.adapt_step)), 0
        elif self.low_run >= self.adapt_run:
            self.tau_now, self.low_run = min(self.tau * 2, self.tau_now * (1 + self.adapt_step)), 0

    @classmethod
    def from_args(cls, args, rt):
        small = predictor(args, rt, "entropy")
        taus = taus_of(args)
        if len(taus) != 1:
            raise ValueError(f"--policy entropy takes one --tau, got {len(taus)}")
        if args.span == "line":
            span = "line"
        elif args.span.isdigit():
            span = int(args.span)
        else:
            raise ValueError(f"--span takes a positive integer or 'line', got {args.span!r}")
        if args.pattern:
            suffix_regex(args.pattern, "--pattern")
        return cls(small, taus[0], normalize=not args.raw_entropy, span=span,
                   lookahead=at_least("--lookahead", args.lookahead, 1), adaptive=args.adaptive,
                   pattern=args.pattern, tokenizer=rt.tokenizer)


@register
class Cascade(Policy):
    """Entropy-gated switching over several models: levels[0] (the smallest) speaks when its entropy is
    <= taus[0], else levels[1] is asked with taus[1], ...; when every level is unsure, the big model speaks."""
    name = "cascade"
    summary = ("--models M1 M2 ... MN (smallest first, the last is the big model); one --tau per smaller\n"
               "model, or one --tau for every level")
    args = (arg("--models", nargs="+", metavar="M", help="smallest first, the last is the big model"),
            TAU, RAW_ENTROPY)
    examples = ('"Call me Ishmael." --policy cascade --models self:10 self:20 smollm2-135m --tau 0.2 0.3',)

    def __init__(self, levels: list[Backend], taus: list[float], normalize: bool = True):
        if not levels or len(levels) != len(taus):
            raise ValueError(f"cascade: one threshold per predictor level ({len(levels)} levels, "
                             f"{len(taus)} thresholds)")
        self.levels = [LM(b) for b in levels]
        super().__init__(self.levels)
        self.taus, self.normalize = list(taus), normalize
        self.labels = ["small"] + [f"mid{i}" for i in range(1, len(levels))]

    def propose(self, state):
        for lm, tau, label in zip(self.levels, self.taus, self.labels):
            if tau == -math.inf:
                continue
            logits = lm(state.ids)
            self.calls += 1
            if entropy(logits, self.normalize) <= tau:
                return [lm_draft(logits, state, label)]
        return []

    @classmethod
    def model_names(cls, args):
        if not args.models or len(args.models) < 2:
            raise ValueError("--policy cascade needs --models M1 ... MN (at least 2; the last is the big model)")
        return args.models[-1], list(args.models[:-1])

    @classmethod
    def from_args(cls, args, rt):
        _, names = cls.model_names(args)
        taus = taus_of(args)
        if len(taus) == 1:
            taus = taus * len(names)
        elif len(taus) != len(names):
            raise ValueError(f"--policy cascade: give one --tau per smaller model ({len(names)}: "
                             f"{' '.join(names)}) or one for every level, got {len(taus)}")
        return cls([rt.predictor(n) for n in names], taus, normalize=not args.raw_entropy)


@register
class Gate(Policy):
    """The learned gate (docs/interfaces.md, Drafter): at distance since_big from the big model's last
    computed position the drafter proposes a token and a score; skip while score >= threshold and
    since_big < max_skip. Multi-token skips come from the drafter's future-token heads.

    `lms`: the predictor views the drafter calls (default: the drafter's `lms`, e.g. SmallLMDrafter's or
    RouterDrafter's small model), so the loop keeps them in step."""
    name = "gate"
    source = "skip"
    summary = ("the learned gate: --gate PATH (from `train.py fit`), or --small M to use a small LM's\n"
               "max-probability as the gate score; skips while score >= --threshold")
    args = (GATE, SMALL, THRESHOLD, MAX_SKIP, CHAIN_CUT, AUDIT, AUDIT_TARGET, AUDIT_SCOPE)
    needs_big_hidden = True
    examples = ('"It is a truth universally acknowledged" --policy gate --gate runs/demo/gate',
                '"It is a truth universally acknowledged" --policy gate --gate runs/demo/gate --verify',
                '"Call me Ishmael." --policy gate --gate runs/demo/gate --verify-below 0.99 --json out.json --check',
                '"def fib(n):" --model qwen2.5-coder-1.5b --policy gate --small qwen2.5-coder-0.5b --verify')

    def __init__(self, drafter: Drafter, threshold: float | None = None, max_skip: int | None = None,
                 name: str | None = None, lms: tuple[LM, ...] | None = None, chain_cut: float | None = None,
                 free_max_skip: int | None = None):
        super().__init__(drafter.lms if lms is None else lms)
        self.drafter = drafter
        self.chain_cut, self.chain = chain_cut, 1.0
        self.threshold = drafter.threshold if threshold is None else threshold
        self.max_skip = drafter.max_skip if max_skip is None else min(max_skip, drafter.max_skip)
        # how far the drafter's free source (the copy rule) drafts past the big model: max_skip, or in planned
        # decoding the planner's own cap, as the copy policy's (the drafter's reach ends at its max_skip)
        self.free_max_skip = max(self.max_skip, free_max_skip or 0)
        if name:
            self.name = name

    @property
    def hidden_layer(self) -> int | None:
        return self.drafter.hidden_layer

    @property
    def needs_all_hidden(self) -> bool:
        return self.drafter.reads_all_hidden

    @property
    def draft_steps(self) -> int:
        return self.drafter.steps

    def start(self):
        self.drafter.start()
        self.live_threshold = None   # each text starts at the configured threshold; an audit may raise it

    def propose(self, state):
        s = state.since_big
        if s >= self.max_skip:              # past the drafter's reach: its free source alone, as far as allowed
            return self.propose_free(state)
        if state.big_cached == 0 or s < 1:
            return []
        hidden = state.big_hiddens if self.needs_all_hidden else state.big_hidden
        tok, score = self.drafter.propose(state.ids, hidden, s)
        self.calls += 1
        self.chain = (1.0 if s == 1 else self.chain) * float(score)
        threshold = self.threshold if self.live_threshold is None else self.live_threshold
        if score < threshold or (self.chain_cut is not None and self.chain < self.chain_cut):
            return []
        logits = self.drafter.last_logits
        if state.temperature > 0 and logits is not None:   # sampled: draft from the drafter's own distribution
            return [Draft(state.sample(logits), self.source, float(score), draft_probs(logits, state.temperature))]
        return [Draft(int(tok), self.source, float(score))]

    def propose_free(self, state):
        s = state.since_big
        if state.big_cached == 0 or not 1 <= s < self.free_max_skip:
            return []
        free = self.drafter.propose_free(state.ids)
        threshold = self.threshold if self.live_threshold is None else self.live_threshold
        if free is None or free[1] < threshold:
            return []
        return [Draft(free[0], self.source, free[1])]

    @classmethod
    def model_names(cls, args):
        """A router artifact (--gate) runs over its small model: --small, or the one it was trained with."""
        big, small = super().model_names(args)
        if args.gate:
            meta = router_meta(args.gate)
            if meta is not None:
                small = [args.small or meta["small_model"]["name"]]
        return big, small

    @classmethod
    def small_lm(cls, small: Backend, drafter_threshold: float = SMALL_LM_GATE_THRESHOLD, **kw) -> "Gate":
        """The gate over a small LM's max-probability (SmallLMDrafter), its cache kept by the loop."""
        return cls(SmallLMDrafter(small, threshold=drafter_threshold), **kw)

    @classmethod
    def from_args(cls, args, rt):
        threshold = unit_interval("--threshold", args.threshold)
        if threshold is None and planned(args):   # the planner sizes chains by cost: propose every candidate
            threshold = -math.inf
        kw = dict(threshold=threshold, max_skip=at_least("--max-skip", args.max_skip, 1),
                  chain_cut=unit_interval("--chain-cut", args.chain_cut),
                  free_max_skip=MAX_CHAIN + 1 if planned(args) else None)
        check_audit_target(getattr(args, "audit_target", None))
        if args.gate:
            return cls(load_gate(rt, args.gate), **kw)
        if args.small:
            return cls.small_lm(rt.predictor(args.small), **kw)
        raise ValueError("--policy gate needs --gate PATH (a trained gate) or --small M (a small LM as gate)")


@register
class Copy(Policy):
    """Prompt lookup used as a gate, with no model and no training (gate/model/copyrule.py): where the last
    n >= min_match tokens occurred earlier in the text, draft the token that followed them there, with score n;
    skip while such a candidate exists and since_big < max_skip. Drafted one position at a time, a long match
    extends itself, so a repeated passage is drafted token by token like prompt-lookup decoding's k-token
    drafts. Lossy alone; with --verify every draft is checked at the next big pass (lossless)."""
    name = "copy"
    source = "skip"
    free = True
    summary = ("the copy rule (prompt lookup as a gate, no training): where the last --min-match tokens\n"
               "occurred earlier, skip with the token that followed them (up to --max-skip - 1 = 10 per\n"
               "big pass by default); lossless with --verify")
    args = (arg("--min-match", type=int, help="shortest repeated suffix that drafts a token (default 4; 1 with "
                "--verify, where the planner weighs each match length by its acceptance)"),
            MAX_SKIP)
    examples = ('"Call me Ishmael." --policy copy --min-match 3 --verify',)
    DEFAULT_MAX_SKIP = 11   # up to 10 drafts per big pass, as transformers' prompt_lookup_num_tokens=10

    def __init__(self, min_match: int = 4, max_skip: int = DEFAULT_MAX_SKIP):
        if not 1 <= min_match <= MAX_N:
            raise ValueError(f"--min-match must be in 1..{MAX_N}, got {min_match}")
        super().__init__()
        self.min_match, self.max_skip = min_match, max_skip
        self.index = CopyIndex(MAX_N)

    def start(self):
        self.index.reset()

    def acceptance(self):
        return copy_acceptance()   # the score is a match length

    def propose(self, state):
        if state.big_cached == 0 or not 1 <= state.since_big < self.max_skip:
            return []
        self.index.sync(state.ids)
        tok, n = self.index.query()
        self.calls += 1
        return [Draft(tok, self.source, float(n))] if n >= self.min_match else []

    @classmethod
    def from_args(cls, args, rt):
        max_skip = at_least("--max-skip", args.max_skip, 1)
        if max_skip is None:
            max_skip = MAX_CHAIN + 1 if planned(args) else cls.DEFAULT_MAX_SKIP
        min_match = args.min_match if args.min_match is not None else (1 if planned(args) else 4)
        return cls(min_match, max_skip)


__all__ = ["BigOnly", "SmallOnly", "Ratio", "Entropy", "Cascade", "Gate", "Copy", "entropy", "lm_draft",
           "suffix_regex", "check_audit_target"]
