"""Gate: candidates and features with known values, and the classifiers on synthetic data with a known answer."""
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
    slot, tok, best = gm.pick_candidate(scores, o)
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
