"""The copy rule: prompt lookup used as a gate, with no training; and which positions count as copies.

    index = CopyIndex(max_n=12)
    index.sync(ids)                       # incremental: O(max_n) per new or dropped token
    token, n = index.query(extend=64)     # the copy candidate for position len(ids), and its match length
    copy_rule(tokens, run_start, extend=64) -> (cand, match_len)   # the same at every recorded position

Candidate: the token that followed the most recent earlier occurrence of the longest suffix (up to max_n tokens)
of the context that occurred earlier; score: the match length n (0 = no candidate, token -1); with `extend`, a
match of max_n tokens is measured further back at that occurrence, up to `extend` tokens (`extend_match`). A copy
position (`is_copy_position`): its last COPY_SPAN = 4 tokens occurred earlier. Drafters grade the rule by
gate/model/precision.py; `trust_copy` serves older artifacts' `copy_trust` tables only. docs/drafters.md.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

COPY_SPAN = 4       # a position is a copy position when this many tokens before it occurred earlier
MAX_N = 12          # longest suffix the rule looks for


class CopyIndex:
    """Longest earlier occurrence of the text's suffix, kept up to date as tokens are appended or dropped.

    For each length n <= max_n, a dict maps every n-gram that ends before the last position to the end indices of
    its occurrences (the most recent last, so dropping tokens after a rollback restores the earlier ones). If the
    n-gram ending at the last position is not among them, no longer one is either (its suffix would be), so the
    search stops at the first miss.
    """

    def __init__(self, max_n: int = MAX_N):
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.max_n = max_n
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.ends: list[dict[tuple, list[int]]] = [{} for _ in range(self.max_n + 1)]

    def push(self, token: int) -> None:
        """Append one token: the n-grams ending at the previous last position become searchable."""
        i = len(self.ids) - 1
        for n in range(1, min(self.max_n, i + 1) + 1):
            self.ends[n].setdefault(tuple(self.ids[i - n + 1:i + 1]), []).append(i)
        self.ids.append(int(token))

    def pop(self) -> None:
        """Undo the last push."""
        self.ids.pop()
        i = len(self.ids) - 1
        for n in range(1, min(self.max_n, i + 1) + 1):
            key = tuple(self.ids[i - n + 1:i + 1])
            ends = self.ends[n][key]
            ends.pop()
            if not ends:
                del self.ends[n][key]

    def sync(self, ids: Sequence[int]) -> None:
        """Make the index describe `ids`: drop what the text no longer holds (a rollback), append what is new."""
        k = len(self.ids)
        if len(ids) < k or list(ids[:k]) != self.ids:   # a C-speed compare: cheap next to a model call
            common = next((i for i, (a, b) in enumerate(zip(self.ids, ids)) if a != b), min(k, len(ids)))
            for _ in range(k - common):
                self.pop()
            k = common
        for t in ids[k:]:
            self.push(t)

    def query(self, extend: int = 0) -> tuple[int, int]:
        """(candidate token, match length) for the position after the last token; (-1, 0) if none. A match of
        max_n tokens is measured on up to `extend` tokens at the occurrence found (extend_match)."""
        t = len(self.ids) - 1
        best_end, best_n = -1, 0
        for n in range(1, min(self.max_n, t) + 1):
            e = self.ends[n].get(tuple(self.ids[t - n + 1:]))
            if e is None:
                break
            best_end, best_n = e[-1], n
        if best_n == self.max_n and extend > best_n:
            best_n = extend_match(self.ids, t, best_end, best_n, extend)
        return (self.ids[best_end + 1], best_n) if best_n else (-1, 0)


def extend_match(ids: Sequence[int], t: int, e: int, n: int, limit: int) -> int:
    """The length of the common suffix of ids[..t] and ids[..e] (e < t), known to be >= n, counted up to `limit`:
    how far a capped match really reaches, at O(extra length) instead of one n-gram table per length."""
    while n < limit and n <= e and ids[t - n] == ids[e - n]:
        n += 1
    return n


def copy_rule(tokens: np.ndarray, run_start: np.ndarray, max_n: int = MAX_N,
              extend: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The copy rule at every recorded position: (candidate [N] int64, -1 for none; match length [N] int16).

    Row i holds the token at position t of a run (a book's consecutive recorded positions, starting at row
    run_start[i]); its context is the run's tokens up to and including row i. `extend`: as CopyIndex.query.
    """
    n = len(tokens)
    cand = np.full(n, -1, dtype=np.int64)
    length = np.zeros(n, dtype=np.int16)
    index = CopyIndex(max_n)
    for i in range(n):
        if run_start[i] == i:
            index.reset()
        index.push(int(tokens[i]))
        cand[i], length[i] = index.query(extend)
    return cand, length


def trust_copy(token: np.ndarray, score: np.ndarray, copy_token: np.ndarray, copy_len: np.ndarray,
               table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The learned gate's pick, or the copy candidate where the copy rule is trusted more: (token, score, used).

    Kept only for artifacts from before the precision maps (their drafter.json's `copy_trust`: per match length,
    a lower bound on the rule's precision, 1.0 where it cleared the target), which decode with it as they did;
    `train.py calibrate` replaces the table by maps (gate.model.precision.combine_sources calls this).
    """
    copy_len = np.minimum(np.asarray(copy_len, dtype=np.int64), len(table) - 1)
    copy_score = np.where(copy_len > 0, np.asarray(table)[copy_len], 0.0)
    used = copy_score > np.asarray(score)
    return (np.where(used, copy_token, token), np.where(used, copy_score, score).astype(np.float32), used)


def is_copy_position(match_len: np.ndarray) -> np.ndarray:
    """Copy positions: the last COPY_SPAN tokens occurred earlier in the context."""
    return np.asarray(match_len) >= COPY_SPAN


__all__ = ["CopyIndex", "copy_rule", "extend_match", "is_copy_position", "trust_copy", "COPY_SPAN", "MAX_N"]
