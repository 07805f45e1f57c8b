"""One score scale: every candidate source's raw score mapped to an estimate of P(candidate == big argmax).

    maps = SourceMaps.fit(gate_score, gate_right, copy_token, copy_len, copy_right, gate_token, max_n)  # validation
    token, est, used = combine_sources(token, score, copy_token, copy_len, maps)  # fit, calibrate, evaluate, propose

PrecisionMap: isotonic regression (sklearn, pool-adjacent-violators) of `correct` on the raw score; each pooled
block's precision is shrunk by Laplace's rule (k + 1) / (n + 2), so a sparse block claims no certainty and no
estimate is 0 or 1, then made non-decreasing again; a step function (a score between blocks gets the lower one's).
A map per context beside the gate's pick (CONTEXTS: no copy candidate, the same token, another); the copy rule's
by match-length bin (LENGTH_EDGES, up to 64+). combine_sources takes the candidate with the higher estimate: what
the threshold is certified on. Maps are JSON (drafter.json): recalibration rewrites no tensor. Why: docs/drafters.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gate.model.copyrule import trust_copy

LENGTH_EDGES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)   # match-length bins: [1,2), ..., [48,64), 64+
COPY_EXTEND = LENGTH_EDGES[-1]                              # matches are measured up to this many tokens


def length_bin(length) -> np.ndarray:
    """Bin index of match lengths: 0 for no match, k for LENGTH_EDGES[k-1] <= length < LENGTH_EDGES[k]."""
    return np.searchsorted(np.asarray(LENGTH_EDGES), np.asarray(length), side="right")


@dataclass
class PrecisionMap:
    """Non-decreasing step map raw score -> estimated precision: y[i] from x[i] (a block's lowest score) on; below
    x[0], y[0]. (Lines between blocks were tried: they lifted scores just under a pure top block to its estimate.)"""
    x: np.ndarray
    y: np.ndarray

    def __call__(self, score) -> np.ndarray:
        i = np.searchsorted(self.x, np.asarray(score, dtype=np.float64), side="right") - 1
        return self.y[np.maximum(i, 0)]

    @classmethod
    def fit(cls, score, correct) -> "PrecisionMap":
        """Isotonic fit on (score, correct) pairs, Laplace-shrunk per block (see the module docstring)."""
        from sklearn.isotonic import IsotonicRegression

        score, correct = np.asarray(score, dtype=np.float64), np.asarray(correct, dtype=np.float64)
        if len(score) == 0:
            return cls(np.zeros(1), np.full(1, 0.5))
        ux, inv = np.unique(score, return_inverse=True)
        n, k = np.bincount(inv), np.bincount(inv, weights=correct)
        iso = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip")
        fitted = iso.fit(ux, k / n, sample_weight=n).predict(ux)
        block = np.r_[0, np.cumsum(np.diff(fitted) > 1e-12)]           # pooled runs of equal fitted values
        bn, bk = np.bincount(block, weights=n), np.bincount(block, weights=k)
        start = ux[np.r_[0, np.flatnonzero(np.diff(block)) + 1]]       # each block's lowest score
        shrunk = (bk + 1.0) / (bn + 2.0)
        idx = np.arange(len(bn), dtype=np.float64)
        y = IsotonicRegression(increasing=True).fit(idx, shrunk, sample_weight=bn + 2.0).predict(idx)
        return cls(start, y)

    def to_json(self) -> dict:
        return {"x": [float(v) for v in self.x], "y": [float(v) for v in self.y]}

    @classmethod
    def from_json(cls, d: dict) -> "PrecisionMap":
        x, y = np.asarray(d["x"], dtype=np.float64), np.asarray(d["y"], dtype=np.float64)
        if x.ndim != 1 or len(x) == 0 or x.shape != y.shape or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0) \
                or not np.all((y > 0) & (y < 1)):
            raise ValueError("a precision map needs non-decreasing x and y of one length, y in (0, 1)")
        return cls(x, y)


CONTEXTS = ("none", "agree", "disagree")   # beside the gate's pick: no copy candidate, the same token, another


def copy_context(token, copy_token, copy_len) -> np.ndarray:
    """Index into CONTEXTS per pair: what the copy rule says beside the gate's candidate."""
    has = np.asarray(copy_len) > 0
    return np.where(~has, 0, np.where(np.asarray(copy_token) == np.asarray(token), 1, 2))


@dataclass
class SourceMaps:
    """The maps of one gate: its own score, and the copy rule's by match-length bin, each per CONTEXTS."""
    gate: dict                 # {context: PrecisionMap} over the gate's score ({"none": ...} alone without the rule)
    copy: dict | None          # {"agree" | "disagree": PrecisionMap} over length_bin; None: no copy rule
    max_n: int                 # the copy index's n-gram cap (CopyIndex(max_n))
    extend: int = COPY_EXTEND  # matches measured up to this length (CopyIndex.query(extend))

    @classmethod
    def fit(cls, score, right, copy_token, copy_len, copy_right, token, max_n: int,
            extend: int = COPY_EXTEND) -> "SourceMaps":
        """Pairs without a gate candidate (score < 0) or a copy candidate (length 0) are left out of each map."""
        score, right, copy_len = np.asarray(score), np.asarray(right), np.asarray(copy_len)
        has = score >= 0
        if max_n <= 0:
            return cls({"none": PrecisionMap.fit(score[has], right[has])}, None, 0, 0)
        ctx, b, ok = copy_context(token, copy_token, copy_len), length_bin(copy_len), np.asarray(copy_right)
        gate = {c: PrecisionMap.fit(score[has & (ctx == i)], right[has & (ctx == i)]) for i, c in enumerate(CONTEXTS)}
        copy = {c: PrecisionMap.fit(b[ctx == i], ok[ctx == i]) for i, c in enumerate(CONTEXTS) if i}
        return cls(gate, copy, max_n, extend)

    def combine(self, token, score, copy_token, copy_len) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        token, score = np.asarray(token), np.asarray(score, dtype=np.float64)
        if self.copy is None:
            est = np.where(score >= 0, self.gate["none"](score), 0.0)
            return token, est.astype(np.float32), np.zeros(len(token), dtype=bool)
        ctx, b = copy_context(token, copy_token, copy_len), length_bin(copy_len)
        est, copy_est = np.zeros(len(token)), np.zeros(len(token))
        for i, c in enumerate(CONTEXTS):
            m = ctx == i
            est[m] = np.where(score[m] >= 0, self.gate[c](score[m]), 0.0)
            if i:
                copy_est[m] = self.copy[c](b[m])
        used = copy_est > est
        return np.where(used, copy_token, token), np.maximum(est, copy_est).astype(np.float32), used

    def copy_alone(self, copy_len: int) -> float | None:
        """The copy rule's estimated precision at this match length when the gate's pick is not known: the lower of
        its maps beside an agreeing and a disagreeing pick (None: no copy map, or no candidate)."""
        if self.copy is None or copy_len <= 0:
            return None
        b = length_bin(np.array([copy_len]))
        return float(min(self.copy[c](b)[0] for c in CONTEXTS[1:]))

    def to_json(self) -> dict:
        return {"gate": {k: m.to_json() for k, m in self.gate.items()}, "max_n": self.max_n, "extend": self.extend,
                "copy": None if self.copy is None else {"length_edges": list(LENGTH_EDGES),
                                                        **{k: m.to_json() for k, m in self.copy.items()}}}

    @classmethod
    def from_json(cls, d: dict) -> "SourceMaps":
        c = d.get("copy")
        if c is not None and list(c.get("length_edges", [])) != list(LENGTH_EDGES):
            raise ValueError(f"copy map over match-length bins {c.get('length_edges')}, this version reads "
                             f"{list(LENGTH_EDGES)}: run train.py calibrate on the gate again")
        copy = None if c is None else {k: PrecisionMap.from_json(c[k]) for k in CONTEXTS[1:]}
        gate = {k: PrecisionMap.from_json(d["gate"][k]) for k in (CONTEXTS if copy else CONTEXTS[:1])}
        return cls(gate, copy, int(d["max_n"]), int(d["extend"]))


MAPS_METHOD = ("isotonic regression (sklearn, pool-adjacent-violators) of right/wrong on the raw score, each pooled "
               "block's precision shrunk by Laplace's rule (k+1)/(n+2) and made non-decreasing again; the copy rule "
               "per match-length bin and agreement with the gate's candidate (gate/model/precision.py)")


def maps_meta(maps: dict, old: dict | None = None) -> dict:
    """drafter.json's precision_maps entry (every format's): {gate: SourceMaps} as JSON, how they were fitted, on
    what (kept from `old` unless given anew)."""
    return {**(old or {}), "method": MAPS_METHOD, "gates": {n: m.to_json() for n, m in maps.items()}}


def maps_from_meta(meta: dict, path="", primary: str | None = None) -> dict | None:
    """{gate: SourceMaps} from drafter.json (None: an artifact from before the maps); the primary gate (default
    drafter.json's primary_gate) must be among them. ValueError naming the file otherwise."""
    pm = meta.get("precision_maps")
    if not pm:
        return None
    try:
        maps = {n: SourceMaps.from_json(d) for n, d in pm["gates"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: drafter.json: unreadable precision_maps ({e})") from None
    primary = primary or meta.get("primary_gate")
    if primary not in maps:
        raise ValueError(f"{path}: drafter.json: precision_maps lack the primary gate {primary!r}")
    return maps


def combine_sources(token, score, copy_token, copy_len, scoring) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The drafter's proposal and its score from the gate's pick and the copy rule's: (token, score, copy used).
    `scoring`: SourceMaps (estimated precisions, the higher wins); an older artifact's per-length trust table
    (gate.model.copyrule.trust_copy, scores as they were); None (the gate's pick alone)."""
    if scoring is None:
        return np.asarray(token), np.asarray(score, dtype=np.float32), np.zeros(len(np.asarray(token)), dtype=bool)
    if isinstance(scoring, SourceMaps):
        return scoring.combine(token, score, copy_token, copy_len)
    return trust_copy(token, score, copy_token, copy_len, scoring)


__all__ = ["PrecisionMap", "SourceMaps", "combine_sources", "maps_meta", "maps_from_meta", "MAPS_METHOD",
           "copy_context", "length_bin", "CONTEXTS", "LENGTH_EDGES", "COPY_EXTEND"]
