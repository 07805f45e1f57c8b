"""Evaluation (gate/train/evaluate.py): the teacher-forced policy walk and run lengths, checked by hand."""
import numpy as np
import pytest


def test_policy_simulation_and_run_lengths():
    """Hand-checked walk: one stretch of 8 positions, max_skip 3 (skip at s = 1, 2)."""
    from gate.train.evaluate import safe_run_lengths, simulate_policy
    n, max_s = 8, 2
    run_start = np.zeros(n, dtype=np.int64)
    argmax = np.arange(100, 108)
    # score 1 everywhere except (t=4, s=1); candidate right except at (t=2, s=2)
    scores = {j: np.ones(n) for j in (1, 2)}
    scores[1][4] = 0.0
    cand = {j: argmax.copy() for j in (1, 2)}
    cand[2][2] = -5
    r = simulate_policy(scores, argmax, cand, run_start, threshold=0.5, max_skip=3)
    # t=0 big; t=1 s=1 skip; t=2 s=2 skip (wrong); t=3 s=3 -> big; t=4 s=1 score 0 -> big;
    # t=5 s=1 skip; t=6 s=2 skip; t=7 s=3 -> big
    assert r["skipped"] == 4 and r["positions"] == 7 and r["errors"] == 1
    assert r["precision"] == pytest.approx(0.75)
    assert r["skip_run_hist"] == [2, 0, 2]                  # after the big passes at 0, 3, 4, 7: runs 2, 0, 2, 0
    correct = {j: cand[j] == argmax for j in (1, 2)}
    hist = safe_run_lengths(correct, run_start, max_s)
    # from p: (p+1, s=1) and (p+2, s=2) correct? p=0: (1,1) ok, (2,2) wrong -> 1; p=1..6: 2 if p+2 < 8 ...
    assert sum(hist) == n - 1 and hist[1] == 2 and hist[2] == 5
