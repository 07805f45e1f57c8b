"""`python train.py fit --records DIR --out DIR`: train the heads and the gate from records, calibrate, save.

    fit(records, out, model=None, force=False, log=print, **settings) -> out     # settings: FitConfig fields

The heads drafter (the default): records -> folds, n-gram table, restricted vocabulary -> heads -> predictor
mode -> gates -> Learn-then-Test calibration -> the HeadsDrafter folder; heads, mode and gates are resumable
stages under OUT/stages/ (gate/train/stages.py). --drafter eagle / router hand over to fit_eagle.py /
fit_router.py. Before any work the settings are checked (FitError) and an artifact in --out that this fit would
not have made is refused unless --force. Deterministic for a seed, machine and thread count.
docs/training.md: data use, pairs, stages and why.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corpus_tools.inventory import CLASSES, KINDS, restricted_vocab, token_table
from gate.model.artifact import META_FILE, ArtifactError
from gate.model.eagle import EAGLE_FORMAT
from gate.model.features import GATES, LogisticGate, MLPGate, pick_candidate, torch_threads
from gate.model.heads import FutureHeads, HiddenNorm, NgramTable, WordHead, context_copy_stats, pair_index
from gate.model.heads_drafter import FORMAT, HeadsDrafter, Predictor
from gate.model.load import kind_of, read_meta
from gate.model.router import ROUTER_FORMAT
from gate.train.calibration import coverage_at_precision
from gate.train.config import FitConfig, add_arguments, options_from_args
from gate.train.data import (
    FitError,
    SplitData,
    certify_pairs,
    chunk_folds,
    find_split,
    load_split,
    model_entry,
    open_records_checked,
    predict_pairs,
    resolve_layer,
    subsample_pairs,
)
from gate.train.distill import train_future_heads, train_word_head
from gate.train.fit_eagle import check_sources, fit_eagle
from gate.train.fit_router import fit_router
from gate.train.pca import pca_fit
from gate.train.stages import StageCache, stage_key
from runtimes.backend import eagle3_layers
from runtimes.info import TokenizerMismatch
from runtimes.loading import load as load_model

GATE_VERSION = 3      # bump when the features change, so finished gate stages are not reused


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Source:
    """The records a fit reads: the big model's entry, its hidden layer, the train and validation splits."""
    rec: object
    path: Path
    entry: dict
    layer: int | tuple[int, ...]      # a tuple for the feature head (eagle_layers)
    split_train: str
    split_val: str | None             # None: a --drafter eagle folder with no validation books (it only trains)

    @property
    def name(self) -> str:
        return self.entry["name"]


@dataclass
class BigModel:
    """What the fit copies from the big model: input and output embeddings (dropped once the heads have them),
    its info, per-token tables."""
    embed: torch.Tensor | None
    out_emb: torch.Tensor | None
    info: dict
    tables: dict
    tokenizer: object
    V: int                                         # vocabulary (output rows)
    D: int                                         # hidden size
    arch: dict | None = None                       # heads, kv heads, MLP width, rope theta, norm eps, final norm


@dataclass
class TrainData:
    """The splits, the head / gate folds of train, the n-gram table and the restricted vocabulary R."""
    tr: SplitData
    va: SplitData
    data_id: str
    head_rows: np.ndarray
    gate_rows: np.ndarray
    ngram: NgramTable
    ngram_info: dict
    rids: np.ndarray
    rmap: torch.Tensor
    in_r: dict


def open_source(records, model: str | None, cfg: FitConfig) -> Source:
    if hasattr(records, "load"):                 # an open records object (tests)
        rec, path = records, Path(getattr(records, "path", "records"))
    else:
        path = Path(records)
        rec = open_records_checked(path)
    entry = model_entry(rec, path, model)
    if model is not None and not entry:
        _refuse_unrecorded_model(rec, path, model)
    layer = (tuple(resolve_layer(entry, lay, path) for lay in eagle_layer_spec(cfg.eagle_layers, entry["n_layers"]))
             if cfg.drafter == "eagle" else resolve_layer(entry, cfg.layer, path))
    try:
        val = find_split(rec, path, "validation")
    except FitError:
        if cfg.drafter != "eagle":   # the feature head reads several folders: one without validation books trains
            raise
        val = None
    return Source(rec, path, entry, layer, find_split(rec, path, "train"), val)


def eagle_layer_spec(spec: str, n_layers: int) -> list[int]:
    """--eagle-layers "eagle3" or "2,middle,-3" -> [2, n/2, n-3] (FitError on anything but three layers in 0..n)."""
    if spec == "eagle3":
        return list(eagle3_layers(n_layers))
    out = []
    for s in str(spec).split(","):
        s = s.strip()
        lay = n_layers // 2 if s == "middle" else n_layers if s == "last" else None
        if lay is None:
            try:
                lay = int(s)
            except ValueError:
                raise FitError(f"--eagle-layers {spec!r}: {s!r} is not a layer (a number, middle or last)") from None
            lay = lay + n_layers if lay < 0 else lay
        if not 0 <= lay <= n_layers:
            raise FitError(f"--eagle-layers {spec!r}: layer {s} outside 0..{n_layers}")
        out.append(lay)
    if len(out) != 3 or len(set(out)) != 3:
        raise FitError(f"--eagle-layers {spec!r}: EAGLE-3 fuses three different layers (low, middle, high)")
    return sorted(out)


def _refuse_unrecorded_model(rec, path: Path, model: str):
    """--model names a model without records: a TokenizerMismatch if its tokenizer differs, else FitError."""
    info = load_model(model).info
    if info.fingerprint != rec.fingerprint:
        raise TokenizerMismatch(f"{path}: records were made with tokenizer {rec.fingerprint} "
                                f"({', '.join(rec.models)}) but --model {model!r} has tokenizer "
                                f"{info.fingerprint}")
    raise FitError(f"{path}: no records of model {model!r} (recorded: {', '.join(rec.models)})")


def load_big_model(src: Source, cfg: FitConfig, log) -> BigModel:
    """The big model's frozen embedding, output rows, token kinds; and the tokenizer check."""
    t0 = time.time()
    rec = src.rec
    lm = load_model(src.name, dtype=cfg.dtype)
    if lm.info.fingerprint != rec.fingerprint or src.entry.get("fingerprint", rec.fingerprint) != rec.fingerprint:
        raise TokenizerMismatch(f"{src.path}: records were made with tokenizer {rec.fingerprint} but model "
                                f"{src.name!r} now loads with tokenizer {lm.info.fingerprint}")
    embed = lm.model.get_input_embeddings().weight.detach().clone()        # model dtype; rows cast when used
    big = BigModel(embed, lm.model.get_output_embeddings().weight.detach().clone(), lm.info.to_dict(),
                   _token_tables(token_table(lm.tokenizer), embed.shape[0]), lm.tokenizer, *embed.shape,
                   arch=_arch(lm.model))
    log(f"[fit] big model {src.name} ({big.info['n_params'] / 1e6:.1f}M params, layer {src.layer}/"
        f"{src.entry['n_layers']}, V={big.V}, d={big.D}) loaded in {time.time() - t0:.1f}s")
    return big


def _arch(model) -> dict:
    """The big model's shapes a head in its layout copies, and its final norm's weight (None where unknown)."""
    c = model.config
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", None) or 1e4
    norm = getattr(getattr(model, "model", None), "norm", None)
    return {"n_heads": c.num_attention_heads, "n_kv_heads": getattr(c, "num_key_value_heads", None),
            "mlp": getattr(c, "intermediate_size", None), "rope_theta": float(rope),
            "eps": float(getattr(c, "rms_norm_eps", 1e-6)),
            "final_norm": None if norm is None else norm.weight.detach().float().clone()}


def _token_tables(tab: dict, V: int) -> dict:
    """Per-token kind / class / ends_alnum over the V output rows (rows beyond the tokenizer are "other")."""
    tables = {}
    for k, fill in (("kind", KINDS.index("other")), ("cls", CLASSES.index("other")), ("ends_alnum", False)):
        a = tab[k][:V]
        if len(a) < V:
            a = np.concatenate([a, np.full(V - len(a), fill, dtype=a.dtype)])
        tables[k] = a
    return tables


def prepare_data(src: Source, big: BigModel, cfg: FitConfig, log) -> TrainData:
    """Load the splits, deal train into head / gate folds, build the n-gram table and the restricted vocab."""
    rec, path = src.rec, src.path
    tr = load_split(rec, path, src.split_train, src.name, src.layer)
    va = load_split(rec, path, src.split_val, src.name, src.layer)
    if tr.hidden.shape[1] != big.D:
        raise FitError(f"{path}: hidden size {tr.hidden.shape[1]} but model {src.name!r} has {big.D}")
    log(f"[fit] records {path}: {src.split_train} {len(tr):,} positions ({len(tr.books)} books), "
        f"{src.split_val} {len(va):,} ({len(va.books)} books)")
    data_id = stage_key(str(path.resolve()), rec.fingerprint, json.dumps(rec.meta, sort_keys=True, default=str),
                        len(tr), len(va), int(tr.tokens[:1000].sum()), int(va.tokens[:1000].sum()), src.name,
                        src.layer)
    head_rows, gate_rows = _folds(tr, cfg, src)
    t0 = time.time()
    ngram, ngram_info = build_ngram(rec, path, tr, gate_rows, big.tokenizer, big.V, log)
    big.tokenizer = None
    log(f"[fit] n-gram table: {ngram.n_entries():,} contexts from {ngram_info['tokens']:,} tokens of "
        f"{ngram_info['source']} ({time.time() - t0:.1f}s)")
    rids, rmap, in_r = _restricted(tr, va, head_rows, big, cfg, log)
    return TrainData(tr, va, data_id, head_rows, gate_rows, ngram, ngram_info, rids, rmap, in_r)


def _folds(tr: SplitData, cfg: FitConfig, src: Source) -> tuple[np.ndarray, np.ndarray]:
    """Rows of train for the heads and for the gates (chunks of 512 positions dealt by a seeded shuffle)."""
    gate_rows_mask = chunk_folds(len(tr), cfg.seed, cfg.gate_frac)
    head_rows = np.flatnonzero(~gate_rows_mask)
    gate_rows = np.flatnonzero(gate_rows_mask)
    if len(head_rows) > cfg.max_train:
        head_rows = np.sort(np.random.default_rng(cfg.seed).choice(head_rows, cfg.max_train, replace=False))
    if len(head_rows) < 2 or len(gate_rows) < 2:
        raise FitError(f"{src.path}: split {src.split_train!r} has too few positions ({len(tr)}) to train on")
    return head_rows, gate_rows


def _restricted(tr: SplitData, va: SplitData, head_rows, big: BigModel, cfg: FitConfig, log):
    """The restricted vocabulary R from what the heads must predict; rmap: token id -> index in R (R: other)."""
    V = big.V
    freq = np.bincount(tr.argmax[head_rows], minlength=V)[:V] + 1e-3 * np.bincount(tr.tokens[head_rows],
                                                                                   minlength=V)[:V]
    rids = restricted_vocab(freq, big.tables["kind"], cfg.restricted)
    R = len(rids)
    rmap = torch.full((V,), R, dtype=torch.long)
    rmap[torch.from_numpy(rids)] = torch.arange(R)
    in_r = {"train": float(np.isin(tr.argmax[head_rows], rids).mean()), "val": float(np.isin(va.argmax, rids).mean())}
    log(f"[fit] restricted vocabulary: {R} tokens (+ other); big argmax in it: train {in_r['train']:.1%}, "
        f"val {in_r['val']:.1%}")
    return rids, rmap, in_r


def build_ngram(rec, path, tr: SplitData, gate_rows: np.ndarray, tokenizer, V: int, log):
    """NgramTable over the train books' full text (from the corpus the records name), masking the continuation
    of every gate-fold position; falls back to the recorded train tokens when the text is not there or does not
    tokenize to the recorded ids."""
    gate_mask_rows = np.zeros(len(tr), dtype=bool)
    gate_mask_rows[gate_rows] = True
    corpus = Path(str(rec.meta.get("corpus", "")))
    seqs, masks, source = [], [], None
    if corpus.is_dir():
        try:
            seqs, masks = _corpus_sequences(corpus, tr, gate_mask_rows, tokenizer)
            source = f"corpus {corpus} ({len(seqs)} train books)"
        except (OSError, ValueError) as e:
            log(f"[fit] n-gram table: cannot use the corpus text ({e}); using the recorded tokens")
            seqs, masks = [], []
    if not seqs:
        seqs, masks = _recorded_sequences(tr, gate_mask_rows)
        source = f"recorded {tr.name} tokens of {path}"
    table = NgramTable.build(seqs, V, masks=masks)
    return table, {"source": source, "tokens": int(sum(len(x) for x in seqs)), "entries": table.n_entries()}


def _corpus_sequences(corpus: Path, tr: SplitData, gate_mask_rows: np.ndarray, tokenizer):
    """Each train book's full text as ids, with the continuations of gate-fold positions masked."""
    seqs, masks = [], []
    for bi, book in enumerate(tr.books):
        ids = np.asarray(tokenizer((corpus / "text" / f"{book}.txt").read_text(encoding="utf-8"),
                                   verbose=False).input_ids, dtype=np.int64)
        rows = np.flatnonzero(tr.book == bi)
        pos = tr.pos[rows]
        if len(rows) and (pos.max() >= len(ids) or not np.array_equal(ids[pos], tr.tokens[rows])):
            raise ValueError(f"book {book}: text does not tokenize to the recorded ids")
        m = np.zeros(len(ids), dtype=bool)
        g = rows[gate_mask_rows[rows]]
        m[np.minimum(tr.pos[g] + 1, len(ids) - 1)] = True
        seqs.append(ids)
        masks.append(m)
    return seqs, masks


def _recorded_sequences(tr: SplitData, gate_mask_rows: np.ndarray):
    """Each recorded stretch of train (+ its last target), with the continuations of gate-fold positions masked."""
    seqs, masks = [], []
    for start in np.unique(tr.run_start):
        end = start
        while end + 1 < len(tr) and tr.run_start[end + 1] == start:
            end += 1
        seqs.append(np.r_[tr.tokens[start:end + 1], tr.target[end]])
        masks.append(np.r_[False, gate_mask_rows[start:end + 1]])
    return seqs, masks


# ------------------------------------------------------------------------------------------------ stage: heads
@dataclass
class Heads:
    """The heads stage's result; `key` is its cache key, which the later stages build on."""
    word: WordHead
    future: FutureHeads
    norm: HiddenNorm
    pca_mean: torch.Tensor
    pca_proj: torch.Tensor
    key: str
    timings: dict

    def predictor(self, data: TrainData, tables: dict, max_s: int) -> Predictor:
        return Predictor(self.word, self.future, self.norm, torch.from_numpy(data.rids), tables, self.pca_mean,
                         self.pca_proj, mode="word", max_s=max_s, ngram=data.ngram)


def stage_heads(cache: StageCache, big: BigModel, data: TrainData, cfg: FitConfig, log) -> Heads:
    """Word-completion head, future heads and the hidden-state PCA, trained on the head fold (or loaded)."""
    key = stage_key("heads", data.data_id, cfg.stage_settings("heads"))
    tr, seed, V, D, R = data.tr, cfg.seed, big.V, big.D, len(data.rids)
    rows = data.head_rows if len(data.head_rows) < 50000 else np.sort(
        np.random.default_rng(seed).choice(data.head_rows, 50000, replace=False))
    norm = HiddenNorm(D, *HiddenNorm.stats(tr.hidden[rows], seed=seed))
    ow = big.out_emb[torch.from_numpy(data.rids)].float()
    big.out_emb = None
    out_w, out_b = torch.zeros(R + 1, D), torch.zeros(R + 1)
    out_w[:R] = ow * norm.std[None, :]             # exact big logits on R at init (see gate/model/heads.py)
    out_b[:R] = ow @ norm.mean

    def word_head(embed=None) -> WordHead:
        return WordHead(V, D, R + 1, n_ctx=cfg.n_ctx, d_tok=cfg.d_tok, d_hid=cfg.d_hid, width=cfg.width,
                        max_s=cfg.max_skip - 1, use_hidden=cfg.word_inputs == "tokens+hidden", embed=embed)

    def train():
        torch.manual_seed(seed)
        word = word_head(big.embed)
        word.init_output(out_w, out_b)
        future = FutureHeads(D, R + 1, cfg.max_skip - 1, out_w, out_b)
        timings = _train_heads(word, future, norm, data, cfg)
        pca_mean, pca_proj = _heads_pca(tr, data.head_rows, norm, cfg)
        log(f"[fit] heads trained in {timings['future_heads_s'] + timings['word_head_s']:.0f}s")
        st = {f"word.{k}": v.contiguous() for k, v in word.state_dict().items()}
        st.update({f"future.{k}": v.contiguous() for k, v in future.state_dict().items()})
        st.update({"pca.mean": pca_mean.contiguous(), "pca.proj": pca_proj.contiguous()})
        return {"timings": timings}, st

    meta, st = cache.run("heads", key, train, with_tensors=True)
    big.embed = None
    word, future = word_head(), FutureHeads(D, R + 1, cfg.max_skip - 1, out_w, out_b)
    word.load_state_dict({k[5:]: v for k, v in st.items() if k.startswith("word.")})
    future.load_state_dict({k[7:]: v for k, v in st.items() if k.startswith("future.")})
    return Heads(word, future, norm, st["pca.mean"], st["pca.proj"], key, meta.get("timings", {}))


def _train_heads(word: WordHead, future: FutureHeads, norm: HiddenNorm, data: TrainData, cfg: FitConfig) -> dict:
    """Train the future heads, then the word head (baked afterwards); returns their timings."""
    hd, rows, timings = data.tr.head_data(), data.head_rows, {}
    common = dict(batch=cfg.batch, soft_weight=cfg.soft_weight, reg_weight=cfg.reg_weight, min_steps=cfg.min_steps)
    t0 = time.time()
    train_future_heads(future, norm, hd, rows, data.rmap, epochs=cfg.future_epochs, seed=cfg.seed, **common)
    timings["future_heads_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    train_word_head(word, norm, hd, rows, data.rmap, epochs=cfg.epochs, seed=cfg.seed + 1, **common)
    timings["word_head_s"] = round(time.time() - t0, 1)
    word.bake()
    return timings


def _heads_pca(tr: SplitData, head_rows: np.ndarray, norm: HiddenNorm, cfg: FitConfig):
    sub = head_rows if len(head_rows) <= 20000 else np.sort(
        np.random.default_rng(cfg.seed + 2).choice(head_rows, 20000, replace=False))
    return pca_fit(norm(torch.from_numpy(np.asarray(tr.hidden[sub], dtype=np.float32))).numpy(), cfg.n_pca)


# ------------------------------------------------------------------------------------------------ stage: mode
@dataclass
class Pairs:
    """(t, s) pairs of one split and its in-context copy statistics."""
    t: np.ndarray
    s: np.ndarray
    copy: dict


def stage_mode(cache: StageCache, pred: Predictor, val: Pairs, data: TrainData, cfg: FitConfig, key_heads: str,
               log) -> dict:
    """The predictor mode (word / future / mix) by validation accuracy, unless --predictor names one."""
    key = stage_key("mode", key_heads, cfg.stage_settings("mode"), data.ngram_info, GATE_VERSION)

    def choose():
        o = predict_pairs(pred, data.va, val.t, val.s, modes=("word", "future", "mix"), desc="val heads",
                          copy=val.copy)
        acc = {}
        for m in ("word", "future", "mix"):
            c = o[f"head1_correct_{m}"]
            acc[m] = {"accuracy": float(c.mean()),
                      "accuracy_by_s": {int(j): float(c[val.s == j].mean()) for j in range(1, pred.max_s + 1)
                                        if (val.s == j).any()}}
        mode = max(acc, key=lambda m: acc[m]["accuracy"]) if cfg.predictor == "auto" else cfg.predictor
        if mode not in acc:
            raise FitError(f"--predictor {mode!r}: choose auto, word, future or mix")
        log("[fit] val accuracy (candidate == big argmax): " +
            ", ".join(f"{m} {a['accuracy']:.1%}" for m, a in acc.items()) + f" -> predictor {mode}")
        return {"mode": mode, "val_accuracy": acc}, None

    return cache.run("mode", key, choose)[0]


# ------------------------------------------------------------------------------------------------ stage: gates
def stage_gates(cache: StageCache, pred: Predictor, gate_pairs: Pairs, data: TrainData, cfg: FitConfig,
                key_mode: str, log) -> tuple[dict, dict]:
    """The learned gates (logreg, mlp) on every candidate of the gate-fold pairs; (gates, stage metadata)."""
    key = stage_key("gates", key_mode, pred.mode, cfg.stage_settings("gates"), GATE_VERSION)
    meta, st = cache.run("gates", key, lambda: _train_gates(pred, gate_pairs, data.tr, cfg, log), with_tensors=True)
    gates = {n: GATES[g["kind"]].from_state({k[len(n) + 1:]: v for k, v in st.items() if k.startswith(n + ".")},
                                            g["config"])
             for n, g in meta["gates"].items()}
    return gates, meta


def _train_gates(pred: Predictor, pairs: Pairs, tr: SplitData, cfg: FitConfig, log):
    t0 = time.time()
    o = predict_pairs(pred, tr, pairs.t, pairs.s, desc="gate features", copy=pairs.copy, keep_X=True)
    dev_pair = chunk_folds(len(tr), cfg.seed + 5, 0.2)[pairs.t]
    if dev_pair.all() or not dev_pair.any():
        dev_pair = np.zeros(len(pairs.t), dtype=bool)
        dev_pair[::5] = True
    rows = o["valid"] & ~dev_pair[:, None]
    X, y = o["X"][rows], o["correct"][rows].astype(np.float32)
    gates = {"logreg": LogisticGate().fit(X, y, seed=cfg.seed), "mlp": MLPGate(X.shape[1]).fit(X, y, seed=cfg.seed)}
    dev_cov = {n: _dev_coverage(g, o, dev_pair, cfg) for n, g in gates.items()}
    primary = max(dev_cov, key=lambda n: (dev_cov[n], n == "logreg"))
    st = {}
    for n, g in gates.items():
        st.update({f"{n}.{k}": v.contiguous() for k, v in g.state().items()})
    gm = {"gates": {n: {"kind": g.kind, "config": g.config()} for n, g in gates.items()},
          "primary": primary, "dev_coverage_at_target": dev_cov, "n_pairs": int(len(pairs.t)),
          "n_train_rows": int(rows.sum()), "n_dev_pairs": int(dev_pair.sum()), "positive_rate": float(y.mean()),
          "any_candidate_right": float(o["correct"].any(1).mean()), "seconds": round(time.time() - t0, 1)}
    log(f"[fit] gates trained on {int(rows.sum()):,} candidates of {int((~dev_pair).sum()):,} pairs (right "
        f"{y.mean():.1%}; some candidate right for {gm['any_candidate_right']:.1%} of pairs); mean coverage at "
        "95-99.5% precision on the gate-dev chunks: " +
        ", ".join(f"{n} {c:.1%}" for n, c in dev_cov.items()) + f" -> primary {primary}")
    return gm, st


def _dev_coverage(gate, o: dict, dev_pair: np.ndarray, cfg: FitConfig) -> float:
    """Mean coverage over precision levels around the target on the gate-dev pairs: one level alone (99%) on a
    few thousand pairs hinges on a handful of examples."""
    Xd = torch.from_numpy(o["X"][dev_pair])
    sc = gate.score(Xd.reshape(-1, Xd.shape[-1])).reshape(Xd.shape[:2])
    slot, _, best = pick_candidate(sc, {k: o[k][dev_pair] for k in ("valid", "cands")})
    ok = o["correct"][dev_pair][np.arange(len(slot)), slot]
    levels = sorted({0.95, 0.98, 0.99, 0.995, cfg.target_precision})
    return float(np.mean(list(coverage_at_precision(best, ok, levels).values())))


# ------------------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """LTT results per score, the primary gate, its threshold and the validation metrics."""
    calib: dict
    primary: str
    threshold: float
    val_metrics: dict
    maps: dict


def calibrate(pred: Predictor, gates: dict, primary: str, val: Pairs, data: TrainData, cfg: FitConfig,
              log) -> Calibration:
    """Precision maps and Learn-then-Test thresholds on validation (certify_pairs) for every gate (each combined
    with the copy rule as the drafter will) and baseline; the primary gate is the certified one with the
    largest coverage (the gate-dev choice if none is certified)."""
    o = predict_pairs(pred, data.va, val.t, val.s, gates=gates, desc="calibration", copy=val.copy)
    cert = certify_pairs(o, data.va, pred.tables, cfg.copy_max_n, cfg.target_precision, cfg.delta, cfg.map_frac,
                         cfg.seed)
    calib, o, lt = cert["calibration"], cert["pairs"], cert["ltt_part"]
    certified = {n: calib[n]["coverage"] for n in o["sel"] if calib[n]["certified"]}
    if certified:
        primary = max(certified, key=lambda n: (certified[n], n == "logreg"))
    val_metrics = {
        "pairs": int(len(val.t)), "map_pairs": int((~lt).sum()), "ltt_pairs": int(lt.sum()),
        "head_accuracy": float(o["head1_correct"].mean()),
        "drafter_accuracy": float(o["sel"][primary]["correct"].mean()),
        "any_candidate_right": float(o["correct"].any(1).mean()),
        "oracle": cert["oracle"],
        "coverage_at_precision": {n: {str(k): v for k, v in coverage_at_precision(sc, ok).items()}
                                  for n, (sc, ok) in cert["scored"].items()},
    }
    c = calib[primary]
    log(f"[fit] calibrated {primary} gate on {len(val.t):,} {data.va.name} pairs (precision maps on "
        f"{int((~lt).sum()):,}, threshold on {int(lt.sum()):,}): threshold {c['threshold']:.4g}, "
        f"coverage {c['coverage']:.1%} ({c['coverage'] / max(cert['oracle'], 1e-12):.2f} of the oracle's "
        f"{cert['oracle']:.1%}), precision {c['precision'] if c['precision'] is not None else float('nan'):.2%}, "
        f"error <= {1 - cfg.target_precision:.2%} with prob >= {1 - cfg.delta:.0%} (LTT; primary picked among "
        "certified gates: " + (", ".join(f"{n} {c:.1%}" for n, c in certified.items()) or "none") + ")"
        + ("" if c["certified"] else " - NO threshold certified: the gate will never skip"))
    return Calibration(calib, primary, c["threshold"], val_metrics, cert["maps"])


# ------------------------------------------------------------------------------------------------ artifact
def artifact_meta(src: Source, big: BigModel, data: TrainData, cfg: FitConfig, pairs: dict, mm: dict, gm: dict,
                  cal: Calibration, cost: dict, timings: dict) -> dict:
    """drafter.json's description of the training: big model, data, settings, calibration, metrics, cost."""
    rec, tr, va = src.rec, data.tr, data.va
    counts = {src.split_train: {"positions": len(tr), "books": tr.books, "head_positions": int(len(data.head_rows)),
                                "gate_positions": int(len(data.gate_rows)), "gate_pairs": int(len(pairs["gate"].t))},
              src.split_val: {"positions": len(va), "books": va.books, "calibration_pairs": int(len(pairs["val"].t))}}
    return {
        "big_model": {"name": src.name, "fingerprint": rec.fingerprint, "vocab_size": big.V, "hidden_size": big.D,
                      "n_layers": src.entry["n_layers"], "n_params": big.info["n_params"], "path": big.info["path"]},
        "training_data": {"records": str(src.path.resolve()), "splits": {"train": src.split_train, "validation":
                          src.split_val}, "counts": counts, "records_meta": {k: rec.meta.get(k) for k in
                          ("corpus", "context", "stride", "topk", "created") if k in rec.meta}},
        "config": cfg.as_dict(), "seed": cfg.seed, "target_precision": cfg.target_precision, "delta": cfg.delta,
        "ngram": data.ngram_info,
        "calibration": cal.calib, "calibrated_on": {"records": str(src.path.resolve()), "split": src.split_val,
                                                    "part": None, "books": va.books, "by": "train.py fit"},
        "restricted_vocab": {"size": len(data.rids),
                                                       "big_argmax_in_vocab_train": data.in_r["train"],
                                                       "big_argmax_in_vocab_val": data.in_r["val"]},
        "metrics": {"validation": cal.val_metrics, "predictor_modes": mm["val_accuracy"] if "val_accuracy" in mm
                    else None, "gates": {k: gm[k] for k in ("dev_coverage_at_target", "n_train_rows", "n_dev_pairs",
                                                            "positive_rate", "any_candidate_right") if k in gm}},
        "cost": cost, "timings": timings,
        "token_classes": list(CLASSES),
    }


# ------------------------------------------------------------------------------------------------ fit
def fit(records: str | Path, out: str | Path, model: str | None = None, force: bool = False, log=print,
        **opts) -> Path:
    """Train, calibrate and save a drafter (see the module docstring); returns the artifact folder.
    `opts`: FitConfig settings (gate/train/config.py)."""
    cfg = FitConfig.from_options(**opts)
    if cfg.problem():
        raise FitError(cfg.problem())
    paths = list(records) if isinstance(records, (list, tuple)) else [records]
    if cfg.drafter == "heads" and len(paths) != 1:
        raise FitError(f"--records: the heads drafter reads one records folder, got {len(paths)} "
                       "(--drafter eagle reads several)")
    check_out_artifact(Path(out), cfg.drafter, paths, force)
    with torch_threads(cfg.threads or torch.get_num_threads()):
        if cfg.drafter == "router":
            _check_settings(cfg)
            return fit_router(paths, Path(out), cfg, model, log)
        if cfg.drafter == "eagle":
            _check_settings(cfg)
            sources = [open_source(p, model, cfg) for p in paths]
            check_sources(sources)          # before the big model loads
            return fit_eagle(sources, load_big_model(sources[0], cfg, log), Path(out), cfg, force, log)
        return _fit(paths[0], Path(out), model, force, log, cfg)


def artifact_records(meta: dict) -> list[str]:
    """The records folders (resolved) an artifact was trained on, from its drafter.json."""
    recs = meta.get("training_data", {}).get("records", meta.get("records", []))
    return sorted(str(Path(r).resolve()) for r in ([recs] if isinstance(recs, str) else recs))


def check_out_artifact(out: Path, drafter: str, records: list, force: bool) -> None:
    """Refuse (unless force) to replace an artifact in `out` that this fit would not have made: another drafter
    kind, other records, a recalibrated one, or an unreadable drafter.json. A folder without drafter.json (new,
    or an interrupted fit: its stages resume) passes."""
    if force or not (out / META_FILE).exists():
        return
    try:
        meta = read_meta(out)
    except ArtifactError as e:
        meta, why = None, f"a drafter.json this fit cannot read ({e})"
    mine = sorted(str(Path(getattr(r, "path", r)).resolve()) for r in records)
    if meta is None:
        pass
    elif meta["format"] != {"heads": FORMAT, "eagle": EAGLE_FORMAT, "router": ROUTER_FORMAT}[drafter]:
        why = kind_of(meta)
    elif meta.get("recalibrated"):
        why = "a drafter recalibrated by train.py calibrate"
    elif artifact_records(meta) != mine:
        why = f"a drafter trained on other records ({', '.join(artifact_records(meta)) or 'unknown'})"
    else:
        return
    raise FitError(f"--out {out}: holds {why}; this fit (--drafter {drafter}) would replace it - name a new "
                   "folder, or add --force")


def _check_settings(cfg: FitConfig) -> None:
    if cfg.max_skip < 2:
        raise FitError(f"--max-skip {cfg.max_skip}: must be >= 2 (the policy skips while since_big < max_skip)")
    if not 0.5 <= cfg.target_precision < 1:
        raise FitError(f"--target-precision {cfg.target_precision}: must be in [0.5, 1)")


def _pairs(split: SplitData, rows: np.ndarray, max_s: int, n_max: int, seed: int) -> Pairs:
    t, s = subsample_pairs(*pair_index(split.run_start, rows, max_s), n_max, seed)
    return Pairs(t, s, context_copy_stats(split.tokens, split.run_start))


def _fit(records, out: Path, model, force, log, cfg: FitConfig) -> Path:
    _check_settings(cfg)
    t_start = time.time()
    src = open_source(records, model, cfg)
    big = load_big_model(src, cfg, log)
    data = prepare_data(src, big, cfg, log)
    cache = StageCache(out / "stages", force, log)
    heads = stage_heads(cache, big, data, cfg, log)
    pred = heads.predictor(data, big.tables, cfg.max_skip - 1)
    t0 = time.time()
    pairs = {"val": _pairs(data.va, np.arange(len(data.va)), pred.max_s, cfg.max_val_pairs, cfg.seed + 3),
             "gate": _pairs(data.tr, data.gate_rows, pred.max_s, cfg.max_gate_pairs, cfg.seed + 4)}
    log(f"[fit] in-context copy statistics ({time.time() - t0:.1f}s)")
    if len(pairs["val"].t) == 0:
        raise FitError(f"{src.path}: split {src.split_val!r} has no position with an earlier one in the same book")
    mm = stage_mode(cache, pred, pairs["val"], data, cfg, heads.key, log)
    pred.mode = mm["mode"]
    gates, gm = stage_gates(cache, pred, pairs["gate"], data, cfg, mm["key"], log)
    cal = calibrate(pred, gates, gm["primary"], pairs["val"], data, cfg, log)
    cost = pred.cost(big.info["n_params"])
    meta = artifact_meta(src, big, data, cfg, pairs, mm, gm, cal, cost,
                         {**heads.timings, "fit_total_s": round(time.time() - t_start, 1)})
    HeadsDrafter(pred, gates, cal.primary, cal.threshold, cfg.max_skip, src.layer, meta, maps=cal.maps).save(out)
    log(f"[fit] drafter: {cost['word_head_params'] / 1e6:.2f}M + {cost['future_heads_params'] / 1e6:.2f}M params, "
        f"{cost['drafter_flops_per_token'] / 1e6:.1f} MFLOP/token = "
        f"{cost.get('drafter_flops_vs_big', float('nan')):.1%} of the big model's; saved {out} "
        f"({time.time() - t_start:.0f}s)")
    return out


def main(argv=None) -> int:
    """`python train.py fit`: train the word-completion head, future-token heads and gates from records."""
    ap = argparse.ArgumentParser(prog="train.py fit", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--records", required=True, nargs="+",
                    help="records folder (python train.py record); --drafter eagle takes several of one big model, "
                         "--drafter router several of one model pair")
    ap.add_argument("--out", required=True, help="artifact folder to write (the Drafter)")
    ap.add_argument("--model", default=None, help="which recorded model is the big one (default: the largest)")
    add_arguments(ap)
    ap.add_argument("--force", action="store_true", help="retrain every stage even if a finished one matches, and "
                    "replace an artifact in --out of another drafter kind or other records, or a recalibrated one")
    args = ap.parse_args(argv)
    fit(args.records, args.out, model=args.model, force=args.force,   # a mistake: train.py's one error line
        log=lambda m: print(m, file=sys.stderr, flush=True), **options_from_args(args))
    return 0
