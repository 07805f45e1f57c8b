"""Precision/coverage curves and the gate's calibrated threshold with a finite-sample guarantee.

    ltt_calibrate(scores, correct, target_precision=0.99, delta=0.1, groups=None) -> dict   # the threshold
    precision_curve(scores, correct); coverage_at_precision(scores, correct); clopper_pearson_upper(k, n, delta)
    calibrated_on(meta) / calibration_overlap(meta, records, split, books)   # what a gate's threshold was fitted on

Contract: with probability >= 1 - delta the precision P(candidate == big argmax | score >= threshold) is at least
the target, for positions drawn like the calibration ones (Learn-then-Test, fixed-sequence testing on a grid fixed
before seeing data, threshold_grid); with `groups` (a stretch id per position) the counts are deflated by the
design effect of errors that come in clusters (Rao-Scott). The fit calibrates every gate here on the validation
split and the evaluation reads the same curves on the test split; the drafter itself only stores the threshold
(NEVER, from gate.model.features, when none was certified). The walk, the clusters, and what the bound does
not cover: docs/training.md#calibration-learn-then-test-gatetraincalibrationpy.
"""
from __future__ import annotations

import math
from pathlib import Path

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
def clopper_pearson_upper(k: float, n: float, delta: float) -> float:
    """One-sided (1 - delta) upper confidence bound on a binomial rate from k errors in n trials (real k, n:
    counts deflated by a design effect)."""
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


def cluster_deff(order_groups: np.ndarray, order_errors: np.ndarray, n_at: np.ndarray) -> np.ndarray:
    """Design effect of the error rate among the first n positions (in score order) for every n in n_at: the
    variance of the ratio estimator k/n over the clusters served (groups with one position or more) divided by the
    binomial variance p(1-p)/n; at least 1, and 1 where there are no errors or fewer than two clusters."""
    g, e = np.asarray(order_groups), np.asarray(order_errors, dtype=np.float64)
    N = len(g)
    if N == 0:
        return np.ones(len(n_at))
    by = np.lexsort((np.arange(N), g))                    # grouped, each group in score order
    gs, es = g[by], e[by]
    start = np.r_[True, gs[1:] != gs[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(N), 0))
    ce = np.cumsum(es)
    n_prev = np.empty(N)
    k_prev = np.empty(N)
    n_prev[by] = np.arange(N) - first                      # earlier positions of the same group (score order)
    k_prev[by] = ce - es - np.where(first > 0, ce[first - 1], 0.0)
    sums = np.cumsum(np.stack([2 * n_prev + 1, e * (2 * k_prev + 1), k_prev + e * n_prev + e, n_prev == 0,
                               e]), axis=1)                # sum n_g^2, sum k_g^2, sum k_g n_g, clusters, errors
    out = np.ones(len(n_at))
    for j, n in enumerate(np.asarray(n_at)):
        if n <= 0:
            continue
        n2, k2, kn, G, k = sums[:, n - 1]
        p = k / n
        if k <= 0 or k >= n or G < 2:
            continue
        var = G / (G - 1) * (k2 - 2 * p * kn + p * p * n2) / (n * n)
        out[j] = max(1.0, var / (p * (1 - p) / n))
    return out


def binom_cdf_real(k: float, n: float, p: float) -> float:
    """P(Bin(n, p) <= k) continued to real k, n (the regularized incomplete beta I_{1-p}(n - k, k + 1))."""
    from scipy.special import betainc
    if k >= n:
        return 1.0
    return float(betainc(n - k, k + 1, 1 - p))


def ltt_calibrate(scores, correct, target_precision: float = 0.99, delta: float = 0.1,
                  grid: np.ndarray | None = None, groups=None) -> dict:
    """Learn-then-Test fixed-sequence calibration (docs/training.md, "Calibration"). Returns a JSON-able dict.

    The walk starts at the strictest grid threshold serving at least n_min positions and stops at its first
    non-rejection. Its weak point is the start, where few positions are served: one unlucky error there ends
    the walk early. In simulations (tests/test_calibration.py) with 20,000 calibration points it always certified a
    threshold; with 4,000 it certified none about 15% of the time. Variants tried there - a second chain
    started where a held-out pilot quarter of the data looked safe, delta split between chains - lost more
    coverage to the smaller delta and data than they won back, so this is the plain single sequence.

    groups: a cluster id per position (positions of one stretch of text err together: a loop copied wrongly
    fails many times). Each test then uses n / deff positions and k / deff errors, deff the design effect
    measured at that threshold (cluster_deff; Rao and Scott 1992); None: positions independent.
    """
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
    order = np.argsort(-scores, kind="stable")
    errs = np.r_[0, np.cumsum(~correct[order])]
    n_at = np.searchsorted(neg, -grid, side="right")        # served at each grid threshold (non-decreasing)
    k_at = errs[n_at]
    first = int(np.searchsorted(n_at, n_min, side="left"))
    deff = np.ones(len(grid))
    if groups is not None:
        deff[first:] = cluster_deff(np.asarray(groups)[order], ~correct[order], n_at[first:])
    best, tested = None, 0
    for j in range(first, len(grid)):
        n, k, d = int(n_at[j]), int(k_at[j]), float(deff[j])
        tested += 1
        if binom_cdf_real(k / d, n / d, alpha) <= delta:
            best = (float(grid[j]), n, k, d)
        else:
            break
    result = {"threshold": NEVER, "n": 0, "errors": 0, "coverage": 0.0, "precision": None,
              "error_ucb": None, "certified": False}
    if best is not None:
        lam, n, k, d = best
        result.update(threshold=lam, n=n, errors=k, coverage=n / max(N, 1), precision=1 - k / n,
                      error_ucb=clopper_pearson_upper(k / d, n / d, delta), certified=True, deff=d)
    result.update(target_precision=target_precision, alpha=alpha, delta=delta, n_min=n_min,
                  n_calibration=N, thresholds_tested=tested,
                  method="learn-then-test, fixed-sequence testing, exact binomial p-values"
                  + (", counts deflated by the clusters' design effect" if groups is not None else ""))
    return result


def calibrated_on(meta: dict) -> dict | None:
    """What an artifact's threshold was certified on: {"records", "split", "part", "books", "by"} as drafter.json's
    calibrated_on says (fit and calibrate write it), else read from an older artifact's recalibrated / training
    description; None when it does not say."""
    if isinstance(meta.get("calibrated_on"), dict):
        return meta["calibrated_on"]
    rec = meta.get("recalibrated")
    if isinstance(rec, dict) and rec.get("records"):
        return {**{k: rec.get(k) for k in ("records", "split", "part", "books")}, "by": "train.py calibrate"}
    data = meta.get("training_data") or {}
    val = (data.get("splits") or {}).get("validation")
    if val and isinstance(data.get("records"), str):
        books = ((data.get("counts") or {}).get(val) or {}).get("books")
        return {"records": data["records"], "split": val, "part": None, "books": books, "by": "train.py fit"}
    return None


def calibration_overlap(meta: dict, records, split: str, books: list[str]) -> list[str]:
    """The books of `split` of `records` (the part being evaluated: `books`) that the artifact's threshold was
    certified on: its precision there is the calibration's own, not a test of it."""
    cal = calibrated_on(meta)
    if not cal or cal.get("split") != split or not cal.get("records"):
        return []
    if Path(cal["records"]).resolve() != Path(records).resolve():
        return []
    return list(books) if cal.get("books") is None else [b for b in books if b in set(cal["books"])]
