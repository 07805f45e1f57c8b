"""`python train.py fit --drafter router`: a router for a big/small pair (gate/model/router.py), from records of
both models (`train.py record --model BIG --model SMALL`).

    fit_router(paths, out, cfg, big_name, log) -> out

Label at t: the small model's argmax equals the big model's. Several records folders of one pair pool their
splits: train -> projections and three gates; validation -> a precision map of each gate's probability and its
Learn-then-Test threshold (certify_router, also train.py calibrate's; the largest certified coverage wins);
test -> the metrics in drafter.json (split_metrics, which bench/pair.py reuses). Not staged: a re-run refits.
Too little data or one class is refused (check_labels). docs/training.md: data use and why.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corpus_tools.inventory import OTHER_KIND, token_table
from gate.model.copyrule import MAX_N, is_copy_position
from gate.model.features import NEVER, LogisticGate, MLPGate
from gate.model.precision import combine_sources, maps_meta
from gate.model.router import Projection, RouterFeatures, model_identity, save_router
from gate.train.calibration import coverage_at_precision
from gate.train.config import FitConfig
from gate.train.data import (
    FitError,
    SplitData,
    certify_pairs,
    find_split,
    join_splits,
    load_split,
    open_records_checked,
)
from gate.train.pca import pca_fit
from runtimes.loading import input_embedding, load_tokenizer

BATCH = 8192   # rows of features built at once
MIN_POSITIONS = 20   # train positions below which a router is not fitted (too little data)


@dataclass
class PairSplit:
    """One split of pair records: the big model's data (label, hidden state) and the small model's."""
    big: SplitData
    small: SplitData
    copy_tok: np.ndarray
    copy_len: np.ndarray

    @property
    def agree(self) -> np.ndarray:
        """The oracle's label: the small model's argmax is the big model's."""
        return self.small.argmax == self.big.argmax

    @property
    def noncopy(self) -> np.ndarray:
        return ~is_copy_position(self.copy_len)

    def __len__(self):
        return len(self.big)


def pair_entries(rec, path, big_name: str | None = None) -> tuple[dict, dict]:
    """(big, small) model entries of pair records: the big one is --model or the larger; the small the other."""
    models = rec.meta.get("models") or []
    if len(models) != 2:
        raise FitError(f"{path}: a router needs records of two models (train.py record --model BIG --model SMALL); "
                       f"these hold {len(models)}: {', '.join(m['name'] for m in models) or 'none'}")
    size = lambda m: (m.get("n_layers", 0) * m.get("hidden_size", 0), m["name"])   # noqa: E731
    big = next((m for m in models if m["name"] == big_name), None) if big_name else max(models, key=size)
    if big is None:
        raise FitError(f"--model {big_name}: not in {path} (recorded: {', '.join(m['name'] for m in models)})")
    return big, next(m for m in models if m is not big)


def load_pair(rec, path, split: str, big: dict, small: dict, max_n: int = MAX_N) -> PairSplit:
    """Both models' fields of one split (the last layer's hidden state of each) and the copy rule."""
    b = load_split(rec, path, split, big["name"], big["n_layers"])
    s = load_split(rec, path, split, small["name"], small["n_layers"])
    if s.topk_p is None or s.entropy_norm is None:
        raise FitError(f"{path}: split {split!r} lacks the small model's top-k / entropy fields")
    cand, length = b.copy_rule(max_n)
    return PairSplit(b, s, cand, length)


def since_big(d: PairSplit, max_skip: int, seed: int, use_big: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rows, s): every row with s = 1, or with the big hidden state one s per row drawn from 1..max_skip-1 with
    the stale position t - s in the same run (rows at a run's start, with none before them, are left out)."""
    rows = np.arange(len(d), dtype=np.int64)
    if not use_big:
        return rows, np.ones(len(rows), dtype=np.int64)
    room = np.minimum(rows - d.big.run_start, max_skip - 1)
    rows, room = rows[room >= 1], room[room >= 1]
    s = 1 + (np.random.default_rng(seed).random(len(rows)) * room).astype(np.int64)
    return rows, s


def features_of(feats: RouterFeatures, d: PairSplit, rows: np.ndarray, s: np.ndarray) -> torch.Tensor:
    """The router's features at rows (since_big s), in batches; the same function decoding calls."""
    out = []
    for i in range(0, len(rows), BATCH):
        r, si = rows[i:i + BATCH], s[i:i + BATCH]
        big_h = None if feats.big is None else torch.from_numpy(np.asarray(d.big.hidden[r - si], dtype=np.float32))
        out.append(feats(torch.from_numpy(np.asarray(d.small.topk_p[r])), torch.from_numpy(
            np.asarray(d.small.entropy_norm[r])), torch.from_numpy(np.asarray(d.small.hidden[r], dtype=np.float32)),
            d.small.argmax[r], d.copy_tok[r], d.copy_len[r], si, big_h))
    return torch.cat(out)


def routed(feats, gate, d: PairSplit, rows, s, maps=None) -> tuple[np.ndarray, np.ndarray]:
    """(score, correct) at rows: the router's score on the small argmax (through its precision map `maps`, as
    RouterDrafter.propose scores it; None: the raw probability); correct = it is the big model's argmax.

    The copy rule enters as features only. Proposing the copy token wherever its match length was trusted on the
    training text (as the single-model drafters do) cost the router everything at 99% precision on the held-out
    genres: their 12-token matches (boilerplate) continue differently often enough to put errors at the top."""
    score = gate.score(features_of(feats, d, rows, s)).numpy()
    cand = d.small.argmax[rows]
    score = combine_sources(cand, score, d.copy_tok[rows], d.copy_len[rows], maps)[1]
    return score, cand == d.big.argmax[rows]


# ------------------------------------------------------------------------------------------------ fitting
def fit_features(parts: list[PairSplit], small: dict, cfg: FitConfig, log) -> RouterFeatures:
    """Projections fitted on (a sample of) the training positions of every part; the candidate-embedding table
    and token kinds over the whole vocabulary."""
    recorded = min(d.small.topk_p.shape[1] for d in parts)
    if cfg.router_topk > recorded:
        raise FitError(f"--router-topk {cfg.router_topk}: the records hold the top {recorded} probabilities only")
    rng = np.random.default_rng(cfg.seed)
    subs = [np.sort(rng.choice(len(d), min(len(d), 20000 // len(parts)), replace=False)) for d in parts]
    sample = lambda field: np.concatenate([np.asarray(getattr(d, field).hidden[i], dtype=np.float32)  # noqa: E731
                                           for d, i in zip(parts, subs)])
    small_proj = projection(sample("small"), cfg.router_pca)
    big_proj = projection(sample("big"), cfg.router_pca) if cfg.router_big_hidden else None
    emb = input_embedding(small["name"])
    V = int(small["vocab_size"])
    cands = np.unique(np.concatenate([d.small.argmax for d in parts]))
    emb_proj = projection(emb[torch.from_numpy(cands)].numpy(), cfg.router_emb_pca)
    kind = np.full(V, OTHER_KIND, dtype=np.int8)
    tk = token_table(load_tokenizer(small["name"]))["kind"][:V]
    kind[:len(tk)] = tk
    log(f"[router] projections: small hidden {small_proj.mean.shape[0]} -> {small_proj.width}, candidate "
        f"embedding {emb.shape[1]} -> {emb_proj.width}" + (f", big hidden -> {big_proj.width}" if big_proj else ""))
    return RouterFeatures(small_proj, emb_proj(emb[:V]), torch.from_numpy(kind), cfg.router_topk, big_proj,
                          cfg.max_skip if cfg.router_big_hidden else 0)


def projection(x: np.ndarray, k: int) -> Projection:
    """Standardise, then whitened PCA to k dimensions, folded into one affine map."""
    mean, std = x.mean(0), x.std(0) + 1e-3
    pmean, proj = pca_fit((x - mean) / std, k)
    return Projection(torch.from_numpy(mean) + torch.from_numpy(std) * pmean, proj / torch.from_numpy(std)[:, None])


LEARNED = ("small_pc", "emb_pc", "big_pc")   # feature groups read from vectors (hidden states, embeddings)


def fit_gates(X: torch.Tensor, y: np.ndarray, names: list[str], cfg: FitConfig) -> dict:
    """Three gates: logistic and MLP on every feature, and logistic on the confidence features alone (the small
    model's distribution, the candidate's kind, the copy rule). The vector features fit the training text
    closely, and on the held-out genres a router that leaned on them did worse than the small model's plain
    max-probability; validation picks among the three by certified coverage (the confidence-only gate has zero
    weights on the vector columns: trained with them zeroed, it ignores them when scoring)."""
    Xn = X.numpy()
    conf = Xn * np.array([not n.startswith(LEARNED) for n in names], dtype=Xn.dtype)
    return {"logreg": LogisticGate().fit(Xn, y, seed=cfg.seed),
            "mlp": MLPGate(X.shape[1]).fit(Xn, y, seed=cfg.seed),
            "logreg_confidence": LogisticGate().fit(conf, y, seed=cfg.seed)}


def certify_router(feats, gates: dict, parts: list, target: float, delta: float, map_frac: float,
                   seed: int) -> dict:
    """The one calibration of fit and calibrate (gate.train.data.certify_pairs) of each gate on the (data, rows, s)
    parts: a precision map of its probability fitted on a part of the pairs (no copy rule: it enters as features
    only, see `routed`), a Learn-then-Test threshold at delta / len(gates) on the rest, and each gate's coverage
    at the target precision there (`coverage_at_target`)."""
    joined, offsets = join_splits([d.big for d, _, _ in parts])
    t = np.concatenate([rows + off for (_, rows, _), off in zip(parts, offsets)])
    cand = np.concatenate([d.small.argmax[rows] for d, rows, _ in parts])
    sel = {}
    for name, gate in gates.items():
        score, correct = (np.concatenate(x) for x in zip(*(routed(feats, gate, d, r, s) for d, r, s in parts)))
        sel[name] = {"score": score, "token": cand, "correct": correct, "slot": np.zeros(len(t), np.int64)}
    pairs = {"t": t, "correct": sel[next(iter(gates))]["correct"][:, None], "sel": sel}
    cert = certify_pairs(pairs, joined, None, 0, target, delta, map_frac, seed, baselines=False)
    for name, (score, correct) in cert["scored"].items():
        cert["calibration"][name]["coverage_at_target"] = coverage_at_precision(score, correct, (target,))[target]
    return cert


def calibrate(gates: dict, feats, val: list, cfg: FitConfig, log) -> tuple[str, dict, dict]:
    """certify_router on the validation parts; the largest certified coverage wins (by coverage at the target
    precision when none certifies). Returns (its name, its calibration, the certification)."""
    cert = certify_router(feats, gates, val, cfg.target_precision, cfg.delta, cfg.map_frac, cfg.seed)
    cals = cert["calibration"]
    for name, cal in cals.items():
        log(f"[router] {name}: validation coverage at {cfg.target_precision:.0%} precision "
            f"{cal['coverage_at_target']:.1%}; certified {cal['certified']} (threshold {cal['threshold']:.4f}, "
            f"coverage {cal['coverage']:.1%})")
    best = max(cals, key=lambda n: (cals[n]["certified"], cals[n]["coverage"], cals[n]["coverage_at_target"]))
    return best, cals[best], cert


def split_metrics(d: PairSplit, score: np.ndarray, correct: np.ndarray, rows: np.ndarray, threshold: float,
                  target: float) -> dict:
    """Coverage at `target` precision of the router and the untrained rules, overall and on non-copy positions,
    plus the router at its calibrated threshold. Every rule's candidate is scored against the big argmax: the
    small argmax for the router (or the copy token it chose), entropy and max-probability; the copy token for the
    copy rule (score: match length). The oracle covers every position where the small argmax is right;
    big_informed scores it with the big model's own probability of the small token (a reference that needs the
    big model's pass at that very position: what a router reading only the small model cannot know)."""
    sm, agree = d.small, d.agree[rows]
    big_p_of_small = (np.asarray(d.big.topk_p[rows]) * (np.asarray(d.big.topk_ids[rows]) == sm.argmax[rows, None])
                      ).sum(1) if d.big.topk_p is not None else np.zeros(len(rows))
    rules = {"router": (score, correct),
             "max_prob": (np.asarray(sm.p_max[rows]), agree),
             "entropy": (-np.asarray(sm.entropy_norm[rows]), agree),
             "copy_rule": (d.copy_len[rows].astype(np.float64), d.copy_tok[rows] == d.big.argmax[rows]),
             # not a router: the big model's own probability of the small token, known only after running it
             "big_informed": (big_p_of_small, agree)}
    out = {}
    for subset, mask in (("all", np.ones(len(rows), bool)), ("non_copy", d.noncopy[rows])):
        m = {name: coverage_at_precision(sc[mask], ok[mask], (target,))[target] for name, (sc, ok) in rules.items()}
        m["oracle"] = float(agree[mask].mean()) if mask.any() else 0.0
        served = mask & (score >= threshold)
        m["router_at_threshold"] = {"coverage": float(served.sum() / max(mask.sum(), 1)),
                                    "precision": float(correct[served].mean()) if served.any() else None}
        m["positions"] = int(mask.sum())
        out[subset] = m
    return out


def load_parts(paths: list[Path], kind: str, big_name: str | None, cfg: FitConfig, seed: int):
    """[(records path, PairSplit, rows, s)] of one split kind from every records folder (one pair in all)."""
    out, first = [], None
    for k, path in enumerate(paths):
        rec = open_records_checked(path)
        big, small = pair_entries(rec, path, big_name)
        if first is None:
            first = (big, small)
        elif [model_identity(m) for m in (big, small)] != [model_identity(m) for m in first]:
            raise FitError(f"{path}: records of another pair ({big['name']} / {small['name']}) than "
                           f"{paths[0]} ({first[0]['name']} / {first[1]['name']})")
        if kind == "test" and "test" not in rec.splits:
            continue
        d = load_pair(rec, path, find_split(rec, path, kind), big, small, cfg.copy_max_n or MAX_N)
        out.append((path, d, *since_big(d, cfg.max_skip, seed + k, cfg.router_big_hidden)))
    return out, first


def check_labels(y: np.ndarray, big: dict, small: dict) -> None:
    """FitError unless the train labels hold both classes over enough positions."""
    n, k = len(y), int(y.sum())
    if n < MIN_POSITIONS:
        raise FitError(f"too little data: {n} train positions (a router needs at least {MIN_POSITIONS}); record "
                       "more text")
    if k in (0, n):
        raise FitError(f"too little data / one class: {small['name']!r}'s argmax {'equals' if k else 'differs from'} "
                       f"{big['name']!r}'s at all {n:,} train positions, so there is nothing to learn"
                       + (" (is the small model a copy of the big one?)" if k else ""))


def fit_router(paths, out, cfg: FitConfig, big_name: str | None, log) -> Path:
    """Train, calibrate and save a router (see the module docstring); returns the artifact folder."""
    t0 = time.time()
    paths, out = [Path(p) for p in paths], Path(out)
    train, (big, small) = load_parts(paths, "train", big_name, cfg, cfg.seed)
    val, _ = load_parts(paths, "validation", big_name, cfg, cfg.seed + 100)
    tr = [d for _, d, _, _ in train]
    n_tr, n_va = sum(len(r) for _, _, r, _ in train), sum(len(r) for _, _, r, _ in val)
    log(f"[router] {big['name']} (big) / {small['name']} (small): {n_tr:,} train, {n_va:,} validation positions "
        f"from {len(paths)} records folder(s); small argmax = big argmax at "
        f"{np.concatenate([d.agree for d in tr]).mean():.1%} of train positions")
    y = np.concatenate([d.agree[rows] for _, d, rows, _ in train])
    check_labels(y, big, small)
    feats = fit_features(tr, small, cfg, log)
    X = torch.cat([features_of(feats, d, rows, s) for _, d, rows, s in train])
    gates = fit_gates(X, y, feats.names(), cfg)
    primary, cal, cert = calibrate(gates, feats, [p[1:] for p in val], cfg, log)
    maps = cert["maps"][primary]
    metrics = {}
    for kind, parts in (("validation", val), ("test", load_parts(paths, "test", big_name, cfg, cfg.seed + 200)[0])):
        for path, d, rows, s in parts:
            metrics[f"{kind}:{path}"] = split_metrics(d, *routed(feats, gates[primary], d, rows, s, maps), rows,
                                                      cal["threshold"], cfg.target_precision)
    lt = cert["ltt_part"]
    meta = {"big_model": model_identity(big), "small_model": model_identity(small),
            "hidden_layer": int(big["n_layers"]),
            "max_skip": int(cfg.max_skip if cfg.router_big_hidden else cfg.router_max_skip),
            "threshold": float(cal["threshold"]), "calibration": cal, "primary_gate": primary,
            "copy_max_n": cfg.copy_max_n or MAX_N, "metrics": metrics,
            "settings": cfg.as_dict(), "records": [str(p) for p in paths],
            "positions": {"train": n_tr, "validation": n_va},
            "training_data": {"records": [str(p.resolve()) for p in paths], "train_split": "train",
                              "train_books": sorted({b for d in tr for b in d.big.books})},
            "precision_maps": maps_meta({primary: maps}, {"fitted_on": {
                "records": [str(p.resolve()) for p in paths], "split": "validation", "pairs": int((~lt).sum()),
                "ltt_pairs": int(lt.sum()), "map_frac": cfg.map_frac, "by": "train.py fit"}})}
    save_router(out, feats, gates[primary], meta)
    log(f"[router] saved {out} ({time.time() - t0:.0f}s): threshold {cal['threshold']:.4f}; " + "; ".join(
        f"{k}: {m['all']['router']:.1%} at {cfg.target_precision:.0%} precision (oracle {m['all']['oracle']:.1%})"
        for k, m in metrics.items() if k.startswith("test")))
    if cal["threshold"] >= NEVER:
        log("[router] no threshold certified on validation: the router never skips (more validation positions or "
            "a lower --target-precision)")
    return out
