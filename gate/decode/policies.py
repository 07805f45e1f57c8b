"""Switching policies: each decides, position by position, whether a predictor or the big model speaks.

    big       the big model only (baseline)
    small     the predictor only: a small LM, or a drafter with every proposal accepted
    ratio     seed 000: after `min_tokens` big "scaffold" tokens the small model takes every int(1/r)-th token
    entropy   seed 001: the small model generates; the big model takes over where the small model's entropy
              (normalised by log|V| by default) exceeds tau; variants span / lookahead / adaptive / pattern
    cascade   seed 001: three or more models; level l speaks when its entropy is <= tau_l, else the next
    gate      the learned gate: a Drafter proposes a token and a score; skip while score >= threshold

A policy only returns drafts; the loop in gate/decode/loop.py feeds the big model (catch-up), verifies, rolls back.
Predictors keep their own caches in step with the text through `catch_up` (they, too, are fed in one pass
every token they have not seen, e.g. the big model's tokens since they last ran).
"""
from __future__ import annotations

import math
import re

import torch

from gate.decode.backend import Backend, catch_up
from gate.decode.loop import Decoder, Draft, Policy, draft_probs, select


def lm_draft(logits: torch.Tensor, dec: Decoder, source: str) -> Draft:
    """The small LM's token (argmax, or sampled at the run's temperature) with its max-probability as score."""
    tok = select(logits, dec.temperature, dec.gen)
    score = float(torch.softmax(logits, -1).max())
    return Draft(tok, source, score, draft_probs(logits, dec.temperature))


def entropy(logits: torch.Tensor, normalize: bool = True) -> float:
    lsm = torch.log_softmax(logits, -1)
    h = float(-(lsm.exp() * lsm).sum())
    return h / math.log(logits.shape[-1]) if normalize else h


class BigOnly(Policy):
    name = "big"


class SmallOnly(Policy):
    """The small LM writes everything; the big model is never run (except to verify, if asked)."""
    name = "small"

    def __init__(self, small: Backend):
        super().__init__()
        self.small = small
        self.backends = [small]

    def propose(self, dec):
        self.calls += 1
        return [lm_draft(catch_up(self.small, dec.ids)[0][-1], dec, self.source)]


class Ratio(Policy):
    """Seed 000 exactly: generated token i (0-based) comes from the small model iff
    i >= min_tokens and (i - min_tokens) % int(1/r) == 0; tokens before min_tokens are the big model's
    scaffold. r = 0 is the big model only."""
    name = "ratio"

    def __init__(self, small: Backend | None, ratio: float, min_tokens: int = 10):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1] (share of small-model tokens), got {ratio}")
        if min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if ratio > 0 and small is None:
            raise ValueError("ratio > 0 needs a small model")
        self.small, self.ratio, self.min_tokens = small, ratio, min_tokens
        self.interval = int(1 / ratio) if ratio > 0 else 0
        self.backends = [small] if small is not None else []

    def use_small(self, i: int) -> bool:
        return self.interval > 0 and i >= self.min_tokens and (i - self.min_tokens) % self.interval == 0

    def propose(self, dec):
        if not self.use_small(dec.n_new):
            return []
        self.calls += 1
        return [lm_draft(catch_up(self.small, dec.ids)[0][-1], dec, self.source)]

    def big_source(self, dec):
        return "scaffold" if dec.n_new < self.min_tokens else "big"


class Entropy(Policy):
    """Seed 001: the small model generates; the big model takes the next token when the small model's
    entropy exceeds tau (normalised by log|V| unless normalize=False).

    span: the big model keeps the next `span` tokens once triggered, or "line": until it emits a newline.
    lookahead k: the small model drafts k tokens; all k are kept if their mean entropy is <= tau, else they
      are dropped and the big model takes the next token.
    adaptive: after `adapt_run` consecutive triggers tau shrinks by `adapt_step` (down to tau/2); after
      `adapt_run` consecutive confident decisions it grows (up to 2 tau).
    pattern: a regex; where the text so far ends with a match, the big model takes the next token
      (e.g. r"[(\\[{]" after an opening bracket, r"\\n" at a line start).
    """
    name = "entropy"

    def __init__(self, small: Backend, tau: float, *, normalize: bool = True, span: int | str = 1,
                 lookahead: int = 1, adaptive: bool = False, pattern: str | None = None, tokenizer=None,
                 adapt_run: int = 4, adapt_step: float = 0.1):
        super().__init__()
        if span != "line" and (not isinstance(span, int) or span < 1):
            raise ValueError(f"span must be a positive integer or 'line', got {span!r}")
        if lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        if (span == "line" or pattern) and tokenizer is None:
            raise ValueError("span='line' and pattern need the tokenizer")
        self.small, self.tau, self.normalize = small, tau, normalize
        self.span, self.lookahead, self.adaptive = span, lookahead, adaptive
        self.pattern = re.compile(f"(?:{pattern})\\Z") if pattern else None
        self.tokenizer = tokenizer
        self.adapt_run, self.adapt_step = adapt_run, adapt_step
        self.backends = [small]

    def start(self, dec):
        super().start(dec)
        self.tau_now = self.tau
        self.big_left, self.in_line = 0, False
        self.high_run = self.low_run = 0
        self.triggers = 0

    def propose(self, dec):
        if self.big_left > 0:              # inside a big-model span
            self.big_left -= 1
            return []
        if self.in_line:                   # inside a big-model line: until the big model emits a newline
            if "\n" not in self.tokenizer.decode(dec.ids[-1:]):
                return []
            self.in_line = False
        if self.pattern is not None and self.pattern.search(self.tokenizer.decode(dec.ids[-32:])):
            return self.trigger()
        if self.tau_now == -math.inf:      # nothing is confident enough: do not even run the small model
            return self.trigger()
        drafts, hs = [], []
        ids = list(dec.ids)
        for _ in range(self.lookahead):
            logits = catch_up(self.small, ids)[0][-1]
            self.calls += 1
            hs.append(entropy(logits, self.normalize))
            d = lm_draft(logits, dec, self.source)
            drafts.append(d)
            ids.append(d.token)
            if dec.n_new + len(drafts) >= dec.max_new or d.token in dec.eos:
                break
        high = not sum(hs) / len(hs) <= self.tau_now
        self.adapt(high)
        if not high:
            return drafts
        if self.small.n_cached > len(dec.ids):   # drop the rejected lookahead from the small cache
            self.small.crop(len(dec.ids))
        return self.trigger()

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


class Cascade(Policy):
    """Seed 001's multi-model cascade: levels[0] (the smallest) speaks when its entropy is <= taus[0],
    else levels[1] is asked with taus[1], ...; when every level is unsure, the big model speaks."""
    name = "cascade"

    def __init__(self, levels: list[Backend], taus: list[float], normalize: bool = True):
        super().__init__()
        if not levels or len(levels) != len(taus):
            raise ValueError(f"cascade: one threshold per predictor level ({len(levels)} levels, "
                             f"{len(taus)} thresholds)")
        self.levels, self.taus, self.normalize = list(levels), list(taus), normalize
        self.labels = ["small"] + [f"mid{i}" for i in range(1, len(levels))]
        self.backends = list(levels)

    def propose(self, dec):
        for b, tau, label in zip(self.levels, self.taus, self.labels):
            if tau == -math.inf:
                continue
            logits = catch_up(b, dec.ids)[0][-1]
            self.calls += 1
            if entropy(logits, self.normalize) <= tau:
                return [lm_draft(logits, dec, label)]
        return []


class Gate(Policy):
    """The learned gate (docs/interfaces.md, Drafter): at distance since_big from the big model's last
    computed position the drafter proposes a token and a score; skip while score >= threshold and
    since_big < max_skip. Multi-token skips come from the drafter's future-token heads."""
    name = "gate"
    source = "skip"

    def __init__(self, drafter, threshold: float | None = None, max_skip: int | None = None,
                 name: str | None = None):
        super().__init__()
        self.drafter = drafter
        self.threshold = drafter.threshold if threshold is None else threshold
        self.max_skip = drafter.max_skip if max_skip is None else min(max_skip, drafter.max_skip)
        self.backends = list(getattr(drafter, "backends", []))
        if name:
            self.name = name

    def start(self, dec):
        super().start(dec)
        dec.big.hidden_layer = self.drafter.hidden_layer
        if hasattr(self.drafter, "start"):
            self.drafter.start()

    def propose(self, dec):
        s = dec.since_big
        if dec.big.n_cached == 0 or not 1 <= s < self.max_skip:
            return []
        tok, score = self.drafter.propose(dec.ids, dec.big_hidden, s)
        self.calls += 1
        return [Draft(int(tok), self.source, float(score))] if score >= self.threshold else []


__all__ = ["BigOnly", "SmallOnly", "Ratio", "Entropy", "Cascade", "Gate", "entropy", "lm_draft"]
