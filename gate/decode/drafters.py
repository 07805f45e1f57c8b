"""Drafters: what the `gate` policy asks for a token and a score (the Drafter contract of docs/interfaces.md).

`Drafter` is the protocol; the trained artifact (gate/model/drafter.py, `load_drafter`) is one implementation
and `SmallLMDrafter` another. `DrafterBase` gives the optional part of the protocol (`start`) a no-op default.

SmallLMDrafter is a small pre-trained LM with the big model's tokenizer serving as the gate's predictor: the
candidate is its argmax at the next position and the score its max-probability (BiLD's fallback rule). It reads
no big-model hidden state (hidden_layer = None, so the big backend computes none), and it can skip any number
of positions: its cache is caught up over the big model's tokens in one pass, like the big model's over the
skipped ones. It calls its model through an `LM` view, listed in `lms`, which the `gate` policy hands to the
loop so that the cache is cropped on rollback and counted in the ledger.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from gate.decode.backend import Backend
from gate.decode.loop import LM


class Drafter(Protocol):
    hidden_layer: int | None    # the big model's layer it reads (HF numbering); None: it reads none
    # reads_all_hidden (optional, default False): propose gets every position's hidden state [big_cached, d]
    # instead of the last one's (the feature head, gate/model/eagle.py)
    # last_logits (optional): next-token logits [V] behind the last proposal; with temperature > 0 the gate
    # policy then drafts a sample of them and speculative sampling keeps the big model's distribution
    threshold: float            # skip while score >= threshold (a calibrated value may be 2.0: never)
    max_skip: int               # skip only while since_big < max_skip

    def start(self) -> None:
        """A new text begins: forget per-text state."""

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        """(candidate for position len(ids), estimated P(candidate == the big model's greedy token))."""


class DrafterBase:
    """The optional members of the Drafter protocol with their defaults."""
    lms: tuple[LM, ...] = ()

    def start(self) -> None:
        pass


class SmallLMDrafter(DrafterBase):
    hidden_layer = None

    def __init__(self, small: Backend, threshold: float = 0.8, max_skip: int = 64):
        self.lm = LM(small)
        self.lms = (self.lm,)
        self.threshold = threshold
        self.max_skip = max_skip

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        p, tok = torch.softmax(self.lm(ids), -1).max(-1)
        return int(tok), float(p)
