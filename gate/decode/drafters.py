"""A small pre-trained LM with the big model's tokenizer, serving as the gate's predictor (issue 4, item 1c).

It satisfies the Drafter interface of docs/interfaces.md: the candidate is the small LM's argmax at the next
position and the score its max-probability (BiLD's fallback rule). It reads no big-model hidden state
(hidden_layer = None, so the big backend computes none), and it can skip any number of positions: its own
cache is caught up over the big model's tokens in one pass, like the big model's over the skipped ones.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gate.decode.backend import Backend, catch_up


class SmallLMDrafter:
    hidden_layer = None

    def __init__(self, small: Backend, threshold: float = 0.8, max_skip: int = 64):
        self.small = small
        self.threshold = threshold
        self.max_skip = max_skip
        self.backends = [small]   # the decode loop crops it on rollback and counts it in the ledger

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        logits = catch_up(self.small, ids)[0][-1]
        p, tok = torch.softmax(logits, -1).max(-1)
        return int(tok), float(p)
