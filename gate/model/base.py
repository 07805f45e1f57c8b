"""`Drafter`: what the `gate` decode policy calls, with defaults for its optional members.

    tok, score = drafter.propose(ids, hidden, since_big)   # candidate for len(ids), P(it is the big model's)

The policy skips while score >= threshold and since_big < max_skip. Every drafter subclasses this class: the
heads drafter (gate/model/heads_drafter.py), EagleDrafter (eagle.py), RouterDrafter (router.py) and
SmallLMDrafter (gate/decode/drafters.py); docs/interfaces.md describes the contract.
"""
from __future__ import annotations

from typing import Sequence

import torch

from runtimes.backend import LM


class Drafter:
    """The contract; a subclass sets hidden_layer, threshold and max_skip and defines propose."""
    hidden_layer: int | None      # the big model's layer it reads (HF numbering); None: it reads none
    threshold: float              # skip while score >= threshold (a calibrated value may be 2.0: never)
    max_skip: int                 # skip only while since_big < max_skip
    reads_all_hidden = False      # propose gets every hidden row the big model computed [big_cached, d], not the last
    lms: tuple[LM, ...] = ()      # the predictor views it calls: the decode loop keeps their caches in step
    last_logits: torch.Tensor | None = None   # next-token logits [V] behind the last proposal, if any: sampled
    #                                            decoding drafts a sample of them (speculative sampling)
    steps = 0                     # draft steps so far (the ledger's)
    copies = None                 # a CopyIndex over the text, where the drafter grades the copy rule
    scoring = None                # and its SourceMaps (gate/model/precision.py); extend: how far a match is measured
    extend = 0

    def start(self) -> None:
        """A new text begins: forget per-text state."""

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        """(candidate for position len(ids), estimated P(candidate == the big model's greedy token))."""
        raise NotImplementedError

    def propose_free(self, ids: Sequence[int]) -> tuple[int, float] | None:
        """The drafter's source that costs nothing, the copy rule, alone: (candidate, score on the drafter's scale),
        or None where it has no copy source or no precision map for it (older artifacts). The gate was not asked,
        so the score is the copy map's lower estimate over its two verdicts (agreeing with the copy or not)."""
        alone = getattr(self.scoring, "copy_alone", None)
        if self.copies is None or alone is None:
            return None
        self.copies.sync(ids)
        tok, n = self.copies.query(self.extend)
        score = alone(n)
        return None if score is None else (int(tok), score)


__all__ = ["Drafter"]
