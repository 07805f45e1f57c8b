"""Reading records for training and evaluation, and running the predictor on record pairs.

Both `train.py fit` and `train.py evaluate` read the same records the same way (the big model's entry, its
hidden layer, the train / validation / test splits) and score the same (t, s) pairs through Predictor.run -
the code path of HeadsDrafter.propose - so they live here, once, and neither command imports the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import ProjectError
from corpus_tools.inventory import token_class_from_tables
from corpus_tools.records import open_records
from gate.model.copyrule import MAX_N, copy_rule
from gate.model.features import combine, pick_candidate
from gate.model.heads import context_ids, run_starts
from gate.model.heads_drafter import Predictor
from gate.model.precision import COPY_EXTEND, SourceMaps, combine_sources
from gate.train.calibration import ltt_calibrate
from gate.train.distill import HeadData

VAL_NAMES = ("validation", "val", "valid", "dev")
# positions per stretch dealt to the precision maps or the threshold (docs/drafters.md, "One score scale")
MAP_CHUNK = 64


class FitError(RuntimeError, ProjectError):
    """Bad input to fit/evaluate (records, splits, options); the message names the path and the problem."""


# ------------------------------------------------------------------------------------------------ records
@dataclass
class SplitData:
    """One split of the records for the big model (rows = record positions in file order; hidden at the
    drafter's layer; the top-k / p_max / entropy fields are None when not recorded)."""
    name: str
    tokens: np.ndarray
    argmax: np.ndarray
    target: np.ndarray
    book: np.ndarray
    pos: np.ndarray
    hidden: np.ndarray
    run_start: np.ndarray
    topk_ids: np.ndarray | None
    topk_p: np.ndarray | None
    p_max: np.ndarray | None
    entropy_norm: np.ndarray | None
    books: list
    rows: np.ndarray | None = None      # rows of the whole split these are (select_part); None: all, in order

    def split_rows(self, i: np.ndarray) -> np.ndarray:
        """Rows of the whole recorded split for rows i of this data (for fields read separately)."""
        return i if self.rows is None else self.rows[i]

    def copy_rule(self, max_n: int = MAX_N, extend: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(candidate, match length) of the copy rule at every row (gate.model.copyrule), computed once."""
        cache = self.__dict__.setdefault("_copy_rule", {})
        if (max_n, extend) not in cache:
            cache[max_n, extend] = copy_rule(self.tokens, self.run_start, max_n, extend)
        return cache[max_n, extend]

    def head_data(self) -> HeadData:
        return HeadData(self.tokens, self.argmax, self.hidden, self.run_start, self.topk_ids, self.topk_p)

    def __len__(self):
        return len(self.tokens)


def open_records_checked(path):
    p = Path(path)
    if not p.exists():
        raise FitError(f"{p}: no such records folder (make one with `python train.py record`)")
    return open_records(p)


def model_entry(rec, path, name: str | None) -> dict:
    models = rec.meta.get("models") or []
    if not models:
        raise FitError(f"{path}: records list no models in their metadata")
    if name is None:  # the big model: the largest recorded one
        return max(models, key=lambda m: (m.get("n_layers", 0) * m.get("hidden_size", 0), m["name"]))
    for m in models:
        if m["name"] == name:
            return m
    return {}


def resolve_layer(entry: dict, layer, path) -> int:
    recorded = sorted(int(x) for x in entry.get("layers", []))
    if not recorded:
        raise FitError(f"{path}: records of {entry['name']!r} hold no hidden states (record with --layers)")
    want = entry["n_layers"] if str(layer) == "last" else int(layer)
    if want not in recorded:
        raise FitError(f"{path}: hidden layer {want} of {entry['name']!r} not recorded (recorded: {recorded})")
    return want


def find_split(rec, path, kind: str) -> str:
    splits = list(rec.splits)
    names = VAL_NAMES if kind == "validation" else (kind,)
    for n in names:
        if n in splits:
            return n
    raise FitError(f"{path}: records have no {kind} split (splits: {', '.join(splits) or 'none'}); "
                   "record the corpus with train/validation/test books")


SPLIT_FIELDS = ("token", "target", "book", "pos", "argmax", "topk_ids", "topk_p", "p_max", "entropy_norm")


def load_fields(rec, path, split: str, model: str, fields) -> dict:
    """rec.load with errors turned into FitError naming the records path."""
    try:
        a = rec.load(split, fields=list(fields), models=[model])
    except KeyError as e:
        raise FitError(f"{path}: {e.args[0] if e.args else e}") from None
    return a


def load_split(rec, path, split: str, model: str, layer: int | tuple[int, ...]) -> SplitData:
    """One split of a records folder; with several layers, their hidden states side by side [n, len(layers) * d]."""
    layers = tuple(layer) if isinstance(layer, (tuple, list)) else (layer,)
    hid = [f"hidden/{lay}" for lay in layers]
    a = load_fields(rec, path, split, model, SPLIT_FIELDS + tuple(hid))
    pre = f"{model}/"
    need = ["token", "target", "book", "pos", pre + "argmax", *(pre + h for h in hid)]
    miss = [k for k in need if k not in a]
    if miss:
        raise FitError(f"{path}: split {split!r} lacks fields {', '.join(miss)}")
    n = len(a["token"])
    if n == 0:
        raise FitError(f"{path}: split {split!r} is empty (no recorded positions)")
    book, pos = np.asarray(a["book"]), np.asarray(a["pos"])
    hidden = a[pre + hid[0]] if len(hid) == 1 else np.concatenate([a.pop(pre + h) for h in hid], axis=1)
    return SplitData(split, np.asarray(a["token"], dtype=np.int64), np.asarray(a[pre + "argmax"], dtype=np.int64),
                     np.asarray(a["target"], dtype=np.int64), book, pos, hidden,
                     run_starts(book, pos), a.get(pre + "topk_ids"), a.get(pre + "topk_p"), a.get(pre + "p_max"),
                     a.get(pre + "entropy_norm"), list(rec.books(split)))


def parse_part(part: str | None) -> tuple[int, int] | None:
    """'I/K' -> (I, K), 1 <= I <= K; None passes."""
    if part is None:
        return None
    try:
        i, k = (int(x) for x in part.split("/"))
    except ValueError:
        raise FitError(f"--part {part!r}: write I/K, e.g. 1/2 (every K-th book of the split, from the I-th)") from None
    if not 1 <= i <= k:
        raise FitError(f"--part {part}: needs 1 <= I <= K")
    return i, k


def split_books(data: SplitData, part: str | None) -> list[str]:
    """The books of a loaded split (only those of the part, with --part)."""
    return list(data.books) if part is None else sorted({data.books[b] for b in set(data.book)})


def select_part(data: SplitData, part: str | None, path) -> SplitData:
    """The rows of every K-th book of the split, from the I-th (--part I/K): disjoint parts of one split, to
    calibrate on one and evaluate on another."""
    ik = parse_part(part)
    if ik is None:
        return data
    i, k = ik
    rows = np.flatnonzero(data.book % k == i - 1)
    if len(rows) == 0:
        raise FitError(f"{path}: --part {part} of split {data.name!r} holds no book ({len(data.books)} books)")
    pick = (lambda a: None if a is None else np.asarray(a[rows]))
    book, pos = data.book[rows], data.pos[rows]
    return SplitData(data.name, data.tokens[rows], data.argmax[rows], data.target[rows], book, pos,
                     np.asarray(data.hidden[rows]), run_starts(book, pos), pick(data.topk_ids), pick(data.topk_p),
                     pick(data.p_max), pick(data.entropy_norm), data.books, data.split_rows(rows))


def join_splits(parts: list[SplitData]) -> tuple[SplitData, np.ndarray]:
    """Several records folders' splits as one (for the pairs of a drafter fitted on several): (joined, offsets),
    row r of part i = row offsets[i] + r. Runs, books and the copy rule stay per part; hidden states and the
    top-k fields are not joined (None). One part is returned as it is."""
    offsets = np.cumsum([0] + [len(d) for d in parts[:-1]]).astype(np.int64)
    if len(parts) == 1:
        return parts[0], offsets
    cat = lambda f: np.concatenate([np.asarray(getattr(d, f)) for d in parts])   # noqa: E731
    n_books = np.cumsum([0] + [len(d.books) for d in parts[:-1]])
    book = np.concatenate([np.asarray(d.book) + nb for d, nb in zip(parts, n_books)])
    run_start = np.concatenate([np.asarray(d.run_start) + off for d, off in zip(parts, offsets)])
    return SplitData(parts[0].name, cat("tokens"), cat("argmax"), cat("target"), book, cat("pos"), None, run_start,
                     None, None, None, None, [b for d in parts for b in d.books]), offsets


# ------------------------------------------------------------------------------------------------ pairs
def chunk_folds(n: int, seed: int, frac: float, chunk: int = 512) -> np.ndarray:
    """Boolean [n]: True for rows in the held-out fraction of chunks (seeded shuffle)."""
    n_chunks = max(1, math.ceil(n / chunk))
    rng = np.random.default_rng(seed + 7919)
    held = np.zeros(n_chunks, dtype=bool)
    held[rng.permutation(n_chunks)[:max(1, int(round(frac * n_chunks)))]] = True
    if n_chunks == 1:
        held[:] = False
    return np.repeat(held, chunk)[:n]


def copy_slice(copy: dict | None, t: np.ndarray) -> dict | None:
    return None if copy is None else {k: v[t] for k, v in copy.items()}


def predict_pairs(pred: Predictor, data: SplitData, t: np.ndarray, s: np.ndarray, batch: int = 4096,
                  desc: str | None = None, gates: dict | None = None, mode: str | None = None,
                  modes: tuple[str, ...] = (), copy: dict | None = None, keep_X: bool = False) -> dict:
    """Run the predictor (and gates) on record pairs (t, s), in batches, through Predictor.run - the code path
    of HeadsDrafter.propose. `copy`: context_copy_stats(data) (the in-context index at every position).
    Returns numpy arrays: cands/valid/correct/cls [P, K] per candidate slot, head_p / head_entropy /
    head1_correct [P] for the head's own top token, X [P, K, F] with keep_X, and per gate its scores [P, K] and
    the selected candidate ("sel": slot, token, score, correct, cls). `modes`: head1_correct_<mode> for other
    predictor modes from the same head outputs."""
    from tqdm.auto import tqdm

    keys = ("cands", "valid", "cls", "head_p", "head_entropy") + (("X",) if keep_X else ())
    outs = {k: [] for k in keys}
    scores = {n: [] for n in (gates or {})}
    other = {m: [] for m in modes}
    n_r = len(pred.rids)
    rng = range(0, len(t), batch)
    for i in (tqdm(rng, desc=desc, leave=False, mininterval=2) if desc else rng):
        tb, sb = t[i:i + batch], s[i:i + batch]
        ctx = torch.from_numpy(context_ids(data.tokens, data.run_start, tb, pred.n_ctx, pred.pad))
        h = torch.from_numpy(np.asarray(data.hidden[tb - sb], dtype=np.float32))
        o = pred.run(ctx, h, torch.from_numpy(sb), copy_slice(copy, tb), mode=mode)
        for k in keys:
            v = o[k]
            outs[k].append(v.numpy() if torch.is_tensor(v) else v)
        X = o["X"]
        for n, g in (gates or {}).items():
            scores[n].append(g.score(X.reshape(-1, X.shape[-1])).reshape(X.shape[:2]).numpy())
        for m in modes:
            other[m].append(pred.rids[combine(o["pw"], o["pf"], m)[:, :n_r].argmax(-1)].numpy())
    res = {k: np.concatenate(v) for k, v in outs.items()}
    am = data.argmax[t]
    res["correct"] = (res["cands"] == am[:, None]) & res["valid"]
    res["head1_correct"] = res["correct"][:, 0]
    for m, v in other.items():
        res[f"head1_correct_{m}"] = np.concatenate(v) == am
    res["t"], res["s"] = t, s
    res["scores"] = {n: np.concatenate(v) for n, v in scores.items()}
    res["sel"] = {}
    for n, sc in res["scores"].items():
        slot, tok, best = pick_candidate(torch.from_numpy(sc), res)
        idx = np.arange(len(slot))
        res["sel"][n] = {"slot": slot, "token": tok, "score": best, "correct": res["correct"][idx, slot],
                         "cls": res["cls"][idx, slot]}
    return res


def copy_settings(scoring) -> tuple[int, int]:
    """(max_n, extend) of the copy rule a drafter's scoring reads (its CopyIndex(max_n).query(extend))."""
    if isinstance(scoring, dict):
        scoring = next(iter(scoring.values()), None)
    if isinstance(scoring, SourceMaps):
        return (scoring.max_n, scoring.extend) if scoring.max_n > 0 else (MAX_N, COPY_EXTEND)
    return (MAX_N, 0) if scoring is None else (len(scoring) - 1, 0)


def attach_copy(o: dict, data: SplitData, max_n: int, extend: int, tables: dict | None = None) -> dict:
    """o["copy"]: the copy rule's candidate, match length, correctness (and class, with the token tables) per pair
    of o."""
    t = o["t"]
    cand, length = data.copy_rule(max_n, extend)
    cand, length = cand[t], length[t].astype(np.int64)
    cls = None if tables is None else token_class_from_tables(data.tokens[t], np.maximum(cand, 0), tables["cls"],
                                                              tables["ends_alnum"])
    o["copy"] = {"token": cand, "len": length, "correct": cand == data.argmax[t], "cls": cls}
    return o


def apply_scoring(o: dict, data: SplitData, scoring, tables: dict) -> dict:
    """Each gate's pick combined with the copy rule's candidate (gate.model.precision.combine_sources, the function
    HeadsDrafter.propose calls): `scoring` is {gate: SourceMaps} (estimated precisions), an older artifact's
    trust table (one for every gate), or None (the gates' picks alone). Adds o["copy"] (attach_copy)."""
    cp = attach_copy(o, data, *copy_settings(scoring), tables)["copy"]
    am = data.argmax[o["t"]]
    for name, sel in o["sel"].items():
        sc = scoring.get(name) if isinstance(scoring, dict) else scoring
        if sc is None:
            continue
        tok, score, used = combine_sources(sel["token"], sel["score"], cp["token"], cp["len"], sc)
        cls = sel.get("cls") if cp["cls"] is None else np.where(used, cp["cls"], sel["cls"])
        sel.update(token=tok, score=score, correct=tok == am, cls=cls,
                   slot=np.where(used, -1, sel["slot"]), copy_used=used)
    return o


def stretch_ids(t: np.ndarray) -> np.ndarray:
    """The stretch of every pair's position: chunks of up to MAP_CHUNK positions, at least 10 of them. The maps
    and the threshold are dealt whole stretches, and the threshold's test counts a stretch's errors together."""
    t = np.asarray(t)
    return t // max(1, min(MAP_CHUNK, (int(t.max()) + 1) // 10)) if len(t) else t


def map_part(t: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask over pairs: True for the part the precision maps are fitted on, False for the part the
    threshold is certified on. Whole stretches of positions go to one part (chunks of up to MAP_CHUNK, at least
    10 of them), dealt by a seeded shuffle; both parts hold some pairs whenever there are two chunks."""
    t = np.asarray(t)
    if len(t) == 0:
        return np.zeros(0, dtype=bool)
    ids = stretch_ids(t)
    uniq = np.unique(ids)
    n_map = min(max(1, int(round(frac * len(uniq)))), len(uniq) - 1)
    pick = np.random.default_rng(seed + 104729).permutation(uniq)[:n_map]
    return np.isin(ids, pick)


def fit_scoring(o: dict, data: SplitData, mask: np.ndarray, max_n: int) -> dict:
    """{gate: SourceMaps} for every gate of o, fitted on the pairs where mask is True (the gate's pick and the
    copy rule's candidate there, gate.model.precision); max_n: the copy index's cap (0: no copy rule)."""
    cp = attach_copy(o, data, max_n if max_n > 0 else MAX_N, COPY_EXTEND)["copy"]
    tok, n, ok, m = cp["token"][mask], cp["len"][mask], cp["correct"][mask], mask
    return {name: SourceMaps.fit(sel["score"][m], sel["correct"][m], tok, n, ok, sel["token"][m], max_n)
            for name, sel in o["sel"].items()}


def certify_pairs(o: dict, data: SplitData, tables: dict, max_n: int, target: float, delta: float, map_frac: float,
                  seed: int, baselines: bool = True) -> dict:
    """The one calibration of fit and calibrate: precision maps fitted on a part of the pairs (map_part), every
    gate's pick combined with the copy rule through them (apply_scoring), and a Learn-then-Test threshold for
    each gate on the other part, at delta / number of gates (the caller may pick among them); with `baselines`,
    the untrained rules too, at delta. Returns maps, calibration, scored (score, correct on the threshold part
    per method), ltt_part (mask over o's pairs), oracle (its coverage there) and the combined pairs."""
    mask = map_part(o["t"], map_frac, seed)
    maps = fit_scoring(o, data, mask, max_n)
    apply_scoring(o, data, maps, tables)
    lt, cp = ~mask, o["copy"]
    scored = {n: (v["score"][lt], v["correct"][lt]) for n, v in o["sel"].items()}
    if baselines:
        scored.update({"max_prob": (o["head_p"][lt], o["head1_correct"][lt]),            # BiLD's fallback rule
                       "entropy": (1.0 - o["head_entropy"][lt], o["head1_correct"][lt]),  # entropy-gated switching
                       "copy": (cp["len"][lt].astype(np.float64), cp["correct"][lt])})    # prompt lookup
    n_gates = len(o["sel"])
    groups = stretch_ids(o["t"])[lt]         # errors come in stretches (a loop copied wrongly): counted together
    calib = {n: ltt_calibrate(sc, ok, target, delta / (n_gates if n in o["sel"] else 1), groups=groups)
             for n, (sc, ok) in scored.items()}
    oracle = (o["correct"].any(1) | (cp["correct"] if max_n > 0 else False))[lt]   # max_n 0: no copy proposals
    return {"maps": maps, "calibration": calib, "scored": scored, "ltt_part": lt, "pairs": o,
            "oracle": float(oracle.mean()) if len(oracle) else 0.0}


def subsample_pairs(t, s, n_max, seed):
    """At most n_max of the pairs (t, s), a seeded sample kept in order."""
    if len(t) <= n_max:
        return t, s
    idx = np.sort(np.random.default_rng(seed).choice(len(t), n_max, replace=False))
    return t[idx], s[idx]
