"""Precision/coverage curves and the gate's calibrated threshold with a finite-sample guarantee.

    ltt_calibrate(scores, correct, target_precision=0.99, delta=0.1) -> dict   # the threshold, JSON-able
    precision_curve(scores, correct); coverage_at_precision(scores, correct); clopper_pearson_upper(k, n, delta)

Contract: with probability >= 1 - delta the precision P(candidate == big argmax | score >= threshold) is at least
the target, for positions drawn like the calibration ones (Learn-then-Test, fixed-sequence testing on a grid fixed
before seeing data, threshold_grid). The fit calibrates every gate here on the validation split and the
evaluation reads the same curves on the test split; the drafter itself only stores the resulting threshold
(NEVER, from gate.model.features, when none was certified). The walk, why not just pick the threshold whose
validation precision is 99%, and what the bound does not cover:
docs/training.md#calibration-learn-then-test-gatetraincalibrationpy.
"""
from __future__ import annotations

import math

import numpy as np

from gate.model.features import NEVER


def precision_curve(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, coverage, precision) at every distinct score, highest first: skipping every position
    with score >= threshold covers `coverage` of the positions with `precision` of them correct."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(scores)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    cum = np.cumsum(c)
    last = np.r_[s[1:] != s[:-1], True]          # end of each tie group
    idx = np.flatnonzero(last)
    return s[idx], (idx + 1) / n, cum[idx] / (idx + 1)


def coverage_at_precision(scores, correct, targets=(0.95, 0.98, 0.99, 0.995)) -> dict[float, float]:
    """Largest coverage over thresholds whose precision is >= target (0 if none)."""
    _, cov, prec = precision_curve(scores, correct)
    out = {}
    for t in targets:
        ok = prec >= t - 1e-12
        out[t] = float(cov[ok].max()) if ok.any() else 0.0
    return out


# ------------------------------------------------------------------------------------------------ calibration
def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) upper confidence bound on a binomial rate from k errors in n trials."""
    from scipy.stats import beta
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    return float(beta.ppf(1 - delta, k + 1, n - k))


def threshold_grid(n: int = 1201, lo_logit: float = -8.0, hi_logit: float = 16.0) -> np.ndarray:
    """The fixed (data-independent) threshold sequence, strictest first; 1.0 (float32 saturated) leads."""
    g = 1.0 / (1.0 + np.exp(-np.linspace(hi_logit, lo_logit, n)))
    return np.r_[1.0, g]


def format_threshold(t: float) -> str:
    """A threshold for a log line: 'never' for NEVER (none certified), and thresholds near 1 as 1 - eps (with
    4 significant digits 0.99996 and 1.0 both printed as 1: `threshold 1 -> 1` said nothing)."""
    if t >= NEVER:
        return "never (none certified)"
    if t == 1.0:
        return "1 (saturated scores only)"
    return f"1 - {1 - t:.2g}" if t > 0.999 else f"{t:.4g}"


def ltt_calibrate(scores, correct, target_precision: float = 0.99, delta: float = 0.1,
                  grid: np.ndarray | None = None) -> dict:
    """Learn-then-Test fixed-sequence calibration (docs/training.md, "Calibration"). Returns a JSON-able dict.

    The walk starts at the strictest grid threshold serving at least n_min positions and stops at its first
    non-rejection. Its weak point is the start, where few positions are served: one unlucky error there ends
    the walk early. In simulations (tests/test_calibration.py) with 20,000 calibration points it always certified a
    threshold; with 4,000 it certified none about 15% of the time. Variants tried there - a second chain
    started where a held-out pilot quarter of the data looked safe, delta split between chains - lost more
    coverage to the smaller delta and data than they won back, so this is the plain single sequence.
    """
    from scipy.stats import binom
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    alpha = 1.0 - target_precision
    if not 0 < alpha < 1:
        raise ValueError(f"target precision {target_precision} must be in (0, 1)")
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} must be in (0, 1)")
    grid = threshold_grid() if grid is None else np.sort(np.asarray(grid, dtype=np.float64))[::-1]
    N = len(scores)
    n_min = int(math.ceil(math.log(delta) / math.log(1 - alpha)))
    neg = np.sort(-scores)
    errs = np.r_[0, np.cumsum(~correct[np.argsort(-scores, kind="stable")])]
    n_at = np.searchsorted(neg, -grid, side="right")        # served at each grid threshold (non-decreasing)
    k_at = errs[n_at]
    first = int(np.searchsorted(n_at, n_min, side="left"))
    best, tested = None, 0
    for j in range(first, len(grid)):
        n, k = int(n_at[j]), int(k_at[j])
        tested += 1
        if binom.cdf(k, n, alpha) <= delta:
            best = (float(grid[j]), n, k)
        else:
            break
    result = {"threshold": NEVER, "n": 0, "errors": 0, "coverage": 0.0, "precision": None,
              "error_ucb": None, "certified": False}
    if best is not None:
        lam, n, k = best
        result.update(threshold=lam, n=n, errors=k, coverage=n / max(N, 1), precision=1 - k / n,
                      error_ucb=clopper_pearson_upper(k, n, delta), certified=True)
    result.update(target_precision=target_precision, alpha=alpha, delta=delta, n_min=n_min,
                  n_calibration=N, thresholds_tested=tested,
                  method="learn-then-test, fixed-sequence testing, exact binomial p-values")
    return result
