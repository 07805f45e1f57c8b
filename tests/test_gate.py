"""Gate: features, classifiers on synthetic data with a known answer, curves, and the calibration guarantee."""
import math

import numpy as np
import pytest
import torch

from corpus_tools import inventory as inv
from gate.model import features as gm


pytestmark = pytest.mark.usefixtures("one_thread")


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_candidates_and_features_known_values():
    # R = 3 tokens (ids 10, 11, 12) + other; vocabulary of 20
    rids = torch.tensor([10, 11, 12])
    rmap = np.full(20, 3)
    rmap[[10, 11, 12]] = [0, 1, 2]
    pw = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.1, 0.2, 0.6]])
    pf = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.5, 0.1, 0.3, 0.1]])
    kind = np.full(20, inv.WORD, dtype=np.int8)
    kind[11] = inv.PUNCT
    cls = np.full(20, inv.WORD_START, dtype=np.int8)
    cls[11] = 0                                  # punct
    cls[[12, 15]] = inv.CONTINUATION
    tables = {"kind": kind, "cls": cls, "ends_alnum": np.ones(20, dtype=bool)}
    last = torch.tensor([5, 5])
    s = torch.tensor([1, 2])
    z = torch.zeros(2, 2)
    # training-text n-gram: row 0 proposes 11 (seen 4 times, p 0.75); row 1 a context seen once (ignored: < 2)
    ngram = {"top1": np.array([11, 13]), "p1": np.array([0.75, 1.0]), "n1": np.array([4, 1]),
             "top2": np.array([-1, -1]), "p2": np.zeros(2), "n2": np.zeros(2),
             "top3": np.array([-1, -1]), "p3": np.zeros(2), "n3": np.zeros(2)}
    # in-context copy: row 1 proposes 15 (outside R), seen once
    copy = {"top1": np.array([10, 15]), "p1": np.array([1.0, 1.0]), "n1": np.array([2, 1]),
            "top2": np.array([-1, 15]), "p2": np.array([0.0, 1.0]), "n2": np.array([0, 1]),
            "top3": np.array([-1, -1]), "p3": np.zeros(2), "n3": np.zeros(2)}
    o = gm.compute_features(pw, pf, "word", rids, rmap, last, s, z, tables, 3, ngram, copy)
    # slots: head1, head2, ngram, copy; duplicates of earlier slots are empty (-1)
    assert o["cands"].tolist() == [[10, 11, -1, -1], [12, 10, -1, 15]]
    assert o["valid"].tolist() == [[True, True, False, False], [True, True, False, True]]
    names = gm.feature_names(3, 2)
    X = {n: o["X"][..., i] for i, n in enumerate(names)}
    assert o["X"].shape == (2, 4, len(names))
    assert torch.allclose(X["p_head"][0, :2], torch.tensor([0.7, 0.2]))
    assert X["p_head"][1, 3] == 0.0                                     # 15 is outside R
    assert X["is_head1"][0].tolist() == [1, 0, 0, 0] and X["is_head2"][1].tolist() == [0, 1, 0, 0]
    assert X["ng_match"][0].tolist() == [0, 1, 0, 0] and X["ng_p"][0, 1] == pytest.approx(0.75)
    assert X["ng_match"][1].sum() == 0                                  # seen once: below the table's minimum
    assert X["cp_match"][0].tolist() == [1, 0, 0, 0] and X["cp_match"][1].tolist() == [0, 0, 0, 1]
    assert X["cp_order"][1, 3] == pytest.approx(2 / 3)                  # backed off to the order-2 match
    assert X["n_sources"][0].tolist() == [2, 1, 0, 0]                   # 10: head + copy; 11: head2 + n-gram
    assert torch.allclose(X["head_pmax"][:, 0], torch.tensor([0.7, 0.2]))
    assert torch.allclose(X["head_margin"][:, 0], torch.tensor([0.5, 0.1]))
    ent = -(pw * pw.log()).sum(1) / math.log(4)
    assert torch.allclose(X["head_entropy"][:, 0], ent) and torch.allclose(o["head_entropy"], ent)
    assert X["cand_continuation"][1].tolist() == [1, 0, 0, 1] and X["cand_punct"][0].tolist() == [0, 1, 0, 0]
    assert X["s_1"][0].tolist() == [1] * 4 and X["s_2"][1].tolist() == [1] * 4
    # selection: the best-scoring valid candidate
    scores = torch.tensor([[0.2, 0.9, 0.99, 0.1], [0.5, 0.4, 0.99, 0.7]])
    slot, tok, best = gm.select(scores, o)
    assert slot.tolist() == [1, 3] and tok.tolist() == [11, 15] and np.allclose(best, [0.9, 0.7])


def _synthetic(n, seed, w):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(w))).astype(np.float32)
    p = _sigmoid(X @ w - 1.0)
    y = (rng.random(n) < p).astype(np.float32)
    return X, y, p


def test_logistic_gate_recovers_known_weights():
    w = np.array([2.0, -1.0, 0.0, 0.5])
    X, y, _ = _synthetic(20000, 0, w)
    g = gm.LogisticGate().fit(X, y)
    # back to raw-feature weights: coef / scale
    est = (g.coef / g.scale).numpy()
    assert np.allclose(est, w, atol=0.12)
    Xt, _, pt = _synthetic(2000, 1, w)
    assert np.abs(g.score(Xt).numpy() - pt).mean() < 0.02
    g2 = gm.LogisticGate.from_state(g.state())
    assert torch.equal(g2.score(Xt), g.score(Xt))


def test_mlp_gate_learns_what_logistic_cannot():
    """XOR-like label: the MLP separates it, the linear model cannot (known answer: AUC 1 vs 0.5)."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6000, 3)).astype(np.float32)
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(np.float32)
    Xt = rng.normal(size=(2000, 3)).astype(np.float32)
    yt = ((Xt[:, 0] > 0) ^ (Xt[:, 1] > 0))
    mlp = gm.MLPGate(3).fit(X, y, seed=0, epochs=60, patience=10)
    lr = gm.LogisticGate().fit(X, y)
    assert roc_auc_score(yt, mlp.score(Xt).numpy()) > 0.95
    assert roc_auc_score(yt, lr.score(Xt).numpy()) < 0.6
    again = gm.MLPGate.from_state(mlp.state(), mlp.config())
    assert torch.equal(again.score(Xt), mlp.score(Xt))
    mlp2 = gm.MLPGate(3).fit(X, y, seed=0, epochs=60, patience=10)
    assert torch.equal(mlp2.score(Xt), mlp.score(Xt))          # deterministic for a seed


def test_precision_curve_and_coverage_at_precision():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.1])
    correct = np.array([1, 1, 0, 1, 0], dtype=bool)
    thr, cov, prec = gm.precision_curve(scores, correct)
    assert thr.tolist() == [0.9, 0.8, 0.7, 0.1]            # ties form one threshold
    assert cov.tolist() == [0.2, 0.6, 0.8, 1.0]
    assert np.allclose(prec, [1, 2 / 3, 3 / 4, 3 / 5])
    c = gm.coverage_at_precision(scores, correct, (0.7, 0.99))
    assert c[0.7] == 0.8 and c[0.99] == 0.2
    # oracle score: coverage at any precision = accuracy
    assert gm.coverage_at_precision(correct.astype(float), correct, (0.99,))[0.99] == pytest.approx(0.6)


def test_clopper_pearson_known_values():
    # zero errors in n: upper bound 1 - delta^(1/n)
    assert gm.clopper_pearson_upper(0, 100, 0.1) == pytest.approx(1 - 0.1 ** (1 / 100))
    assert gm.clopper_pearson_upper(5, 5, 0.1) == 1.0
    assert gm.clopper_pearson_upper(0, 0, 0.1) == 1.0
    from scipy.stats import binom
    u = gm.clopper_pearson_upper(7, 1000, 0.05)
    assert binom.cdf(7, 1000, u) == pytest.approx(0.05, rel=1e-6)


# a score distribution with a known error curve: score ~ U(0, 1), P(error | score = x) = 0.2 (1 - x)^2,
# so the error rate among score >= lam is 0.2 (1 - lam)^2 / 3; it is <= 1% iff lam >= 1 - sqrt(0.15)
def _true_risk(lam):
    return 0.2 * (1 - lam) ** 2 / 3


def _calib_set(n, rng):
    x = rng.random(n)
    err = rng.random(n) < 0.2 * (1 - x) ** 2
    return x, ~err


def test_ltt_bound_holds_on_simulated_calibration_sets():
    """Over many simulated calibration sets the realised error rate at the LTT threshold exceeds the target
    alpha at most delta of the time (plus Monte-Carlo slack); choosing the threshold naively (empirical
    precision >= 99%) violates it far more often."""
    rng = np.random.default_rng(0)
    alpha, delta, trials = 0.01, 0.1, 200
    viol_ltt = viol_naive = 0
    covs, certified = [], 0
    for _ in range(trials):
        x, ok = _calib_set(20000, rng)
        r = gm.ltt_calibrate(x, ok, 1 - alpha, delta)
        certified += r["certified"]
        viol_ltt += _true_risk(r["threshold"]) > alpha
        covs.append(r["coverage"])
        if r["certified"]:                           # p <= delta  <=>  CP upper bound <= alpha
            assert r["error_ucb"] <= alpha + 1e-12
        thr, cov, prec = gm.precision_curve(x, ok)
        lam_naive = thr[np.flatnonzero(prec >= 1 - alpha).max()]
        viol_naive += _true_risk(lam_naive) > alpha
    # binomial slack: P(Bin(200, 0.1) > 28) < 1%
    assert viol_ltt <= 28
    assert viol_naive / trials > 0.3
    assert certified >= 0.95 * trials
    # and it is not vacuous: coverage near the best achievable 1 - lam* = sqrt(0.15) = 0.387
    assert 0.2 < np.mean(covs) < math.sqrt(0.15)


def test_ltt_refuses_when_nothing_is_safe():
    rng = np.random.default_rng(1)
    x = rng.random(3000)
    ok = rng.random(3000) < 0.9                 # 10% errors everywhere: no threshold reaches 99%
    r = gm.ltt_calibrate(x, ok, 0.99, 0.1)
    assert not r["certified"] and r["threshold"] == gm.NEVER and r["coverage"] == 0
    assert (x >= r["threshold"]).sum() == 0
    with pytest.raises(ValueError):
        gm.ltt_calibrate(x, ok, 1.0, 0.1)


def test_ltt_fixed_sequence_stops_at_first_failure():
    """Scores where the top is clean, a middle band is bad and a lower band is clean again: the walk must stop
    in the bad band even though a lower threshold has good cumulative precision again."""
    n = 3000
    scores = np.r_[np.full(1000, 0.99), np.full(200, 0.9), np.full(1800, 0.5)]
    ok = np.r_[np.ones(1000, bool), np.zeros(200, bool) | (np.arange(200) % 4 == 0), np.ones(1800, bool)]
    r = gm.ltt_calibrate(scores, ok, 0.99, 0.1)
    assert r["threshold"] > 0.9 and r["n"] == 1000

    assert n == len(scores)


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
