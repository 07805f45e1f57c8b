"""One score scale (issue 19): precision maps are monotone and bounded, perfect sources certify everything and
coin flips nothing through the one calibration of fit and calibrate, and the copy rule's extended match lengths
agree between the records and the decode index."""
from __future__ import annotations

import numpy as np
import pytest
from test_copyrule import brute_force

from gate.model.copyrule import CopyIndex, copy_rule
from gate.model.precision import LENGTH_EDGES, PrecisionMap, SourceMaps, combine_sources, length_bin
from gate.train.data import certify_pairs, map_part


def test_maps_are_monotone_and_bounded_whatever_the_data():
    rng = np.random.default_rng(0)
    grid = np.linspace(-0.5, 1.5, 401)
    for case in range(6):
        s = rng.random(3000)
        p = [s, 1 - s, np.ones_like(s), np.zeros_like(s), np.full_like(s, 0.5), (s > 0.9) * 1.0][case]
        m = PrecisionMap.fit(s, rng.random(3000) < p)
        y = m(grid)
        assert np.all(np.diff(y) >= 0) and np.all((y > 0) & (y < 1)), case
        assert PrecisionMap.from_json(m.to_json())(grid).tolist() == y.tolist()
    # a sparse block claims no certainty: 3 of 3 right next to 990 of 1000 is pooled, never 1.0
    s = np.r_[np.full(1000, 0.5), np.full(3, 0.9)]
    ok = np.r_[np.arange(1000) >= 10, np.ones(3, bool)]
    y = PrecisionMap.fit(s, ok)(np.array([0.5, 0.9]))
    assert y[1] >= y[0] and y[1] < 0.995
    assert PrecisionMap.fit(np.ones(50), np.ones(50, bool))(np.array([1.0]))[0] == pytest.approx(51 / 52)
    with pytest.raises(ValueError):
        PrecisionMap.from_json({"x": [0, 1], "y": [0.5, 1.0]})


def test_copy_rule_is_graded_by_length_bin_without_a_cap_at_12():
    assert length_bin(np.array([0, 1, 3, 4, 5, 12, 15, 16, 47, 48, 63, 64, 500])).tolist() == \
        [0, 1, 3, 4, 4, 7, 7, 8, 10, 11, 11, 12, 12]
    rng = np.random.default_rng(1)
    n = 40000
    length = rng.integers(1, 90, n)
    truth = np.clip(0.6 + 0.006 * length, 0, 0.999)           # a 40-token match is right more often than a 12
    ok = rng.random(n) < truth
    maps = SourceMaps.fit(np.zeros(n), np.zeros(n, bool), np.ones(n), length, ok, np.zeros(n), max_n=12)
    est = maps.copy["disagree"](np.arange(1, len(LENGTH_EDGES) + 1))
    assert np.all(np.diff(est) >= 0) and est.max() < 1
    assert maps.copy["disagree"](length_bin(40)) > maps.copy["disagree"](length_bin(12)) + 0.05
    # combine_sources: the higher estimate wins; no copy candidate (length 0) never does
    tok, sc, used = combine_sources(np.array([7, 7]), np.array([0.0, 0.0]), np.array([3, 3]), np.array([40, 0]),
                                    maps)
    assert tok.tolist() == [3, 7] and used.tolist() == [True, False] and 0 < sc[0] < 1
    assert SourceMaps.from_json(maps.to_json()).to_json() == maps.to_json()


class Split:
    """The parts of SplitData that certify_pairs reads."""

    def __init__(self, argmax, copy_tok, copy_len):
        self.argmax, self.tokens, self._copy = argmax, np.zeros_like(argmax), (copy_tok, copy_len)

    def copy_rule(self, max_n, extend):
        return self._copy


def synthetic(p_gate: float, p_copy: float, n: int = 30000, seed: int = 0):
    """Pairs whose gate pick is right with probability p_gate whatever its score, and whose copy candidate
    (present on half of them) is right with probability p_copy whatever its match length."""
    rng = np.random.default_rng(seed)
    argmax = rng.integers(0, 50, n)
    wrong = (argmax + 1) % 50
    gate_tok = np.where(rng.random(n) < p_gate, argmax, wrong)
    copy_len = np.where(rng.random(n) < 0.5, rng.integers(1, 80, n), 0)
    copy_tok = np.where(copy_len > 0, np.where(rng.random(n) < p_copy, argmax, wrong), -1)
    correct = np.zeros((n, 4), bool)
    correct[:, 0] = gate_tok == argmax
    o = {"t": np.arange(n), "correct": correct,
         "sel": {"g": {"score": rng.random(n).astype(np.float32), "token": gate_tok, "correct": gate_tok == argmax,
                       "cls": np.zeros(n, np.int8), "slot": np.zeros(n, np.int64)}}}
    tables = {"cls": np.zeros(50, np.int8), "ends_alnum": np.zeros(50, bool)}
    return o, Split(argmax, copy_tok, copy_len), tables


@pytest.mark.parametrize("p, certifies", [(1.0, True), (0.5, False)])
def test_perfect_sources_certify_everything_and_coin_flips_nothing(p, certifies):
    o, data, tables = synthetic(p, p)
    cert = certify_pairs(o, data, tables, 12, 0.99, 0.1, 0.3, 0, baselines=False)
    cal, lt = cert["calibration"]["g"], cert["ltt_part"]
    assert 0 < lt.mean() < 1 and abs((~lt).mean() - 0.3) < 0.1        # maps and threshold on disjoint parts
    assert cal["certified"] == certifies
    if certifies:
        assert cal["coverage"] == 1.0 and cert["oracle"] == 1.0 and cal["precision"] == 1.0
    else:
        assert cal["coverage"] == 0.0 and cal["threshold"] >= 1.0
    s = o["sel"]["g"]["score"]
    assert np.all((s > 0) & (s < 1))                                   # estimated precisions, never 1.0


def test_map_part_deals_whole_stretches():
    t = np.repeat(np.arange(5000), 3)
    m = map_part(t, 0.3, 0)
    assert 0.2 < m.mean() < 0.4 and all(len(set(m[t // 64 == c])) == 1 for c in range(78))
    assert map_part(np.array([0, 1]), 0.3, 0).tolist() in ([True, False], [False, True])


def extended_brute_force(ids: list[int], max_n: int, limit: int) -> tuple[int, int]:
    """The capped rule's candidate; a match of max_n tokens measured at its occurrence up to `limit` tokens."""
    tok, n = brute_force(ids, max_n)
    if n < max_n:
        return tok, n
    t = len(ids) - 1
    e = max(e for e in range(max_n - 1, t) if ids[e - max_n + 1:e + 1] == ids[t - max_n + 1:])
    while n < limit and n <= e and ids[t - n] == ids[e - n]:
        n += 1
    return tok, n


def test_extended_match_lengths_agree_between_records_and_decode():
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(25):
        period = int(rng.integers(3, 30))
        unit = rng.integers(0, 6, period).tolist()
        ids = rng.integers(0, 6, int(rng.integers(0, 20))).tolist() + unit * int(rng.integers(2, 8))
        ids += rng.integers(0, 6, int(rng.integers(0, 20))).tolist()
        cand, length = copy_rule(np.array(ids), np.zeros(len(ids), np.int64), 12, 64)
        index = CopyIndex(12)
        for t in range(len(ids)):
            index.sync(ids[:t + 1])
            want = extended_brute_force(ids[:t + 1], 12, 64)
            assert index.query(64) == want == (cand[t], length[t]), (ids[:t + 1], want)
            seen.add(int(length[t]))
    assert max(seen) == 64 and any(12 < n < 64 for n in seen)


# ------------------------------------------------------------------------------------------------ eagle, router
def check_maps(maps) -> None:
    """Every map of a SourceMaps non-decreasing and inside (0, 1)."""
    grid = np.linspace(-0.5, 70, 300)
    for m in list(maps.gate.values()) + list((maps.copy or {}).values()):
        y = m(grid)
        assert np.all(np.diff(y) >= 0) and np.all((y > 0) & (y < 1))


def files_sha(folder) -> dict:
    """sha256 of every file of an artifact folder but drafter.json (not its folders: a fit's stages/)."""
    import hashlib
    import os

    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(os.listdir(folder))
            if f != "drafter.json" and (folder / f).is_file()}


def calibrate_cli(records, gate, out, *extra):
    import train

    from helpers import call_main

    return call_main(train.main, ["calibrate", "--records", records, "--gate", gate, "--out", out,
                                  "--target-precision", "0.6", *extra])


def make_old(src, dst, copy_trust=None):
    """A copy of an artifact as it was before the precision maps (copy_trust: the table it then held)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "drafter.json").read_text())
    del meta["precision_maps"]
    if copy_trust is not None:
        meta["copy_trust"] = copy_trust
    (dst / "drafter.json").write_text(json.dumps(meta))
    return meta
