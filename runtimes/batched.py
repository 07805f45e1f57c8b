"""Many sequences in one llama.cpp context: one SlotBackend (the Backend protocol) per sequence, one pass per round.

    slots = LlamaCppSlots("model.gguf", n_slots=16, slot_ctx=512)       # one context, a KV stream per slot
    sched = Scheduler()
    sched.run([partial(job, slots.slot(i)) for i in range(16)])          # each job calls slot.forward(...)

Each job runs in a greenlet on this thread. `SlotBackend.forward` does not decode: it files its tokens with the
scheduler and waits. When every live job waits, the scheduler feeds all their tokens to llama.cpp in one
llama_batch (a sequence id per token; a prompt longer than PREFILL_CHUNK goes in over several rounds so it does
not stall the others), hands each job the rows it asked for and resumes it. Every llama.cpp call is made from
this one thread. Each slot has its own KV stream (kv_unified off): on a model whose batched passes are bit-exact
(SmolLM2 Q4_1) a sequence's logits do not depend on the others in the pass (tests/test_parallel.py). Hidden
states as on LlamaCppBackend: one setting (a layer or a tuple of layers) for the whole context.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from greenlet import getcurrent, greenlet

from runtimes.backend import HiddenLayer
from runtimes.info import ContextLengthError
from runtimes.llamacpp import UBATCH, LlamaCppBackend

PREFILL_CHUNK = 64   # prompt tokens a slot feeds per round: a long prompt shares the passes instead of stalling them


class LlamaCppSlots(LlamaCppBackend):
    """A GGUF in llama.cpp with `n_slots` sequences of `slot_ctx` tokens each; `slot(i)` is sequence i's backend.
    Its own forward/crop/reset are not used: the slots' are."""

    def __init__(self, model: str | os.PathLike, n_slots: int, slot_ctx: int, name: str = "",
                 hidden_layer: HiddenLayer = None, n_threads: int | None = None, n_ubatch: int = UBATCH,
                 weights_of: LlamaCppBackend | None = None):
        if n_slots < 1 or slot_ctx < 1:
            raise ValueError(f"{n_slots} slots of {slot_ctx} tokens: both must be >= 1")
        self.n_seq = n_slots
        super().__init__(model, name=name, hidden_layer=hidden_layer, n_ctx=n_slots * slot_ctx,
                         n_threads=n_threads, n_ubatch=n_ubatch, weights_of=weights_of)
        self.slot_ctx = self.n_ctx // n_slots      # llama.cpp may round the context up
        self._seq = [self._batch.seq_id[i] for i in range(self.n_ctx)]   # per-token seq id cells, set per pass
        self.slots = [SlotBackend(self, i) for i in range(n_slots)]

    def slot(self, i: int) -> "SlotBackend":
        return self.slots[i]

    def decode(self, parts: list[tuple[int, Sequence[int], int]]) -> list[tuple[int, int]]:
        """One pass over parts [(seq, tokens, keep)], each appended to its sequence's cache (its slot's n_cached
        grows); returns, per part, (first output row, rows): its kept rows in the output buffers (see rows())."""
        n = sum(len(t) for _, t, _ in parts)
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens in one pass: more than the context's {self.n_ctx}")
        at, out, spans = 0, 0, []
        for seq, tokens, keep in parts:
            k = len(tokens)
            slot = self.slots[seq]
            ids = np.asarray(tokens, dtype=np.int64)
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                raise ValueError(f"{self.name}: token ids must lie in 0..{self.vocab_size - 1}")
            self._tok[at:at + k] = ids
            self._pos[at:at + k] = np.arange(slot.n_cached, slot.n_cached + k)
            for i in range(at, at + k):
                self._seq[i][0] = seq
            # with the post-norm state on llama.cpp outputs every row (embeddings mode): flag them all, keep the last
            first = 0 if self._post_norm else k - keep
            self._flags[at:at + first] = 0
            self._flags[at + first:at + k] = 1
            spans.append((out + (k - first) - keep, keep))
            out += k - first
            at += k
            slot.n_cached += k
        self._batch.n_tokens = n
        self._out_tokens = np.flatnonzero(self._flags[:n])   # output row -> batch token (hidden rows are by token)
        rc = self.lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"{self.name}: llama_decode failed (code {rc}) on a pass of {n} tokens")
        self.calls += 1
        self.tokens_fed += n
        return spans

    def rows(self, first: int, keep: int, hidden_rows: int = 0):
        """(logits [keep, V], hidden [hidden_rows or keep, d] or None) of output rows first.., as views."""
        logits = self._rows(self.lib.llama_get_logits(self._ctx), first + keep, self.vocab_size, False)[first:]
        hidden = None
        if self._layers:
            end = int(self._out_tokens[first + keep - 1]) + 1   # the part's last token: its rows end there
            hidden = self._hidden_rows(end - (hidden_rows or keep), hidden_rows or keep, False)
        return logits, hidden

    def copy_sequence(self, src: int, dst: int) -> None:
        """Give sequence dst (empty) the cache of sequence src: a shared prefix without feeding it again."""
        self.remove(dst, 0)
        self.lib.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
        self.slots[dst].n_cached = self.slots[src].n_cached

    def remove(self, seq: int, n: int) -> None:
        """Drop positions n.. of sequence seq from the cache."""
        if not self.lib.llama_memory_seq_rm(self._memory, seq, n, -1):
            raise RuntimeError(f"{self.name}: llama_memory_seq_rm could not crop sequence {seq} to {n}")
        slot = self.slots[seq]
        slot.n_cached = min(slot.n_cached, n)


class SlotBackend:
    """Sequence `seq` of a LlamaCppSlots context as a Backend: forward waits for the scheduler's next pass."""
    hidden_all = False

    def __init__(self, ctx: LlamaCppSlots, seq: int):
        self.ctx, self.seq = ctx, seq
        self.name, self.vocab_size, self.n_layers = ctx.name, ctx.vocab_size, ctx.n_layers
        self.hidden_size, self.path, self.n_threads = ctx.hidden_size, ctx.path, ctx.n_threads
        self.n_ctx = ctx.slot_ctx
        self.device = ctx.device
        self.n_cached = 0
        self.calls = self.tokens_fed = self.tokens_cropped = 0

    @property
    def hidden_layer(self) -> HiddenLayer:
        return self.ctx.hidden_layer

    @hidden_layer.setter
    def hidden_layer(self, layer: HiddenLayer) -> None:
        if layer != self.ctx.hidden_layer:   # one setting for the whole context: every slot runs one policy
            self.ctx.hidden_layer = layer

    def is_eog(self, token: int) -> bool:
        return self.ctx.is_eog(token)

    def forward(self, tokens: Sequence[int], keep: int | None = None, copy: bool = True):
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        keep = n if keep is None else max(1, min(keep, n))
        if self.n_cached + n > self.n_ctx:
            raise ContextLengthError(f"{self.name} slot {self.seq}: {self.n_cached:,} cached + {n:,} fed tokens, "
                                     f"more than the slot's {self.n_ctx:,} tokens of context")
        parent = getcurrent().parent
        if parent is None:
            raise RuntimeError("SlotBackend.forward runs inside a Scheduler job")
        logits, hidden = parent.switch(Request(self, list(tokens), keep))
        self.calls += 1
        self.tokens_fed += n
        if copy:
            logits = logits.clone()
            hidden = None if hidden is None else hidden.clone()
        return logits, hidden

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.n_cached:
            raise ValueError(f"crop({n}) outside 0..{self.n_cached}")
        if n < self.n_cached:
            self.tokens_cropped += self.n_cached - n
            self.ctx.remove(self.seq, n)

    def reset(self) -> None:
        self.ctx.remove(self.seq, 0)
        self.calls = self.tokens_fed = self.tokens_cropped = 0


@dataclass
class Request:
    """A slot's forward waiting for passes: tokens[done:] still to feed; the last `keep` rows are returned."""
    slot: SlotBackend
    tokens: list[int]
    keep: int
    done: int = 0
    hidden: list = field(default_factory=list)   # hidden rows of earlier chunks (hidden_all)


class Scheduler:
    """Runs jobs as greenlets and gathers their SlotBackend.forward calls into one pass per context per round."""

    def __init__(self, chunk: int = PREFILL_CHUNK):
        self.chunk = chunk
        self.rounds = 0

    def run(self, jobs: Sequence[Callable[[], None]]) -> None:
        """Run every job to its end. A job's exception ends the run (after the others were dropped).

        Inside inference mode: torch keeps grad mode per thread, and the jobs' `@torch.inference_mode()` scopes
        open and close interleaved on this one thread, so the last to close would otherwise restore the state an
        earlier one had left (grad off) to the caller; the outer scope gives the caller its own back."""
        waiting: dict[greenlet, Request] = {}
        with torch.inference_mode():
            for job in jobs:
                self._resume(greenlet(job), None, waiting)
            while waiting:
                self._round(waiting)

    def _resume(self, g: greenlet, value, waiting: dict) -> None:
        req = g.switch() if value is None else g.switch(value)
        if not g.dead:
            if not isinstance(req, Request):
                raise RuntimeError(f"a scheduler job switched back with {req!r}, not a Request")
            waiting[g] = req

    def _round(self, waiting: dict) -> None:
        """One pass per context over every waiting request's next chunk; resume the requests that are complete."""
        by_ctx: dict[int, list[tuple[greenlet, Request, list[int]]]] = {}
        for g, req in waiting.items():
            rest = req.tokens[req.done:]
            # a prompt goes in chunks; the last piece holds every row the request keeps
            piece = rest[:min(self.chunk, len(rest) - req.keep)] if len(rest) > max(self.chunk, req.keep) else rest
            by_ctx.setdefault(id(req.slot.ctx), []).append((g, req, piece))
        self.rounds += 1
        ready = []
        for group in by_ctx.values():
            ctx = group[0][1].slot.ctx
            parts = []
            for _, req, piece in group:
                last = req.done + len(piece) == len(req.tokens)
                parts.append((req.slot.seq, piece, req.keep if last else 1))
            spans = ctx.decode(parts)
            for (g, req, piece), (first, keep) in zip(group, spans):
                req.done += len(piece)
                all_rows = req.slot.hidden_all and ctx.hidden_layer is not None
                if req.done < len(req.tokens):
                    if all_rows:
                        req.hidden.append(ctx.rows(first, keep, len(piece))[1].clone())
                    continue
                logits, hidden = ctx.rows(first, keep, len(piece) if all_rows else 0)
                if all_rows:
                    hidden = torch.cat([*req.hidden, hidden])
                ready.append((g, (logits, hidden)))
        for g, out in ready:
            del waiting[g]
            # the views stay valid until the next pass, which only runs once every job waits again
            self._resume(g, out, waiting)
