"""The gate: candidate tokens, their features, and the classifiers that score them.

    out = compute_features(pw, pf, mode, rids, rmap, last_ids, s, z, tables, max_s, ngram, copy)  # cands, valid, X
    slot, token, score = pick_candidate(gate.score(out["X"].flatten(0, 1)), out)   # gate: GATES[kind]

The gate's score is an estimated P(candidate == big argmax). Each proposal considers up to four candidates
(SOURCES: the head's top-1 and top-2, the training-text n-gram and the in-context copy continuations); the gate
scores every one and the drafter proposes the best-scoring one. compute_features is the one function used at
train, calibration, evaluation and decode time; feature_names(max_s, n_pca) names its columns. Gates:
LogisticGate, MLPGate. A threshold of NEVER means no threshold was certified and the gate never skips.
The candidates, each feature and the gates: docs/drafters.md#candidates-features-and-gates-gatemodelfeaturespy.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from corpus_tools.inventory import CLASSES, KINDS, token_class_from_tables

EPS = 1e-6


class torch_threads:
    """Context manager: run with n intra-op threads, restore afterwards."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


NGRAM_ORDERS = 3
SOURCES = ("head1", "head2", "ngram", "copy")      # candidate slots, in order


def feature_names(max_s: int, n_pca: int) -> list[str]:
    o = range(1, NGRAM_ORDERS + 1)
    return (["p_head", "log_p_head", "w_p", "f_p", "is_head1", "is_head2", "head_pmax", "head_margin",
             "head_entropy", "head_p_other", "f_agree_head1"]
            + ["ng_match", "ng_p", "ng_logn", "ng_order", "ng_p_match"] + [f"ng{n}_match" for n in o]
            + ["cp_match", "cp_p", "cp_logn", "cp_order", "cp_p_match"] + [f"cp{n}_match" for n in o]
            + ["n_sources"]
            + [f"cand_{c}" for c in CLASSES] + [f"last_{k}" for k in KINDS]
            + [f"s_{j}" for j in range(1, max_s + 1)] + [f"pca_{i}" for i in range(n_pca)])


def _entropy_norm(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / math.log(p.shape[-1])


def combine(pw: torch.Tensor, pf: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "word":
        return pw
    if mode == "future":
        return pf
    if mode == "mix":
        return 0.5 * (pw + pf)
    raise ValueError(f"unknown predictor mode {mode!r} (word, future, mix)")


def _backoff(stats: dict | None, B: int):
    """Longest order with >= 1 observed continuation (>= 2 for the training-text table, see callers)."""
    top, p, n, order = np.full(B, -1), np.zeros(B), np.zeros(B), np.zeros(B)
    if stats is None:
        return top, p, n, order
    for o in range(1, NGRAM_ORDERS + 1):
        if f"top{o}" not in stats:
            continue
        use = np.asarray(stats[f"n{o}"]) >= stats.get("min_n", 1)
        top = np.where(use, stats[f"top{o}"], top)
        p, n = np.where(use, stats[f"p{o}"], p), np.where(use, stats[f"n{o}"], n)
        order = np.where(use, o, order)
    return top, p, n, order


def _source_features(stats: dict | None, cands: np.ndarray) -> np.ndarray:
    """[B, K, 5 + NGRAM_ORDERS]: match with the backed-off top continuation, its p, log count, order, p x match,
    and per-order matches."""
    B, K = cands.shape
    out = np.zeros((B, K, 5 + NGRAM_ORDERS), dtype=np.float32)
    if stats is None:
        return out
    top, p, n, order = _backoff(stats, B)
    match = (cands == top[:, None]) & (top[:, None] >= 0)
    out[..., 0] = match
    out[..., 1] = p[:, None]
    out[..., 2] = np.log1p(n)[:, None]
    out[..., 3] = (order / NGRAM_ORDERS)[:, None]
    out[..., 4] = match * p[:, None]
    for o in range(1, NGRAM_ORDERS + 1):
        if f"top{o}" in stats:
            t = np.asarray(stats[f"top{o}"])[:, None]
            out[..., 4 + o] = (cands == t) & (t >= 0)
    return out


def candidates(P: torch.Tensor, rids: torch.Tensor, ngram: dict | None, copy: dict | None) -> np.ndarray:
    """[B, len(SOURCES)] candidate token ids per slot (-1: none / duplicate of an earlier slot)."""
    n_r = P.shape[1] - 1
    top2 = P[:, :n_r].topk(min(2, n_r), -1).indices
    B = P.shape[0]
    c = np.full((B, len(SOURCES)), -1, dtype=np.int64)
    c[:, 0] = rids[top2[:, 0]].numpy()
    if n_r > 1:
        c[:, 1] = rids[top2[:, 1]].numpy()
    c[:, 2] = _backoff(ngram, B)[0]
    c[:, 3] = _backoff(copy, B)[0]
    for j in range(1, c.shape[1]):                # duplicates of earlier slots are dropped
        dup = (c[:, :j] == c[:, j:j + 1]).any(1)
        c[dup, j] = -1
    return c


def compute_features(pw: torch.Tensor, pf: torch.Tensor, mode: str, rids: torch.Tensor, rmap: np.ndarray,
                     last_ids: torch.Tensor, s: torch.Tensor, z: torch.Tensor, tables: dict[str, np.ndarray],
                     max_s: int, ngram: dict | None = None, copy: dict | None = None) -> dict:
    """Candidates and their gate features; the one function used in fit, evaluate and Drafter.propose.

    pw, pf [B, R+1]: word / future head probabilities over R + other; rids [R] token ids of R; rmap [V] token
    id -> index in R (R for tokens outside it); last_ids [B] the last token of the text; s [B] since_big;
    z [B, n_pca] projected hidden; tables: per-token "kind", "cls", "ends_alnum"; ngram / copy: per-order
    top / p / n arrays of the training-text table and of the in-context index. Returns
        cands [B, K] token ids (-1 = empty slot), valid [B, K], X [B, K, F] (feature_names order), and for the
        head's own top-1 (the baselines' candidate) head_p (its probability) and head_entropy.
    """
    n_r = pw.shape[1] - 1
    P = combine(pw, pf, mode)
    if ngram is not None:
        ngram = {**ngram, "min_n": 2}
    c = candidates(P, rids, ngram, copy)
    B, K = c.shape
    valid = c >= 0
    cr = torch.from_numpy(np.where(valid, rmap[np.clip(c, 0, len(rmap) - 1)], n_r))   # R index or "other"
    in_r = cr < n_r
    gat = lambda dist: torch.where(in_r, dist.gather(1, cr.clamp(max=n_r)), torch.zeros(()))
    p_head, w_p, f_p = gat(P), gat(pw), gat(pf)
    top2 = P[:, :n_r].topk(min(2, n_r), -1).values
    head_pmax = top2[:, 0]
    margin = top2[:, 0] - (top2[:, 1] if n_r > 1 else 0)
    ent = _entropy_norm(P)
    f_top = pf[:, :n_r].argmax(-1)
    head1 = torch.from_numpy(c[:, 0])
    f_agree = (rids[f_top] == head1).float()
    glob = torch.stack([head_pmax, margin, ent, P[:, n_r], f_agree], 1)[:, None, :].expand(B, K, 5)
    slot = torch.zeros(B, K, 2)
    # a candidate from another source can still equal the head's top tokens: flags are by value
    slot[..., 0] = torch.from_numpy((c == c[:, :1]) & valid).float()
    slot[..., 1] = torch.from_numpy((c == c[:, 1:2]) & valid & (c[:, 1:2] >= 0)).float()
    ngf = torch.from_numpy(_source_features(ngram, c))
    cpf = torch.from_numpy(_source_features(copy, c))
    n_src = slot[..., 0] + ngf[..., 0] + cpf[..., 0]
    last = last_ids.numpy()
    cls = token_class_from_tables(np.repeat(last[:, None], K, 1), np.where(valid, c, 0), tables["cls"], tables["ends_alnum"])
    kind = tables["kind"]
    lk = np.where((last >= 0) & (last < len(kind)), kind[np.clip(last, 0, len(kind) - 1)], KINDS.index("other"))
    per_pair = torch.cat([F.one_hot(torch.from_numpy(lk.astype(np.int64)), len(KINDS)).float(),
                          F.one_hot((s.clamp(1, max_s) - 1).long(), max_s).float(), z.float()], 1)
    X = torch.cat([torch.stack([p_head, torch.log(p_head + 1e-6), w_p, f_p], -1), slot, glob, ngf, cpf,
                   n_src[..., None], F.one_hot(torch.from_numpy(cls.astype(np.int64)), len(CLASSES)).float(),
                   per_pair[:, None, :].expand(B, K, per_pair.shape[1])], -1)
    return {"cands": c, "valid": valid, "X": X.float(), "cls": cls, "head_p": head_pmax, "head_entropy": ent}


def pick_candidate(scores: torch.Tensor, out: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: (chosen slot, its token, its score) - the valid candidate with the highest gate score."""
    sc = scores.reshape(out["valid"].shape).clone()
    sc[torch.from_numpy(~out["valid"])] = -1.0
    best = sc.argmax(1)
    idx = np.arange(len(best))
    return best.numpy(), out["cands"][idx, best.numpy()], sc[torch.arange(len(best)), best].numpy()


# ------------------------------------------------------------------------------------------------ gates
class LogisticGate:
    """sklearn LogisticRegression on standardised features; scored in torch from the stored arrays."""
    kind = "logreg"

    def __init__(self, mean=None, scale=None, coef=None, intercept=None):
        self.mean, self.scale, self.coef, self.intercept = mean, scale, coef, intercept

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int = 0, C: float = 1.0) -> "LogisticGate":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        sc = StandardScaler().fit(X)
        lr = LogisticRegression(C=C, max_iter=3000, random_state=seed).fit(sc.transform(X), y)
        self.mean = torch.tensor(sc.mean_, dtype=torch.float32)
        self.scale = torch.tensor(np.where(sc.scale_ > 0, sc.scale_, 1.0), dtype=torch.float32)
        self.coef = torch.tensor(lr.coef_[0], dtype=torch.float32)
        self.intercept = torch.tensor(lr.intercept_, dtype=torch.float32)
        return self

    @torch.no_grad()
    def score(self, X) -> torch.Tensor:
        X = torch.as_tensor(X, dtype=torch.float32)
        return torch.sigmoid(((X - self.mean) / self.scale) @ self.coef + self.intercept)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}

    @classmethod
    def from_state(cls, st: dict, config: dict | None = None) -> "LogisticGate":
        return cls(st["mean"].float(), st["scale"].float(), st["coef"].float(), st["intercept"].float())

    def config(self) -> dict:
        return {}


class MLPGate(nn.Module):
    kind = "mlp"

    def __init__(self, n_features: int, width: int = 64):
        super().__init__()
        self.n_features, self.width = n_features, width
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def logits(self, X):
        return self.net((X - self.mean) / self.scale)[:, 0]

    @torch.no_grad()
    def score(self, X) -> torch.Tensor:
        return torch.sigmoid(self.logits(torch.as_tensor(X, dtype=torch.float32)))

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 30, batch: int = 1024,
            lr: float = 2e-3, patience: int = 4) -> "MLPGate":
        with torch_threads(1):       # tiny matrices: extra threads only add contention (40x slower when busy)
            return self._fit(X, y, seed, epochs, batch, lr, patience)

    def _fit(self, X, y, seed, epochs, batch, lr, patience) -> "MLPGate":
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        X = torch.as_tensor(X, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.float32)
        self.mean.copy_(X.mean(0))
        self.scale.copy_(X.std(0).clamp_min(1e-6))
        perm = torch.randperm(len(X), generator=g)
        n_dev = max(1, len(X) // 10)
        dev, tr = perm[:n_dev], perm[n_dev:]
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=1e-4)
        best, best_state, bad = float("inf"), None, 0
        for _ in range(epochs):
            self.train()
            order = tr[torch.randperm(len(tr), generator=g)]
            for i in range(0, len(order), batch):
                b = order[i:i + batch]
                loss = F.binary_cross_entropy_with_logits(self.logits(X[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.eval()
            with torch.no_grad():
                dl = float(F.binary_cross_entropy_with_logits(self.logits(X[dev]), y[dev]))
            if dl < best - 1e-5:
                best, bad = dl, 0
                best_state = {k: v.clone() for k, v in self.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    break
        if best_state is not None:
            self.load_state_dict(best_state)
        self.eval()
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def config(self) -> dict:
        return {"n_features": self.n_features, "width": self.width}

    @classmethod
    def from_state(cls, st: dict, config: dict) -> "MLPGate":
        m = cls(config["n_features"], config["width"])
        m.load_state_dict(st)
        return m.eval()


GATES = {"logreg": LogisticGate, "mlp": MLPGate}


NEVER = 2.0   # threshold that no score reaches: the gate never skips (gate.train.calibration)
