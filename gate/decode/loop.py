"""The decode loop: a policy proposes tokens that skip the big model; the big model catches up in one pass.

    result = Decoder(big, policy, verify=True, temperature=0.0).generate(prompt_ids, max_new_tokens)

Each step the policy returns drafts (tokens emitted without a big-model pass) or nothing, then the big model
produces the next token; a big pass feeds every token the big cache lacks at once (catch-up), so every cache
holds exactly the emitted text. The loop owns every cache: a policy sees a read-only `DecodeState` and calls its
predictors through `LM` views, which the loop resets, crops and counts. With verify, the catch-up rows check the
drafts and the first mismatch rolls back: greedy + verify gives exactly the big model's greedy output (float32),
sampled + verify the big model's distribution (speculative sampling). `verify_below` is the lossy/lossless dial
(only drafts scored below it are checked; an `audit` judges the rest: audit.py). How and why: docs/decode.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch

from gate.decode.audit import Audit
from gate.decode.contract import BIG_SOURCES, DecodeState, Draft, Policy, sample_from, sample_token
from gate.decode.cost import Planner
from gate.decode.ledger import Ledger
from runtimes.backend import Backend


def keep_chance(q: torch.Tensor, draft: Draft) -> float:
    """The chance the speculative-sampling rule keeps `draft` when the big model samples from q: min(1, q(x)/p(x)),
    p the draft's own distribution (a point mass when it has none)."""
    p_x = 1.0 if draft.probs is None else float(draft.probs[draft.token])
    return min(1.0, float(q[draft.token]) / p_x) if p_x > 0 else 0.0


def accept_draft(logits: torch.Tensor, draft: Draft, temperature: float,
                 gen: torch.Generator | None) -> tuple[bool, int]:
    """(accepted, token): the big model's verdict on a draft, given its logits at the previous position."""
    if temperature <= 0:
        best = int(logits.argmax())
        return best == draft.token, best
    q = torch.softmax(logits / temperature, dim=-1)
    if float(torch.rand((), generator=gen)) < keep_chance(q, draft):
        return True, draft.token
    if draft.probs is None:   # a point mass at x: max(q - p, 0) is q without x
        residual = q.clone()
        residual[draft.token] = 0.0
    else:
        residual = (q - draft.probs).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:   # only when q == p up to rounding; q is then the right distribution
        residual = q
    return False, sample_from(residual, gen)


@dataclass
class Result:
    prompt_ids: list[int]
    ids: list[int]                      # generated tokens
    sources: list[str]                  # per generated token
    ledger: dict = field(default_factory=dict)   # Ledger.to_dict()


@dataclass
class Counts:
    drafted: int = 0
    verified: int = 0
    rollbacks: int = 0
    rolled_back_tokens: int = 0


class RowBuffer:
    """Every position's hidden rows in one buffer grown by doubling: a pass appends its own rows instead of copying
    the whole text's (3 layers x 576 floats a row for an EAGLE-3 head)."""

    def __init__(self):
        self.buf: torch.Tensor | None = None

    def put(self, at: int, rows: torch.Tensor) -> torch.Tensor:
        """Write rows at positions at.. (dropping what stood there and after); the rows 0 .. at+len(rows)-1."""
        end = at + len(rows)
        if self.buf is None or end > len(self.buf) or rows.shape[1:] != self.buf.shape[1:]:
            old = self.buf if self.buf is not None and rows.shape[1:] == self.buf.shape[1:] else None
            new = rows.new_empty((max(end, 256, 2 * len(old) if old is not None else 0), *rows.shape[1:]))
            if old is not None and at:
                new[:at] = old[:at]
            self.buf = new
        self.buf[at:end] = rows
        return self.buf[:end]


class Decoder:
    """Runs a policy against the big model; see the module docstring for the loop."""

    def __init__(self, big: Backend, policy: Policy, *, verify: bool = False,
                 verify_below: float = math.inf, temperature: float = 0.0, seed: int = 0,
                 eos_ids: Sequence[int] = (), on_final: Callable[[list[int], list[str]], None] | None = None,
                 planner: Planner | None = None, audit: Audit | None = None):
        self.big, self.policy = big, policy
        self.verify, self.verify_below = verify, verify_below
        # The planner sizes each draft chain by cost (gate/decode/cost.py); it needs every draft verified. In a lossy
        # decode it only holds back a costly drafter whose proposals have not paid (its free source still drafts).
        self.planner = planner if verify and math.isinf(verify_below) else None
        self.backoff = planner if self.planner is None else None
        self.temperature, self.seed = temperature, seed
        self.eos = frozenset(eos_ids)
        self.on_final = on_final        # streaming: gets tokens once no rollback can remove them
        # The audit judges unchecked skips by the big model's argmax: lossy greedy decoding only (docs/decode.md).
        lossless = verify and math.isinf(verify_below)
        self.audit = audit if not lossless and temperature <= 0 else None

    @property
    def plan(self) -> Planner | None:
        """This decode's planner: sizing chains (lossless) or only holding a costly drafter back (lossy)."""
        return self.planner or self.backoff

    @property
    def n_new(self) -> int:
        return len(self.ids) - self.n_prompt

    def state(self) -> DecodeState:
        return DecodeState(tuple(self.ids), self.n_new, self.big.n_cached, self.big_hidden, self.hidden_rows,
                           self.temperature, self.sample, self.eos, self.max_new)

    # -- the loop ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Result:
        if not prompt_ids:
            raise ValueError("empty prompt: the models need at least one token to condition on")
        self.start(prompt_ids, max_new_tokens)
        t0 = time.perf_counter()
        while True:
            if self.done():
                if not self.pending:
                    break
                self.big_step(emit=False)   # check the tail drafts; a rollback re-opens the loop
                continue
            self.step()
            self.finalize()
        wall = time.perf_counter() - t0
        self.finalize()
        return Result(list(prompt_ids), self.ids[self.n_prompt:], list(self.sources), self.ledger(wall))

    def start(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        lossless = self.verify and math.isinf(self.verify_below)
        self.max_pass = getattr(self.big, "exact_pass", None) if lossless else None   # probed before the reset
        self.big.reset()
        for lm in self.policy.lms:
            lm.reset()
        self.big.hidden_layer = self.policy.hidden_layer if self.policy.needs_big_hidden else None
        self.all_hidden = bool(self.policy.needs_big_hidden and self.policy.needs_all_hidden)
        self.big.hidden_all = self.all_hidden
        self.hidden_rows: torch.Tensor | None = None    # every position's hidden state, when all_hidden
        self.row_buffer = RowBuffer()
        self.gen = torch.Generator().manual_seed(self.seed)
        self.sample = partial(sample_token, temperature=self.temperature, gen=self.gen)
        self.ids, self.n_prompt, self.max_new = list(prompt_ids), len(prompt_ids), max_new_tokens
        self.sources: list[str] = []
        self.pending: list[tuple[int, Draft]] = []   # (position, draft) awaiting the big model's check
        self.unaudited: list[tuple[int, Draft]] = []  # unchecked skips awaiting the audit (with an audit)
        self.verify_live = self.verify_below         # the bar of unchecked skips under --verify-below: audited
        self.big_logits = self.big_hidden = None     # big model's outputs at position big.n_cached - 1
        self.n_final = self.n_prompt
        self.counts = Counts()
        self.policy_s = 0.0
        self.policy.calls = 0
        self.policy.start()
        if self.audit is not None:   # the bar an unchecked skip clears: T under --verify-below T, else the gate's
            bar = self.policy.threshold
            if self.verify:
                bar = self.verify_below if bar is None else max(bar, self.verify_below)
            self.audit.start(bar)
            if self.audit.bar != bar:       # carried over from the job's earlier texts (--audit-scope job)
                self.set_bar(self.audit.bar)
        self.plan0 = dict(self.plan.stats) if self.plan is not None else None
        self.cycle = (len(self.ids), self.policy.calls, True)     # (text length, proposals, ask the drafter)

    def room(self) -> int:
        """Drafts the next catch-up pass can still take: under a lossless verify no pass may be longer than the
        big backend's exact_pass (longer ones round differently from one-token steps); unbounded otherwise."""
        if self.max_pass is None:
            return 1 << 30
        return self.max_pass - (len(self.ids) - self.big.n_cached)

    def step(self) -> None:
        """One policy decision: emit its drafts, or let the big model catch up and speak."""
        if self.planner is not None:
            return self.planned_step()
        ask = self.cycle[2]
        drafts = (self.propose() if ask else self.propose_free())[:max(self.room(), 0)]
        self.keep_predictors(self.ids + [d.token for d in drafts])   # drop a lookahead the policy refused
        if not drafts:
            start, calls, _ = self.cycle
            fed = len(self.ids) - self.big.n_cached
            self.big_step(emit=True)
            if self.backoff is not None:    # one cycle: the skips since the last pass, that pass, its proposals
                self.backoff.observe_cycle(len(self.ids) - start, fed, self.policy.calls - calls)
                self.cycle = (len(self.ids), self.policy.calls, self.backoff.start_chain())
        for d in drafts:
            if self.done():
                break
            self.emit(d.token, d.source, d)
        self.keep_predictors(self.ids)                                # drafts cut by done()

    def propose(self) -> list[Draft]:
        t0 = time.perf_counter()
        drafts = self.policy.propose(self.state())
        dt = time.perf_counter() - t0
        self.policy_s += dt
        if self.plan is not None:
            self.plan.observe_draft_time(dt)
        return drafts

    def propose_free(self) -> list[Draft]:
        """The policy's free drafts: timed into the policy's time, not into the drafter's cost per proposal."""
        t0 = time.perf_counter()
        drafts = self.policy.propose_free(self.state())
        self.policy_s += time.perf_counter() - t0
        if drafts and self.plan is not None:
            self.plan.stats["free_drafts"] += len(drafts)
        return drafts

    def planned_step(self) -> None:
        """A draft chain sized by the planner: propose while a longer chain may pay, cut it to its best length
        (maybe none), then one big pass verifies what is left and speaks."""
        plan, acc = self.planner, self.planner.acceptance
        start, calls = len(self.ids), self.policy.calls
        probs: list[float] = []
        # a costly drafter held back by the planner still lets its free sources (the copy rule) draft
        propose = self.propose if plan.start_chain() else self.propose_free
        if self.room() > 0:
            while not self.done():
                drafts = propose()[:max(self.room(), 0)]
                self.keep_predictors(self.ids + [d.token for d in drafts])
                for d in drafts:
                    if self.done():
                        break
                    self.emit(d.token, d.source, d)
                    probs.append(acc.p(d.score, self.temperature > 0, len(probs) + 1))
                last = drafts[-1].score if drafts else 0.0
                if not drafts or self.room() <= 0 or not plan.extend(
                        probs, lambda depth: acc.p(last, self.temperature > 0, depth),
                        free=propose == self.propose_free):    # a held-back drafter's copies cost nothing
                    break
        keep = plan.cut(probs)
        shadow = None
        if start + keep < len(self.ids):
            shadow = next(d for q, d in self.pending if q == start + keep)
            self.drop_from(start + keep)
        self.keep_predictors(self.ids)
        fed = len(self.ids) - self.big.n_cached
        if not self.done() or self.pending:
            self.big_step(emit=not self.done())
        plan.observe_cycle(len(self.ids) - start, fed, self.policy.calls - calls)
        if shadow is not None and len(self.ids) > start + keep and self.sources[start + keep - self.n_prompt] == "big":
            # The big model spoke where the first dropped draft stood: a free label for the acceptance model.
            acc.update(shadow.score, self.draft_chance(self.big_logits, shadow), self.temperature > 0, keep + 1)

    def draft_chance(self, logits: torch.Tensor, draft: Draft) -> float:
        """The chance the verify rule would have accepted `draft` against these logits: 0/1 when greedy,
        min(1, q(x)/p(x)) when sampled."""
        if self.temperature <= 0:
            return float(int(logits.argmax()) == draft.token)
        return keep_chance(torch.softmax(logits / self.temperature, -1), draft)

    def drop_from(self, q: int) -> None:
        """Drop drafts ids[q:] that the planner cut before any pass saw them."""
        self.counts.drafted -= len(self.ids) - q
        del self.ids[q:]
        del self.sources[q - self.n_prompt:]
        self.pending = [(p, d) for p, d in self.pending if p < q]
        self.unaudited = [(p, d) for p, d in self.unaudited if p < q]
        for lm in self.policy.lms:
            lm.crop(q)

    def keep_predictors(self, text: Sequence[int]) -> None:
        for lm in self.policy.lms:
            lm.keep(text)

    def done(self) -> bool:
        return self.n_new >= self.max_new or (self.n_new > 0 and self.ids[-1] in self.eos)

    def emit(self, token: int, source: str, draft: Draft | None = None) -> None:
        if draft is not None:
            self.counts.drafted += 1
            if self.verify and draft.score < self.verify_live:
                self.pending.append((len(self.ids), draft))
            elif self.audit is not None:
                self.unaudited.append((len(self.ids), draft))
        self.ids.append(token)
        self.sources.append(source)

    def big_step(self, emit: bool) -> None:
        """Catch the big model up over every token it lacks, check pending drafts, emit its next token."""
        c = self.big.n_cached
        if c < len(self.ids):
            # Rows are needed from the first pending (or audited) draft's previous position on; else the last one.
            first = min(self.pending[0][0] if self.pending else len(self.ids),
                        self.unaudited[0][0] if self.unaudited else len(self.ids))
            keep = len(self.ids) - max(first - 1, c)
            logits, hidden = self.big.forward(self.ids[c:], keep=keep, copy=False)   # rows read once here
            if self.all_hidden:
                self.hidden_rows, hidden = self.row_buffer.put(c, hidden), hidden[-keep:]
            verdicts = self.audit_rows(logits, row0=len(self.ids) - keep)
            rolled_back = self.check_pending(logits, hidden, row0=len(self.ids) - keep)
            if verdicts:
                self.audit_pass(verdicts)
            if rolled_back:
                return
            # clone: the rows are views of the backend's output buffers (llama.cpp), rewritten by its next pass
            self.big_logits, self.big_hidden = logits[-1].clone(), (None if hidden is None else hidden[-1].clone())
        self.pending.clear()
        if emit:
            self.emit(self.sample(self.big_logits), self.policy.big_source(self.state()))

    def check_pending(self, logits: torch.Tensor, hidden: torch.Tensor | None, row0: int) -> bool:
        """Check the pending drafts against a catch-up pass whose logits[0] is at position row0; at the
        first refused one roll back and emit the big model's token there (True)."""
        for depth, (q, d) in enumerate(self.pending, 1):   # a planned chain's drafts are all pending
            i = q - 1 - row0
            row = logits[i] if i >= 0 else self.big_logits
            self.counts.verified += 1
            ok, tok = accept_draft(row, d, self.temperature, self.gen)
            if self.planner is not None:
                self.planner.acceptance.update(d.score, ok, self.temperature > 0, depth)
            if not ok:
                self.rollback(q)
                self.big_logits = row.clone()
                self.big_hidden = None if hidden is None else (hidden[i].clone() if i >= 0 else self.big_hidden)
                self.emit(tok, "big")
                return True
        return False

    def audit_rows(self, logits: torch.Tensor, row0: int) -> list[tuple[int, bool]]:
        """(position, is the big model's argmax) of every unchecked skip this pass covers (its logits[0] at row0)."""
        if not self.unaudited:
            return []
        best = logits.argmax(-1)
        out = [(q, int(best[q - 1 - row0] if q - 1 - row0 >= 0 else self.big_logits.argmax()) == d.token)
               for q, d in self.unaudited]
        self.unaudited.clear()
        return out

    def audit_pass(self, verdicts: list[tuple[int, bool]]) -> None:
        """Count the verdicts on skips still in the text (a rollback in the same pass drops those after it) and
        move the bar if the audit says so."""
        checks = [(q - self.n_prompt, ok) for q, ok in verdicts if q < len(self.ids)]
        new = self.audit.observe(len(self.ids) - self.n_prompt, checks)
        if new is not None:
            self.set_bar(new)

    def set_bar(self, bar: float) -> None:
        """The audit's bar for unchecked skips: T under --verify-below T, else the gate's live threshold."""
        if self.verify:
            self.verify_live = bar
        else:
            self.policy.live_threshold = bar

    def rollback(self, q: int) -> None:
        """Drop ids[q:] and crop every cache to the kept text."""
        self.counts.rollbacks += 1
        self.counts.rolled_back_tokens += len(self.ids) - q
        del self.ids[q:]
        del self.sources[q - self.n_prompt:]
        self.pending.clear()
        self.unaudited = [(p, d) for p, d in self.unaudited if p < q]
        if self.big.n_cached > q:
            self.big.crop(q)
        if self.hidden_rows is not None:
            self.hidden_rows = self.hidden_rows[:self.big.n_cached]
        for lm in self.policy.lms:
            lm.crop(q)

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
        predictors = [lm.backend for lm in self.policy.lms]
        return Ledger(
            policy=self.policy.name, verify=self.verify,
            verify_below=None if math.isinf(self.verify_below) else self.verify_below,
            temperature=self.temperature, seed=self.seed,
            prompt_tokens=self.n_prompt, new_tokens=n, by_source=by_source,
            big_emitted=big_emitted, skipped=n - big_emitted,
            big_calls=self.big.calls, big_tokens_fed=self.big.tokens_fed,
            big_tokens_cropped=self.big.tokens_cropped,
            big_calls_per_token=self.big.calls / n if n else 0.0,
            predictor_calls=self.policy.calls,
            predictor_tokens_fed=sum(b.tokens_fed for b in predictors),
            policy_s=round(self.policy_s, 4), draft_steps=self.policy.draft_steps,
            drafted=self.counts.drafted, verified=self.counts.verified, rollbacks=self.counts.rollbacks,
            rolled_back_tokens=self.counts.rolled_back_tokens,
            stopped="eos" if n and self.ids[-1] in self.eos else "max_new_tokens",
            wall_s=round(wall, 4), tokens_per_s=round(n / wall, 3) if wall > 0 else 0.0,
            models=backend_counters(self.big, predictors), plan=self.plan_counts(),
            audit=self.audit.report(not_audited=len(self.unaudited)) if self.audit is not None else None).to_dict()

    def plan_counts(self) -> dict | None:
        p = self.plan
        if p is None:
            return None
        return dict({k: v - self.plan0[k] for k, v in p.stats.items()}, step_ms=p.profile.step_ms,
                    draft_ms=round(p.draft_ms, 4), max_chain=p.max_chain, rate=round(p.lam, 3),
                    acceptance=p.acceptance.learned())


def backend_counters(big: Backend, predictors: Sequence[Backend]) -> dict:
    """Per-backend counters for the ledger, keyed by name (a repeated name gets #index)."""
    models: dict[str, dict] = {}
    for role, b in [("big", big)] + [("predictor", b) for b in predictors]:
        key = b.name if b.name not in models else f"{b.name}#{len(models)}"
        models[key] = dict(role=role, calls=b.calls, tokens_fed=b.tokens_fed,
                           tokens_cropped=b.tokens_cropped, n_cached=b.n_cached)
    return models


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


__all__ = ["Decoder", "Result", "accept_draft", "keep_chance", "check_output"]
