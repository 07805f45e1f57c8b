"""The copy rule and copy-position marking against brute force on random token streams."""
from __future__ import annotations

import numpy as np
import pytest

from gate.model.copyrule import COPY_SPAN, CopyIndex, copy_rule, is_copy_position


def brute_force(ids: list[int], max_n: int) -> tuple[int, int]:
    """Longest suffix (<= max_n) of ids that occurred earlier; the token after its most recent occurrence."""
    t = len(ids) - 1
    for n in range(min(max_n, t), 0, -1):
        suffix = ids[t - n + 1:]
        for e in range(t - 1, n - 2, -1):          # most recent earlier end first
            if ids[e - n + 1:e + 1] == suffix:
                return ids[e + 1], n
    return -1, 0


def streams(seed: int, n_streams: int = 30):
    rng = np.random.default_rng(seed)
    for _ in range(n_streams):
        vocab = int(rng.integers(2, 12))          # small vocabularies: many repeats, long matches
        n = int(rng.integers(1, 80))
        ids = rng.integers(0, vocab, n).tolist()
        if n > 20 and rng.random() < 0.5:         # a loop, as greedy decoding makes
            ids += ids[-15:] * 2
        yield ids


@pytest.mark.parametrize("max_n", [1, 4, 12])
def test_index_matches_brute_force_at_every_position(max_n):
    for ids in streams(max_n):
        index = CopyIndex(max_n)
        for t in range(len(ids)):
            index.sync(ids[:t + 1])
            assert index.query() == brute_force(ids[:t + 1], max_n), (ids[:t + 1], max_n)


def test_sync_rebuilds_after_a_rollback_or_another_text():
    ids = [1, 2, 3, 1, 2, 3, 1, 2]
    index = CopyIndex(6)
    index.sync(ids)
    assert index.query() == (3, 5)
    index.sync([1, 2, 3, 1, 2, 9, 1])          # rolled back at position 5 and went on differently
    assert index.query() == brute_force([1, 2, 3, 1, 2, 9, 1], 6)
    index.sync([5, 5, 5])                      # another text of the same length family
    assert index.query() == (5, 2)


def test_records_version_restarts_at_each_run():
    rng = np.random.default_rng(3)
    runs = [rng.integers(0, 5, n) for n in (30, 1, 45)]
    tokens = np.concatenate(runs)
    run_start = np.concatenate([np.full(len(r), sum(map(len, runs[:i]))) for i, r in enumerate(runs)])
    cand, length = copy_rule(tokens, run_start, max_n=8)
    for i in range(len(tokens)):
        ctx = tokens[run_start[i]:i + 1].tolist()
        assert (cand[i], length[i]) == brute_force(ctx, 8)


def test_copy_positions_are_those_whose_last_four_tokens_occurred_earlier():
    for ids in streams(7):
        _, length = copy_rule(np.array(ids), np.zeros(len(ids), dtype=np.int64), max_n=12)
        marks = is_copy_position(length)
        for t in range(len(ids)):
            last = ids[t - COPY_SPAN + 1:t + 1] if t >= COPY_SPAN - 1 else None
            earlier = last is not None and any(ids[e - COPY_SPAN + 1:e + 1] == last for e in range(COPY_SPAN - 1, t))
            assert marks[t] == earlier


def test_trust_copy_takes_the_copy_candidate_only_where_it_is_trusted_more():
    from gate.model.copyrule import trust_copy

    table = np.array([0, 0.2, 0.5, 0.9, 0.99], dtype=np.float32)
    tok, score, used = trust_copy(np.array([7, 7, 7]), np.array([0.95, 0.95, 0.1]),
                                  np.array([3, 3, -1]), np.array([4, 3, 0]), table)
    assert used.tolist() == [True, False, False]
    assert tok.tolist() == [3, 7, 7] and np.allclose(score, [0.99, 0.95, 0.1])


def test_index_after_rollbacks_equals_a_fresh_one():
    """sync() over texts that drop and re-grow their tail (rollbacks, cut draft chains) answers like an index
    built from scratch on the same text."""
    import random

    from gate.model.copyrule import CopyIndex

    rng = random.Random(0)
    text = [rng.randrange(5) for _ in range(60)]
    live = CopyIndex(6)
    for _ in range(200):
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + [rng.randrange(5) for _ in range(rng.randrange(8))]
        live.sync(text)
        fresh = CopyIndex(6)
        fresh.sync(text)
        if text:
            assert live.query() == fresh.query()
        assert live.ids == text and {n: {k: v for k, v in d.items()} for n, d in enumerate(live.ends)} == \
            {n: {k: v for k, v in d.items()} for n, d in enumerate(fresh.ends)}
