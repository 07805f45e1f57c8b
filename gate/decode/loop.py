"""The decode loop: a policy proposes tokens that skip the big model; the big model catches up in one pass.

Each step the policy either returns drafts (tokens emitted without a big-model pass: the small model's,
the gate's) or nothing, and then the big model produces the next token. A skipped position is not run
through the big model when it is skipped: the next big pass feeds every token the big cache lacks at once
(catch-up), so the big cache always holds exactly the emitted text, and the same holds for every predictor's
cache. Nothing else keeps state about the text: positions are len(ids) and backend.n_cached.

With verify, the catch-up rows also check the drafts: row i of a pass fed from position c holds the big
model's prediction for position c+i+1. At the first draft that differs from the big model's choice, the rest
is dropped, the big model's token is emitted and every cache is cropped back to the kept text. Greedy +
verify gives exactly the big model's greedy output (in float32; in bf16 a batched pass and a one-token pass
round differently and can break a near-tie between two logits the other way); with temperature > 0 the standard speculative-sampling
rule is used (accept draft x with probability min(1, q(x)/p(x)), else sample from max(q - p, 0)), so each
token is distributed exactly as the big model's sampling distribution (identically distributed, not the same
sample as a big-only run with the same seed). `verify_below` is the dial between lossy and lossless: only
drafts whose score is below it are checked (inf: all, lossless; the gate threshold: none, lossy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from gate.decode.backend import Backend, catch_up

BIG_SOURCES = ("big", "scaffold")   # tokens the big model generated; every other source is a skip


@dataclass
class Draft:
    token: int
    source: str                         # "small", "skip", "mid1", ...: how the streamer colors it
    score: float = 1.0                  # the predictor's confidence; verify_below compares it
    probs: torch.Tensor | None = None   # draft distribution when sampled; None = a deterministic proposal


def select(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def draft_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor | None:
    return torch.softmax(logits / temperature, dim=-1) if temperature > 0 else None


def accept_draft(logits: torch.Tensor, draft: Draft, temperature: float,
                 gen: torch.Generator | None) -> tuple[bool, int]:
    """(accepted, token): the big model's verdict on a draft, given its logits at the previous position."""
    if temperature <= 0:
        best = int(logits.argmax())
        return best == draft.token, best
    q = torch.softmax(logits / temperature, dim=-1)
    p_x = 1.0 if draft.probs is None else float(draft.probs[draft.token])
    if float(torch.rand((), generator=gen)) * p_x < float(q[draft.token]):
        return True, draft.token
    if draft.probs is None:   # a point mass at x: max(q - p, 0) is q without x
        residual = q.clone()
        residual[draft.token] = 0.0
    else:
        residual = (q - draft.probs).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:   # only when q == p up to rounding; q is then the right distribution
        residual = q
    return False, int(torch.multinomial(residual, 1, generator=gen))


class Policy:
    """Decides, position by position, whether a predictor or the big model produces the next token."""
    name = "policy"
    source = "small"

    def __init__(self) -> None:
        self.backends: list[Backend] = []   # predictor caches: cropped on rollback, counted in the ledger
        self.calls = 0                      # predictor invocations (forward calls or drafter proposals)

    def start(self, dec: "Decoder") -> None:
        self.calls = 0
        dec.big.hidden_layer = None   # hidden states cost a little; only the gate reads them

    def propose(self, dec: "Decoder") -> list[Draft]:
        """Drafts for positions len(dec.ids), ...; [] hands the next position to the big model."""
        return []

    def big_source(self, dec: "Decoder") -> str:
        return "big"


@dataclass
class Result:
    prompt_ids: list[int]
    ids: list[int]                      # generated tokens
    sources: list[str]                  # per generated token
    ledger: dict = field(default_factory=dict)


class Decoder:
    """Runs a policy against the big model; see the module docstring for the loop."""

    def __init__(self, big: Backend, policy: Policy, *, verify: bool = False,
                 verify_below: float = math.inf, temperature: float = 0.0, seed: int = 0,
                 eos_ids: Sequence[int] = (), on_final: Callable[[list[int], list[str]], None] | None = None):
        self.big, self.policy = big, policy
        self.verify, self.verify_below = verify, verify_below
        self.temperature, self.seed = temperature, seed
        self.eos = set(eos_ids)
        self.on_final = on_final        # streaming: gets tokens once no rollback can remove them

    # -- state helpers the policies use -----------------------------------------------------------------
    @property
    def n_new(self) -> int:
        return len(self.ids) - self.n_prompt

    @property
    def since_big(self) -> int:
        """Tokens in ids after the last position the big model has computed (the gate's distance)."""
        return len(self.ids) - self.big.n_cached

    def backends(self) -> list[Backend]:
        return [self.big, *self.policy.backends]

    # -- the loop ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Result:
        if not prompt_ids:
            raise ValueError("empty prompt: the models need at least one token to condition on")
        for b in self.backends():
            b.reset()
        self.gen = torch.Generator().manual_seed(self.seed)
        self.ids, self.n_prompt, self.max_new = list(prompt_ids), len(prompt_ids), max_new_tokens
        self.sources: list[str] = []
        self.pending: list[tuple[int, Draft]] = []   # (position, draft) awaiting the big model's check
        self.big_logits = self.big_hidden = None     # big model's outputs at position big.n_cached - 1
        self.n_final = self.n_prompt
        self.stats = dict(drafted=0, verified=0, rollbacks=0, rolled_back_tokens=0)
        self.policy.start(self)
        t0 = time.perf_counter()
        while True:
            if self.done():
                if not self.pending:
                    break
                self.big_step(emit=False)   # check the tail drafts; a rollback re-opens the loop
                continue
            drafts = self.policy.propose(self)
            if not drafts:
                self.big_step(emit=True)
            for d in drafts:
                if self.done():
                    break
                self.emit(d.token, d.source, d)
            for b in self.policy.backends:   # a predictor that ran ahead of drafts cut by done()
                if b.n_cached > len(self.ids):
                    b.crop(len(self.ids))
            self.finalize()
        wall = time.perf_counter() - t0
        self.finalize()
        return Result(list(prompt_ids), self.ids[self.n_prompt:], list(self.sources), self.ledger(wall))

    def done(self) -> bool:
        return self.n_new >= self.max_new or (self.n_new > 0 and self.ids[-1] in self.eos)

    def emit(self, token: int, source: str, draft: Draft | None = None) -> None:
        if draft is not None:
            self.stats["drafted"] += 1
            if self.verify and draft.score < self.verify_below:
                self.pending.append((len(self.ids), draft))
        self.ids.append(token)
        self.sources.append(source)

    def big_step(self, emit: bool) -> None:
        """Catch the big model up over every token it lacks, check pending drafts, emit its next token."""
        c = self.big.n_cached
        if c < len(self.ids):
            # Rows are needed from the first pending draft's previous position on; else only the last one.
            first = self.pending[0][0] if self.pending else len(self.ids)
            keep = len(self.ids) - max(first - 1, c)
            logits, hidden = self.big.forward(self.ids[c:], keep=keep)
            row0 = len(self.ids) - keep          # position of logits[0]
            for q, d in self.pending:
                i = q - 1 - row0
                row = logits[i] if i >= 0 else self.big_logits
                self.stats["verified"] += 1
                ok, tok = accept_draft(row, d, self.temperature, self.gen)
                if not ok:
                    self.rollback(q)
                    self.big_logits = row
                    self.big_hidden = None if hidden is None else (hidden[i] if i >= 0 else self.big_hidden)
                    self.emit(tok, "big")
                    return
            self.pending.clear()
            self.big_logits, self.big_hidden = logits[-1], (None if hidden is None else hidden[-1])
        self.pending.clear()
        if emit:
            self.emit(select(self.big_logits, self.temperature, self.gen), self.policy.big_source(self))

    def rollback(self, q: int) -> None:
        """Drop ids[q:] and crop every cache to the kept text."""
        dropped = len(self.ids) - q
        self.stats["rollbacks"] += 1
        self.stats["rolled_back_tokens"] += dropped
        del self.ids[q:]
        del self.sources[q - self.n_prompt:]
        self.pending.clear()
        for b in self.backends():
            if b.n_cached > q:
                b.crop(q)

    def finalize(self) -> None:
        """Hand tokens that no rollback can remove any more to the streamer."""
        end = self.pending[0][0] if self.pending else len(self.ids)
        if end > self.n_final:
            if self.on_final:
                a, b = self.n_final - self.n_prompt, end - self.n_prompt
                self.on_final(self.ids[self.n_final:end], self.sources[a:b])
            self.n_final = end

    # -- the cost ledger -------------------------------------------------------------------------------
    def ledger(self, wall: float) -> dict:
        n = self.n_new
        by_source: dict[str, int] = {}
        for s in self.sources:
            by_source[s] = by_source.get(s, 0) + 1
        big_emitted = sum(by_source.get(s, 0) for s in BIG_SOURCES)
        models = {}
        for role, b in [("big", self.big)] + [("predictor", b) for b in self.policy.backends]:
            key = b.name if b.name not in models else f"{b.name}#{len(models)}"
            models[key] = dict(role=role, calls=b.calls, tokens_fed=b.tokens_fed,
                               tokens_cropped=b.tokens_cropped, n_cached=b.n_cached)
        return dict(
            policy=self.policy.name, verify=self.verify,
            verify_below=None if math.isinf(self.verify_below) else self.verify_below,
            temperature=self.temperature, seed=self.seed,
            prompt_tokens=self.n_prompt, new_tokens=n, by_source=by_source,
            big_emitted=big_emitted, skipped=n - big_emitted,
            big_calls=self.big.calls, big_tokens_fed=self.big.tokens_fed,
            big_tokens_cropped=self.big.tokens_cropped,
            big_calls_per_token=self.big.calls / n if n else 0.0,
            predictor_calls=self.policy.calls,
            predictor_tokens_fed=sum(b.tokens_fed for b in self.policy.backends),
            **self.stats,
            stopped="eos" if n and self.ids[-1] in self.eos else "max_new_tokens",
            wall_s=round(wall, 4), tokens_per_s=round(n / wall, 3) if wall > 0 else 0.0,
            models=models)


@torch.inference_mode()
def check_output(big: Backend, prompt_ids: Sequence[int], new_ids: Sequence[int], tie_eps: float = 0.25) -> dict:
    """One teacher-forced big-model pass over prompt+output: on-policy error and NLL of the output.

    on_policy_error = share of generated tokens that differ from the big model's argmax on the same prefix.
    It is 0 for lossless greedy decoding up to near-ties: a batched pass and one-token passes round
    differently, and in bf16 (logits near 25 are 0.125 apart) that flips the argmax where two logits are
    (almost) equal. `beyond_ties` counts only mismatches where the emitted token's logit is more than tie_eps
    below the maximum. The pass uses a fresh cache; the backend's counters are restored afterwards.
    """
    n = len(new_ids)
    if n == 0:
        return dict(on_policy_error=0.0, mismatches=0, beyond_ties=0, first_mismatch=None, nll=0.0, ppl=1.0,
                    checked=0)
    saved = (big.calls, big.tokens_fed, big.tokens_cropped)
    big.reset()
    logits, _ = big.forward(list(prompt_ids) + list(new_ids), keep=n + 1)
    big.reset()
    big.calls, big.tokens_fed, big.tokens_cropped = saved
    rows = logits[:n]                     # row j predicts new_ids[j]
    target = torch.tensor(list(new_ids))
    mism = rows.argmax(-1) != target
    gap = rows.max(-1).values - rows.gather(1, target[:, None]).squeeze(1)
    nll = -torch.log_softmax(rows, -1).gather(1, target[:, None]).squeeze(1)
    first = int(mism.nonzero()[0]) if mism.any() else None
    return dict(on_policy_error=round(float(mism.float().mean()), 6), mismatches=int(mism.sum()),
                beyond_ties=int((mism & (gap > tie_eps)).sum()), first_mismatch=first,
                nll=round(float(nll.mean()), 6), ppl=round(float(nll.mean().exp()), 4), checked=n)


__all__ = ["Draft", "Policy", "Decoder", "Result", "select", "accept_draft", "draft_probs",
           "check_output", "catch_up", "BIG_SOURCES"]
