"""The audit of a lossy decode: the big model's catch-up rows judge the skipped tokens they cover, after the fact.

    audit = Audit(target_error=0.01)         # infer.py --audit (session.audit_for); carry=True: --audit-scope job
    Decoder(big, gate, audit=audit)           # the loop calls start(bar), observe(index, checks), report()

A skip is wrong when it is not the big model's argmax at its position (greedy decoding only). Nothing is rolled
back; the bar a skip's score must clear to go out unchecked (the gate's threshold; T under --verify-below T)
rises a step, 1 - bar halved, when a mismatch arrives while the window's error bound (one-sided Clopper-Pearson
at 90%, exact, no scipy; the window: audits since the last change) exceeds the target, and goes back a step when
the bound falls below half the target; never below the calibrated bar. Why and what it costs: docs/decode.md.
"""
from __future__ import annotations

import math
from typing import Sequence

from gate.model.features import NEVER

CONFIDENCE = 0.9        # of the error bound: the calibration's 1 - delta
DEFAULT_TARGET = 0.01   # the target error when the drafter's metadata names none (1 - target precision 0.99)
MIN_GAP = 1e-6          # a bar closer than this to 1 lets only saturated scores (1.0) through: the next step is NEVER
METHOD = "Clopper-Pearson, one-sided"


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for any n a decode reaches)."""
    if k >= n or p <= 0.0:
        return 1.0
    if k < 0 or p >= 1.0:
        return 0.0
    log_term, odds, total = n * math.log1p(-p), math.log(p) - math.log1p(-p), 0.0
    for i in range(k + 1):           # term i: C(n, i) p^i (1-p)^(n-i), by the ratio of successive terms
        total += math.exp(log_term)
        log_term += math.log(n - i) - math.log(i + 1) + odds
    return min(total, 1.0)


def error_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided Clopper-Pearson upper bound on a rate from k errors in n trials: the p with
    P(X <= k | p) = 1 - confidence (bisection; 1.0 when n = 0)."""
    if n <= 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom_cdf(k, n, mid) > 1 - confidence else (lo, mid)
    return hi


def bound_above(k: int, n: int, rate: float, confidence: float = CONFIDENCE) -> bool:
    """error_bound(k, n) > rate, with one binomial tail instead of a bisection."""
    return n > 0 and binom_cdf(k, n, rate) > 1 - confidence


def calibrated_target(meta: dict | None) -> float | None:
    """1 - the target precision a drafter's threshold was calibrated for (its drafter.json), or None: the latest
    recalibration's, else the primary gate's calibration, else the fit's setting."""
    meta = meta or {}
    cal = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
    primary = cal if "target_precision" in cal else cal.get(meta.get("primary_gate"), cal.get("gate"))
    for src in (meta.get("recalibrated"), primary, meta, meta.get("config"), meta.get("settings")):
        tp = src.get("target_precision") if isinstance(src, dict) else None
        if isinstance(tp, (int, float)) and 0 < tp < 1:
            return round(1.0 - tp, 12)
    return None


def higher(bar: float) -> float:
    """One step up: 1 - bar halved (0.8 -> 0.9 -> 0.95; 0.9996 -> 0.9998), NEVER once only 1.0 would pass."""
    if bar >= 1.0:
        return NEVER
    new = 1.0 - (1.0 - max(bar, 0.0)) / 2
    return NEVER if 1.0 - new < MIN_GAP else new


class Audit:
    """Counts of one decode run and the bar's path; start() begins a run. By default the bar and its evidence
    are per run, so a batch or --parallel gives every prompt the output it gets alone; carry=True (infer.py
    --audit-scope job) keeps the bar, the window and the bars below it from one run to the next (counts and
    path stay per run), so the evidence of a whole job of prompts moves it."""

    def __init__(self, target_error: float = DEFAULT_TARGET, confidence: float = CONFIDENCE, carry: bool = False):
        if not 0 < target_error < 1:
            raise ValueError(f"the audit's target error must be in (0, 1), got {target_error:g}")
        self.target, self.confidence, self.carry = target_error, confidence, carry
        self.floor = None
        self.start(None)

    def start(self, bar: float | None) -> None:
        """A new text. `bar`: the score an unchecked skip must reach (its floor); None: count only. With carry,
        a run with the same floor starts where the last one left the bar (self.bar)."""
        if not (self.carry and bar is not None and bar == self.floor):
            self.floor = self.bar = bar
            self.window = [0, 0]             # audited, mismatches since the bar last moved
            self.below: list[float] = []     # the bars a raise left, for going back down
        self.start_bar = self.bar
        self.audited = self.mismatches = 0
        self.path: list[list] = []           # [token index, new bar]
        self.mismatch_at: list[int] = []     # generated-token indices of the wrong skips

    def observe(self, index: int, checks: Sequence[tuple[int, bool]]) -> float | None:
        """One catch-up pass's verdicts (generated-token index, right?) on the skips it covered; `index` is
        the generated token the pass speaks next. Returns the new bar, or None if it stays."""
        wrong = [i for i, ok in checks if not ok]
        self.audited += len(checks)
        self.mismatches += len(wrong)
        self.mismatch_at += wrong
        self.window[0] += len(checks)
        self.window[1] += len(wrong)
        if self.bar is None or not checks:
            return None
        n, k = self.window
        if wrong and bound_above(k, n, self.target, self.confidence):
            new = higher(self.bar)
            if new == self.bar:
                return None
            self.below.append(self.bar)
        elif self.below and not bound_above(k, n, self.target / 2, self.confidence):
            new = self.below.pop()
        else:
            return None
        self.bar, self.window = new, [0, 0]
        self.path.append([index, new])
        return new

    def report(self, not_audited: int = 0) -> dict:
        """The ledger's `audit` dict."""
        n, k = self.audited, self.mismatches
        return dict(target=self.target, confidence=self.confidence, method=METHOD, audited=n, mismatches=k,
                    error=round(k / n, 6) if n else 0.0, bound=round(error_bound(k, n, self.confidence), 6),
                    not_audited=not_audited, threshold=finite(self.floor), start_threshold=finite(self.start_bar),
                    final_threshold=finite(self.bar), carried=self.carry,
                    threshold_path=[list(p) for p in self.path], mismatch_at=list(self.mismatch_at))


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def sum_audits(audits: list[dict]) -> dict:
    """The audit of several audited runs (or sums of them): counts summed, the rate and its bound recomputed,
    one threshold path per run (token indices count from each run's start)."""
    a0 = audits[0]
    n, k = sum(a["audited"] for a in audits), sum(a["mismatches"] for a in audits)
    paths = [p for a in audits for p in a.get("threshold_paths", [a.get("threshold_path", [])])]
    return dict(target=a0["target"], confidence=a0["confidence"], method=a0["method"], audited=n, mismatches=k,
                error=round(k / n, 6) if n else 0.0, bound=round(error_bound(k, n, a0["confidence"]), 6),
                not_audited=sum(a["not_audited"] for a in audits), threshold=a0["threshold"],
                final_threshold=audits[-1].get("final_threshold"),
                runs=len(paths), runs_raised=sum(1 for p in paths if p), threshold_paths=paths)


__all__ = ["Audit", "binom_cdf", "error_bound", "calibrated_target", "higher", "sum_audits", "CONFIDENCE",
           "DEFAULT_TARGET"]
