"""Calibration (gate/train/calibration.py): curves, Clopper-Pearson bounds, and the Learn-then-Test guarantee
on simulated calibration sets with a known error curve."""
import math

import numpy as np
import pytest

from gate.train import calibration as C


def test_precision_curve_and_coverage_at_precision():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.1])
    correct = np.array([1, 1, 0, 1, 0], dtype=bool)
    thr, cov, prec = C.precision_curve(scores, correct)
    assert thr.tolist() == [0.9, 0.8, 0.7, 0.1]            # ties form one threshold
    assert cov.tolist() == [0.2, 0.6, 0.8, 1.0]
    assert np.allclose(prec, [1, 2 / 3, 3 / 4, 3 / 5])
    c = C.coverage_at_precision(scores, correct, (0.7, 0.99))
    assert c[0.7] == 0.8 and c[0.99] == 0.2
    # oracle score: coverage at any precision = accuracy
    assert C.coverage_at_precision(correct.astype(float), correct, (0.99,))[0.99] == pytest.approx(0.6)


def test_clopper_pearson_known_values():
    # zero errors in n: upper bound 1 - delta^(1/n)
    assert C.clopper_pearson_upper(0, 100, 0.1) == pytest.approx(1 - 0.1 ** (1 / 100))
    assert C.clopper_pearson_upper(5, 5, 0.1) == 1.0
    assert C.clopper_pearson_upper(0, 0, 0.1) == 1.0
    from scipy.stats import binom
    u = C.clopper_pearson_upper(7, 1000, 0.05)
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
    alpha, delta, trials = 0.01, 0.1, 100
    viol_ltt = viol_naive = 0
    covs, certified = [], 0
    for _ in range(trials):
        x, ok = _calib_set(20000, rng)
        r = C.ltt_calibrate(x, ok, 1 - alpha, delta)
        certified += r["certified"]
        viol_ltt += _true_risk(r["threshold"]) > alpha
        covs.append(r["coverage"])
        if r["certified"]:                           # p <= delta  <=>  CP upper bound <= alpha
            assert r["error_ucb"] <= alpha + 1e-12
        thr, cov, prec = C.precision_curve(x, ok)
        lam_naive = thr[np.flatnonzero(prec >= 1 - alpha).max()]
        viol_naive += _true_risk(lam_naive) > alpha
    # binomial slack: P(Bin(100, 0.1) > 18) < 0.5%
    assert viol_ltt <= 18
    assert viol_naive / trials > 0.3
    assert certified >= 0.95 * trials
    # and it is not vacuous: coverage near the best achievable 1 - lam* = sqrt(0.15) = 0.387
    assert 0.2 < np.mean(covs) < math.sqrt(0.15)


def _clustered_set(rng, heavy: bool, n_groups=312, size=64):
    """The same error curve in stretches of `size` positions; heavy: errors only in a tenth of the stretches
    (ten times as often there), as a loop copied wrongly fails many times, so the mean curve stays _true_risk."""
    g = np.repeat(np.arange(n_groups), size)
    m = np.where(rng.random(n_groups) < 0.1, 10.0, 0.0)[g] if heavy else np.ones(len(g))
    x = rng.random(len(g))
    return x, ~(rng.random(len(g)) < np.minimum(1, 0.2 * (1 - x) ** 2 * m)), g


def test_ltt_with_groups_keeps_delta_when_errors_cluster():
    """Errors in clusters: the plain walk (positions taken as independent) breaks the target far more often than
    delta; with the stretches as groups (counts deflated by the design effect) it keeps delta, and on independent
    errors the groups cost almost no coverage."""
    rng = np.random.default_rng(0)
    viol = {"plain": 0, "groups": 0}
    for _ in range(100):
        x, ok, g = _clustered_set(rng, heavy=True)
        viol["plain"] += _true_risk(C.ltt_calibrate(x, ok, 0.99, 0.1)["threshold"]) > 0.01
        r = C.ltt_calibrate(x, ok, 0.99, 0.1, groups=g)
        viol["groups"] += _true_risk(r["threshold"]) > 0.01
        assert not r["certified"] or r["deff"] >= 1
    assert viol["plain"] >= 20 and viol["groups"] <= 18, viol       # measured 25 and 11 with this seed
    cov = {"plain": [], "groups": []}
    for _ in range(20):
        x, ok, g = _clustered_set(rng, heavy=False)
        cov["plain"].append(C.ltt_calibrate(x, ok, 0.99, 0.1)["coverage"])
        cov["groups"].append(C.ltt_calibrate(x, ok, 0.99, 0.1, groups=g)["coverage"])
    assert np.mean(cov["groups"]) > 0.97 * np.mean(cov["plain"])


def test_cluster_deff_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    g, e = rng.integers(0, 7, 200), rng.random(200) < 0.2
    n_at = np.array([1, 10, 57, 200])
    got = C.cluster_deff(g, e, n_at)
    for n, d in zip(n_at, got):
        gg, ee = g[:n], e[:n].astype(float)
        k, p = ee.sum(), ee.mean()
        ids = np.unique(gg)
        if k == 0 or len(ids) < 2:
            assert d == 1
            continue
        var = len(ids) / (len(ids) - 1) * sum((ee[gg == i].sum() - p * (gg == i).sum()) ** 2 for i in ids) / n ** 2
        assert d == pytest.approx(max(1.0, var / (p * (1 - p) / n)))
    # real-valued counts: the binomial tail continued, equal to scipy's at integers
    from scipy.stats import binom
    assert C.binom_cdf_real(3, 500, 0.01) == pytest.approx(binom.cdf(3, 500, 0.01))


def test_ltt_refuses_when_nothing_is_safe():
    rng = np.random.default_rng(1)
    x = rng.random(3000)
    ok = rng.random(3000) < 0.9                 # 10% errors everywhere: no threshold reaches 99%
    r = C.ltt_calibrate(x, ok, 0.99, 0.1)
    assert not r["certified"] and r["threshold"] == C.NEVER and r["coverage"] == 0
    assert (x >= r["threshold"]).sum() == 0
    with pytest.raises(ValueError):
        C.ltt_calibrate(x, ok, 1.0, 0.1)


def test_ltt_fixed_sequence_stops_at_first_failure():
    """Scores where the top is clean, a middle band is bad and a lower band is clean again: the walk must stop
    in the bad band even though a lower threshold has good cumulative precision again."""
    n = 3000
    scores = np.r_[np.full(1000, 0.99), np.full(200, 0.9), np.full(1800, 0.5)]
    ok = np.r_[np.ones(1000, bool), np.zeros(200, bool) | (np.arange(200) % 4 == 0), np.ones(1800, bool)]
    r = C.ltt_calibrate(scores, ok, 0.99, 0.1)
    assert r["threshold"] > 0.9 and r["n"] == 1000

    assert n == len(scores)
