"""`python train.py fit --drafter eagle`: the feature head (gate/model/eagle.py), its gate and calibration, from
one or more records folders of one big model.

    fit_eagle(sources, big, out, cfg, force, log) -> out

Train splits: 85% of chunks train the head, 15% the gate over its drafts; validation: the precision maps (a
part) and the Learn-then-Test threshold (the rest; certify_eagle, also train.py calibrate's); test: untouched.
The head is a resumable stage (a checkpoint per epoch) under OUT/stages/; the gate and calibration are
recomputed. docs/training.md: data use and pairs.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_path
from gate.model.copyrule import COPY_SPAN, MAX_N
from gate.model.eagle import EagleDrafter, FeatureHead, candidate_features, draft_vocab, int8_head
from gate.model.features import LogisticGate, pick_candidate
from gate.model.precision import COPY_EXTEND, SourceMaps, combine_sources
from gate.train.calibration import coverage_at_precision
from gate.train.config import FitConfig
from gate.train.data import FitError, SplitData, certify_pairs, chunk_folds, join_splits, load_split
from gate.train.eagle import run_levels, train_feature_head
from gate.train.stages import StageCache, stage_key
from runtimes.info import TokenizerMismatch

GATE_FRAC = 0.15


class Checkpoint:
    """The feature head's per-epoch checkpoint (atomic), for train_feature_head's resume."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=False)
        return state if state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({**state, "key": self.key}, tmp)


def load_parts(sources, big, kind: str) -> list[SplitData]:
    """The train or validation split of every source (a source without validation books gives only train)."""
    out = []
    for src in sources:
        split = src.split_train if kind == "train" else src.split_val
        if split is None:
            continue
        d = load_split(src.rec, src.path, split, src.name, src.layer)
        if d.hidden.shape[1] != big.D * len(src.layer):
            raise FitError(f"{src.path}: hidden size {d.hidden.shape[1] // len(src.layer)} but model {src.name!r} "
                           f"has {big.D}")
        out.append(d)
    return out


def check_sources(sources) -> None:
    """One big model, tokenizer and layer set across the records folders, and validation books in one at least."""
    first = sources[0]
    if all(s.split_val is None for s in sources):
        raise FitError(f"{first.path}: no records folder has a validation split (the gate's calibration needs "
                       "held-out books); record a corpus with train/validation/test books")
    for s in sources:
        if s.rec.fingerprint != first.rec.fingerprint or s.name != first.name:
            raise TokenizerMismatch(f"{s.path}: records of {s.name!r} (tokenizer {s.rec.fingerprint}) cannot "
                                    f"train one drafter with {first.path} ({first.name!r}, {first.rec.fingerprint})")
        if s.layer != first.layer:
            raise FitError(f"{s.path}: layers {list(s.layer)} differ from {first.path}'s {list(first.layer)}")


def new_head(big, layers, ids: torch.Tensor, sample: np.ndarray, cfg: FitConfig) -> FeatureHead:
    """A head in the big model's shapes: its embedding (as the artifact stores it, fp16), lm_head from its output
    rows of the draft vocabulary times its final norm, feat_scale 1/RMS of each input column of `sample`."""
    a = big.arch or {}
    torch.manual_seed(cfg.seed)
    head = FeatureHead(big.V, big.D, len(ids), layers, n_heads=a.get("n_heads"), n_kv_heads=a.get("n_kv_heads"),
                       mlp=cfg.eagle_mlp or a.get("mlp"), rope_theta=a.get("rope_theta", 1e4), eps=a.get("eps", 1e-6))
    head.embed.copy_(big.embed.half().float())
    rows = big.out_emb[ids].float()
    head.lm_head.weight.data.copy_(rows if a.get("final_norm") is None else rows * a["final_norm"])
    head.draft_ids.copy_(ids)
    rms = np.sqrt(np.mean(np.square(sample.astype(np.float32)), 0)) + 1e-6
    head.feat_scale.copy_(torch.from_numpy(1.0 / rms))
    return head


def stage_head(cache: StageCache, big, train: list[SplitData], head_rows: list[np.ndarray], data_id: str,
               layers, cfg: FitConfig, log) -> tuple[FeatureHead, dict]:
    key = stage_key("eagle3", data_id, cfg.stage_settings("eagle"), cfg.seed)
    sample = np.concatenate([np.asarray(d.hidden[r[:20000]]) for d, r in zip(train, head_rows)])
    ids = draft_vocab(np.concatenate([d.argmax[r] for d, r in zip(train, head_rows)]), cfg.eagle_vocab)
    head = new_head(big, layers, ids, sample, cfg)
    dmap = torch.full((big.V,), -100, dtype=torch.long)
    dmap[ids] = torch.arange(len(ids))

    def train_it():
        info = train_feature_head(head, list(zip(train, head_rows)), dmap, cfg,
                                  Checkpoint(cache.folder / "eagle_checkpoint.pt", key), log)
        return info, {k: v.contiguous() for k, v in head.state_dict().items()}

    meta, st = cache.run("eagle_head", key, train_it, with_tensors=True)
    head.load_state_dict(st)
    return head.eval(), meta


def drafts_on(head: FeatureHead, parts: list[SplitData], rows: list[np.ndarray] | None, cfg: FitConfig,
              tables: dict, desc: str) -> dict:
    """The head's pairs on some rows of each part, with both candidates' gate features and labels."""
    outs = []
    for i, d in enumerate(parts):
        cand, extended = d.copy_rule(MAX_N, COPY_EXTEND)     # the gate reads lengths up to MAX_N, the maps all
        length = np.minimum(extended, MAX_N)
        o = run_levels(head, d, cfg.eagle_depth, rows=None if rows is None else rows[i], desc=desc,
                       other=cand)
        if "t" not in o:
            continue
        t = o["t"]
        f = candidate_features(o["token"], o["p1"], o["p2"], o["entropy"], o["p_other"], cand[t], length[t], o["s"],
                               d.tokens[t], tables, cfg.eagle_depth)
        f.update(t=t, s=o["s"], part=np.full(len(t), i), head_token=o["token"], p1=o["p1"],
                 entropy=o["entropy"], copy_len=length[t].astype(np.int64), copy_tok=cand[t],
                 copy_len_ext=extended[t].astype(np.int64))
        f["correct"] = (f["cands"] == d.argmax[t][:, None]) & f["valid"]
        f["argmax"] = d.argmax[t]
        outs.append(f)
    if not outs:
        raise FitError(f"{desc}: no position to score (the records' runs are too short or too few)")
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def fit_gate(o: dict, cfg: FitConfig) -> LogisticGate:
    X, y = o["X"][o["valid"]], o["correct"][o["valid"]]
    if y.all() or not y.any():
        raise FitError("the gate's training pairs are all right or all wrong: too little data")
    return LogisticGate().fit(X, y.astype(np.int64), seed=cfg.seed)


def gate_pick(gate, o: dict) -> dict:
    """The gate's best candidate on every pair: slot, token, score, correct, cls (before the copy rule's)."""
    sc = gate.score(o["X"].reshape(-1, o["X"].shape[-1])).reshape(o["X"].shape[:2])
    slot, tok, best = pick_candidate(sc, {"valid": o["valid"], "cands": o["cands"]})
    idx = np.arange(len(slot))
    return {"slot": slot, "token": tok, "score": best, "correct": tok == o["argmax"], "cls": o["cls"][idx, slot]}


def score_pairs(gate, o: dict, scoring) -> dict:
    """The drafter's pick on every pair, as EagleDrafter.propose makes it: the gate's best candidate combined with
    the copy rule's (gate.model.precision.combine_sources; `scoring`: the drafter's `scoring`)."""
    sel = gate_pick(gate, o)
    if scoring is not None:
        n = o["copy_len_ext"] if isinstance(scoring, SourceMaps) else o["copy_len"]
        tok, best, used = combine_sources(sel["token"], sel["score"], o["copy_tok"], n, scoring)
        sel.update(token=tok, score=best, correct=tok == o["argmax"], copy_used=used)
    return sel


def certify_eagle(gate, o: dict, parts: list[SplitData], tables: dict, target: float, delta: float,
                  map_frac: float, seed: int) -> dict:
    """The one calibration of fit and calibrate (gate.train.data.certify_pairs) on the pairs o of drafts_on over
    `parts`: maps fitted on a part of them, the threshold certified on the rest; the combined picks in
    cert["pairs"]["sel"][EagleDrafter.GATE]."""
    joined, offsets = join_splits(parts)
    pairs = {"t": o["t"] + offsets[o["part"]], "correct": o["correct"],
             "sel": {EagleDrafter.GATE: gate_pick(gate, o)}}
    return certify_pairs(pairs, joined, tables, MAX_N, target, delta, map_frac, seed, baselines=False)


def summarize(o: dict, sel: dict, target: float) -> dict:
    """Agreement and coverage at precision, overall / copy / non-copy positions, per depth and for depth 1."""
    copy = o["copy_len"] >= COPY_SPAN
    right = o["head_token"] == o["argmax"]
    out = {}
    for name, m in (("all", np.ones(len(copy), bool)), ("non_copy", ~copy), ("copy_positions", copy)):
        if not m.any():
            continue
        d1 = m & (o["s"] == 1)
        out[name] = {
            "share": float(m.mean()),
            "first_token_agreement": float(right[d1].mean()) if d1.any() else None,
            "agreement_by_depth": {int(s): float(right[m & (o["s"] == s)].mean()) for s in np.unique(o["s"][m])},
            "coverage_at_precision": {
                "gate": coverage_at_precision(sel["score"][m], sel["correct"][m], (target,))[target],
                "max_prob": coverage_at_precision(o["p1"][m], right[m], (target,))[target],
                "copy": coverage_at_precision(o["copy_len"][m].astype(float), o["copy_tok"][m] == o["argmax"][m],
                                              (target,))[target],
                "oracle": float((o["correct"][m].any(1) | right[m]).mean())},
        }
    return out


def eagle_meta(sources, big, cfg: FitConfig, head: FeatureHead, counts: dict, cal: dict, metrics: dict,
               cover: dict, timings: dict) -> dict:
    """drafter.json's description of the training: big model, data, settings, calibration, metrics, cost."""
    return {"big_model": {"name": sources[0].name, "fingerprint": sources[0].rec.fingerprint, "vocab_size": big.V,
                          "hidden_size": big.D, "n_layers": sources[0].entry["n_layers"],
                          "n_params": big.info["n_params"], "path": big.info["path"]},
            "training_data": {"records": [str(s.path.resolve()) for s in sources], **counts},
            "config": cfg.as_dict(), "calibration": {"gate": cal}, "metrics": {"validation": metrics},
            "draft_vocab": {"size": int(head.n_draft), "big_argmax_covered": cover},
            "cost": {"head_params": head.trainable_params(), "head_flops_per_token": head.flops_per_token(),
                     "big_flops_per_token": 2 * big.info["n_params"]},
            "timings": timings, "target_precision": cfg.target_precision, "delta": cfg.delta}


def fit_eagle(sources, big, out: Path, cfg: FitConfig, force: bool, log) -> Path:
    """Train, calibrate and save the feature-head drafter (see the module docstring) from sources that passed
    check_sources."""
    t_start = time.time()
    train, val = load_parts(sources, big, "train"), load_parts(sources, big, "val")
    # chunks of 512 positions, smaller for small record sets so that every set gives the gate some
    folds = [chunk_folds(len(d), cfg.seed + i, GATE_FRAC, chunk=max(32, min(512, len(d) // 8)))
             for i, d in enumerate(train)]
    head_rows = [np.flatnonzero(~f) for f in folds]
    gate_rows = [np.flatnonzero(f) for f in folds]
    log(f"[fit] feature head on {sum(map(len, head_rows)):,} positions of {len(sources)} records folder(s); gate "
        f"on {sum(map(len, gate_rows)):,}; calibration on {sum(map(len, val)):,} validation positions")
    data_id = stage_key([str(s.path.resolve()) for s in sources], sources[0].rec.fingerprint,
                        [len(d) for d in train], [int(d.tokens[:1000].sum()) for d in train])
    cache = StageCache(out / "stages", force, log)
    head, hmeta = stage_head(cache, big, train, head_rows, data_id, sources[0].layer, cfg, log)
    decoding = int8_head(head) or head          # the gate and its calibration see the numbers decoding computes
    gate_pairs = drafts_on(decoding, train, gate_rows, cfg, big.tables, "gate pairs")
    gate = fit_gate(gate_pairs, cfg)
    val_pairs = drafts_on(decoding, val, None, cfg, big.tables, "calibration pairs")
    cert = certify_eagle(gate, val_pairs, val, big.tables, cfg.target_precision, cfg.delta, cfg.map_frac, cfg.seed)
    sel, cal = cert["pairs"]["sel"][EagleDrafter.GATE], cert["calibration"][EagleDrafter.GATE]
    metrics = summarize(val_pairs, sel, cfg.target_precision)
    cover = {k: float(np.isin(d.argmax, head.draft_ids.numpy()).mean()) for k, d in (("train", train[0]),
                                                                                     ("val", val[0]))}
    agree = {k: v["first_token_agreement"] for k, v in metrics.items()}
    log(f"[fit] feature head: first-token agreement on validation {agree['all']:.1%} (non-copy "
        f"{agree.get('non_copy') or float('nan'):.1%}); calibrated threshold "
        f"{cal['threshold']:.4g}, coverage {cal['coverage']:.1%}; draft vocabulary covers "
        f"{cover['val']:.1%} of the big model's greedy tokens")
    lt = cert["ltt_part"]
    counts = {"head_positions": int(sum(map(len, head_rows))), "gate_pairs": int(len(gate_pairs["t"])),
              "calibration_pairs": int(len(val_pairs["t"])), "map_pairs": int((~lt).sum()),
              "ltt_pairs": int(lt.sum()), "train_split": sources[0].split_train,
              "train_books": sorted({b for d in train for b in d.books})}
    meta = eagle_meta(sources, big, cfg, head, counts, cal, metrics, cover,
                      {"head": hmeta, "fit_total_s": round(time.time() - t_start, 1)})
    meta["precision_maps"] = {"fitted_on": {"records": [str(s.path.resolve()) for s in sources],
                                            "split": next(s.split_val for s in sources if s.split_val),
                                            "pairs": int((~lt).sum()),
                                            "map_frac": cfg.map_frac, "by": "train.py fit"}}
    # the head drafts at most eagle_depth steps per big pass; up to max_skip - 1 when the copy rule is trusted
    max_skip = max(cfg.max_skip, cfg.eagle_depth + 1)
    EagleDrafter(head, gate, cal["threshold"], max_skip, big.tables, cfg.eagle_depth, meta,
                 cert["maps"][EagleDrafter.GATE]).save(out)
    log(f"[fit] saved {out} ({time.time() - t_start:.0f}s)")
    return out


__all__ = ["fit_eagle", "drafts_on", "gate_pick", "score_pairs", "certify_eagle", "summarize"]
