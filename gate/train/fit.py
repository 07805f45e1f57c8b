"""`python train.py fit --records DIR --out DIR`: train the heads and the gate from records, calibrate, save.

Everything is learned from the records (docs/interfaces.md, Records); the big model is loaded once only to copy
its frozen input embedding (for the word-completion head) and its output-embedding rows of the restricted
vocabulary (to initialise the future heads' shared output layer), and to classify its tokens.

Data use (books never mix between splits; within the train split, chunks of 512 consecutive positions are
dealt to folds by a seeded shuffle):
    train split, 75% of chunks  -> the heads (word-completion head, future-token heads), hidden-state
                                   standardisation and PCA, restricted vocabulary
    train split, 25% of chunks  -> the gates (positions the heads never trained on, so the heads' confidence
                                   looks as it will on new text); 20% of these chunks order the gates if none
                                   can be certified
    train books' full text      -> the n-gram table (gate/heads.NgramTable; the continuations of the gate-fold
                                   positions left out), read from the corpus folder the records name
    validation split            -> choice of the head mode (word / future / mix); Learn-then-Test threshold of
                                   every gate (at delta / n_gates) and of the baselines; the drafter keeps the
                                   gate with the largest certified coverage
    test split                  -> untouched (gate/train/evaluate.py)

Candidates: the drafter proposes the best-scoring of the head's top-1 / top-2, the training-text n-gram
continuation and the in-context copy continuation (gate/model/features.py); the gates are trained on every candidate
of the gate-fold pairs (label: it equals the big model's argmax).

Training pairs mimic decode (gate/model/heads.py explains the indexing): for each position t and s = 1..max_skip-1
(since_big), the inputs are the tokens up to t, the big hidden state at t - s and s; the label is the big
model's argmax at t. The same code (gate.drafter.Predictor.run -> gate.gatemodel.compute_features) computes
the features here and in Drafter.propose. The context tokens are the book's text, not the drafter's earlier
proposals: where the gate was right those equal the big model's choices, which is what the text approximates;
the evaluation's policy simulation and the decode benchmark measure the effect.

Resumable: each stage (heads, mode, gates, calibration) is saved under OUT/stages/ with a key hashing its
configuration and inputs; a re-run with the same settings loads finished stages instead of training again
(--force retrains). All writes are atomic (temp file + rename). Deterministic for a seed on a given machine and
thread count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corpus_tools.inventory import CLASSES, KINDS, restricted_vocab, token_table
from corpus_tools.models import TokenizerMismatch
from corpus_tools.files import save_tensors, write_json
from gate.model.drafter import ArtifactError, Drafter, Predictor
from gate.model.features import (GATES, LogisticGate, MLPGate, coverage_at_precision, ltt_calibrate)
from gate.model.heads import (FutureHeads, HeadData, HiddenNorm, WordHead, context_copy_stats, context_ids,
                        pair_index, run_starts)
from gate.model.heads import train_future_heads, train_word_head

VAL_NAMES = ("validation", "val", "valid", "dev")
GATE_VERSION = 3      # bump when the features change, so finished gate stages are not reused


class FitError(RuntimeError):
    """Bad input to fit/evaluate (records, splits, options); the message names the path and the problem."""


# ------------------------------------------------------------------------------------------------ records
@dataclass
class SplitData:
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

    def head_data(self) -> HeadData:
        return HeadData(self.tokens, self.argmax, self.hidden, self.run_start, self.topk_ids, self.topk_p)

    def __len__(self):
        return len(self.tokens)


def open_records_checked(path):
    try:
        from corpus_tools.records import open_records
    except ImportError as e:  # pragma: no cover - the records module is another part of the project
        raise FitError(f"corpus_tools.records is not available ({e}); cannot read {path}") from None
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


def load_split(rec, path, split: str, model: str, layer: int) -> SplitData:
    a = load_fields(rec, path, split, model, SPLIT_FIELDS + (f"hidden/{layer}",))
    pre = f"{model}/"
    need = ["token", "target", "book", "pos", pre + "argmax", f"{pre}hidden/{layer}"]
    miss = [k for k in need if k not in a]
    if miss:
        raise FitError(f"{path}: split {split!r} lacks fields {', '.join(miss)}")
    n = len(a["token"])
    if n == 0:
        raise FitError(f"{path}: split {split!r} is empty (no recorded positions)")
    book, pos = np.asarray(a["book"]), np.asarray(a["pos"])
    return SplitData(split, np.asarray(a["token"], dtype=np.int64), np.asarray(a[pre + "argmax"], dtype=np.int64),
                     np.asarray(a["target"], dtype=np.int64), book, pos, a[f"{pre}hidden/{layer}"],
                     run_starts(book, pos), a.get(pre + "topk_ids"), a.get(pre + "topk_p"), a.get(pre + "p_max"),
                     a.get(pre + "entropy_norm"), list(rec.books(split)))


# ------------------------------------------------------------------------------------------------ helpers
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_folds(n: int, seed: int, frac: float, chunk: int = 512) -> np.ndarray:
    """Boolean [n]: True for rows in the held-out fraction of chunks (seeded shuffle)."""
    n_chunks = max(1, math.ceil(n / chunk))
    rng = np.random.default_rng(seed + 7919)
    held = np.zeros(n_chunks, dtype=bool)
    held[rng.permutation(n_chunks)[:max(1, int(round(frac * n_chunks)))]] = True
    if n_chunks == 1:
        held[:] = False
    return np.repeat(held, chunk)[:n]


def pca_fit(hn: np.ndarray, n_pca: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and whitened projection [D, n_pca] of standardised hidden states."""
    x = torch.from_numpy(np.asarray(hn, dtype=np.float32))
    mean = x.mean(0)
    u, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    n_pca = min(n_pca, v.shape[0])
    scale = s[:n_pca] / math.sqrt(max(1, len(x) - 1))
    proj = v[:n_pca].T / scale.clamp_min(1e-6)
    # fix signs deterministically (largest-magnitude loading positive)
    sign = torch.sign(proj.gather(0, proj.abs().argmax(0, keepdim=True)))[0]
    return mean, proj * sign


def copy_slice(copy: dict | None, t: np.ndarray) -> dict | None:
    return None if copy is None else {k: v[t] for k, v in copy.items()}


def predict_pairs(pred: Predictor, data: SplitData, t: np.ndarray, s: np.ndarray, batch: int = 4096,
                  desc: str | None = None, gates: dict | None = None, mode: str | None = None,
                  modes: tuple[str, ...] = (), copy: dict | None = None, keep_X: bool = False) -> dict:
    """Run the predictor (and gates) on record pairs (t, s), in batches, through Predictor.run - the code path
    of Drafter.propose. `copy`: context_copy_stats(data) (the in-context index at every position).
    Returns numpy arrays: cands/valid/correct/cls [P, K] per candidate slot, head_p / head_entropy /
    head1_correct [P] for the head's own top token, X [P, K, F] with keep_X, and per gate its scores [P, K] and
    the selected candidate ("sel": slot, token, score, correct, cls). `modes`: head1_correct_<mode> for other
    predictor modes from the same head outputs."""
    from tqdm.auto import tqdm

    from gate.model.features import combine, select
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
        slot, tok, best = select(torch.from_numpy(sc), res)
        idx = np.arange(len(slot))
        res["sel"][n] = {"slot": slot, "token": tok, "score": best, "correct": res["correct"][idx, slot],
                         "cls": res["cls"][idx, slot]}
    return res


def _subsample(t, s, n_max, seed):
    if len(t) <= n_max:
        return t, s
    idx = np.sort(np.random.default_rng(seed).choice(len(t), n_max, replace=False))
    return t[idx], s[idx]


# ------------------------------------------------------------------------------------------------ fit
DEFAULTS = dict(seed=0, target_precision=0.99, delta=0.1, max_skip=4, layer="last", n_ctx=8, restricted=2048,
                d_tok=64, d_hid=128, width=512, epochs=4.0, future_epochs=4.0, batch=512, soft_weight=0.5,
                reg_weight=1.0, min_steps=300,
                n_pca=8, predictor="auto", word_inputs="tokens+hidden", gate_frac=0.25, max_train=400000,
                max_gate_pairs=300000, max_val_pairs=400000, dtype="float32", threads=1)


def fit(records: str | Path, out: str | Path, model: str | None = None, force: bool = False, log=print,
        **opts) -> Path:
    """Train, calibrate and save a drafter (see the module docstring); returns the artifact folder."""
    cfg = dict(DEFAULTS)
    unknown = set(opts) - set(cfg)
    if unknown:
        raise TypeError(f"unknown fit options: {sorted(unknown)}")
    cfg.update(opts)
    from gate.model.features import torch_threads
    with torch_threads(cfg["threads"] or torch.get_num_threads()):
        return _fit(records, out, model, force, log, cfg)


def _fit(records, out, model, force, log, cfg) -> Path:
    if cfg["max_skip"] < 2:
        raise FitError(f"--max-skip {cfg['max_skip']}: must be >= 2 (the policy skips while since_big < max_skip)")
    if not 0.5 <= cfg["target_precision"] < 1:
        raise FitError(f"--target-precision {cfg['target_precision']}: must be in [0.5, 1)")
    max_s = cfg["max_skip"] - 1
    seed = cfg["seed"]
    t_start = time.time()
    out = Path(out)
    if hasattr(records, "load"):                 # an open records object (tests)
        rec, records = records, Path(getattr(records, "path", "records"))
    else:
        records = Path(records)
        rec = open_records_checked(records)
    entry = model_entry(rec, records, model)
    if model is not None and not entry:
        from corpus_tools.models import load as load_model
        info = load_model(model).info
        if info.fingerprint != rec.fingerprint:
            raise TokenizerMismatch(f"{records}: records were made with tokenizer {rec.fingerprint} "
                                    f"({', '.join(rec.models)}) but --model {model!r} has tokenizer "
                                    f"{info.fingerprint}")
        raise FitError(f"{records}: no records of model {model!r} (recorded: {', '.join(rec.models)})")
    name = entry["name"]
    layer = resolve_layer(entry, cfg["layer"], records)
    split_train = find_split(rec, records, "train")
    split_val = find_split(rec, records, "validation")

    # the big model: frozen embedding, output rows, token kinds; and the tokenizer check
    from corpus_tools.models import load as load_model
    t0 = time.time()
    lm = load_model(name, dtype=cfg["dtype"])
    if lm.info.fingerprint != rec.fingerprint or entry.get("fingerprint", rec.fingerprint) != rec.fingerprint:
        raise TokenizerMismatch(f"{records}: records were made with tokenizer {rec.fingerprint} but model "
                                f"{name!r} now loads with tokenizer {lm.info.fingerprint}")
    embed = lm.model.get_input_embeddings().weight.detach().clone()        # model dtype; rows cast when used
    out_emb = lm.model.get_output_embeddings().weight.detach().clone()
    big_info = lm.info.to_dict()
    tab = token_table(lm.tokenizer)
    tokenizer = lm.tokenizer
    del lm
    V, D = embed.shape
    tables = {}
    for k, fill in (("kind", KINDS.index("other")), ("cls", CLASSES.index("other")), ("ends_alnum", False)):
        a = tab[k][:V]
        if len(a) < V:   # tokenizer smaller than the output layer (padded vocab): extra rows are "other"
            a = np.concatenate([a, np.full(V - len(a), fill, dtype=a.dtype)])
        tables[k] = a
    kind = tables["kind"]
    log(f"[fit] big model {name} ({big_info['n_params'] / 1e6:.1f}M params, layer {layer}/{entry['n_layers']}, "
        f"V={V}, d={D}) loaded in {time.time() - t0:.1f}s")

    tr = load_split(rec, records, split_train, name, layer)
    va = load_split(rec, records, split_val, name, layer)
    if tr.hidden.shape[1] != D:
        raise FitError(f"{records}: hidden size {tr.hidden.shape[1]} but model {name!r} has {D}")
    log(f"[fit] records {records}: {split_train} {len(tr):,} positions ({len(tr.books)} books), "
        f"{split_val} {len(va):,} ({len(va.books)} books)")
    data_id = _key(str(records.resolve()), rec.fingerprint, json.dumps(rec.meta, sort_keys=True, default=str),
                   len(tr), len(va),
                   int(tr.tokens[:1000].sum()), int(va.tokens[:1000].sum()), name, layer)

    # folds within train
    gate_rows_mask = chunk_folds(len(tr), seed, cfg["gate_frac"])
    head_rows = np.flatnonzero(~gate_rows_mask)
    gate_rows = np.flatnonzero(gate_rows_mask)
    if len(head_rows) > cfg["max_train"]:
        head_rows = np.sort(np.random.default_rng(seed).choice(head_rows, cfg["max_train"], replace=False))
    if len(head_rows) < 2 or len(gate_rows) < 2:
        raise FitError(f"{records}: split {split_train!r} has too few positions ({len(tr)}) to train on")

    # n-gram statistics of the train books' text, without the continuations the gate is trained on
    t0 = time.time()
    ngram, ngram_info = build_ngram(rec, records, tr, gate_rows, tokenizer, V, log)
    del tokenizer
    log(f"[fit] n-gram table: {ngram.n_entries():,} contexts from {ngram_info['tokens']:,} tokens of "
        f"{ngram_info['source']} ({time.time() - t0:.1f}s)")

    # restricted vocabulary from what the heads must predict
    freq = np.bincount(tr.argmax[head_rows], minlength=V)[:V] + 1e-3 * np.bincount(tr.tokens[head_rows],
                                                                                   minlength=V)[:V]
    rids = restricted_vocab(freq, kind, cfg["restricted"])
    R = len(rids)
    rmap = torch.full((V,), R, dtype=torch.long)
    rmap[torch.from_numpy(rids)] = torch.arange(R)
    in_r_train = float(np.isin(tr.argmax[head_rows], rids).mean())
    in_r_val = float(np.isin(va.argmax, rids).mean())
    log(f"[fit] restricted vocabulary: {R} tokens (+ other); big argmax in it: train {in_r_train:.1%}, "
        f"val {in_r_val:.1%}")

    stages = out / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import load_file

    # ---- stage 1: heads
    head_cfg = {k: cfg[k] for k in ("seed", "max_skip", "n_ctx", "restricted", "d_tok", "d_hid", "width", "epochs",
                                    "future_epochs", "batch", "soft_weight", "n_pca", "word_inputs", "gate_frac",
                                    "max_train", "threads", "dtype", "reg_weight", "min_steps")}
    k_heads = _key("heads", data_id, head_cfg)
    hidden_mean, hidden_std = HiddenNorm.stats(tr.hidden[head_rows] if len(head_rows) < 50000 else
                                               tr.hidden[np.sort(np.random.default_rng(seed).choice(
                                                   head_rows, 50000, replace=False))], seed=seed)
    norm = HiddenNorm(D, hidden_mean, hidden_std)
    word = WordHead(V, D, R + 1, n_ctx=cfg["n_ctx"], d_tok=cfg["d_tok"], d_hid=cfg["d_hid"], width=cfg["width"],
                    max_s=max_s, use_hidden=cfg["word_inputs"] == "tokens+hidden")
    fut_w = torch.zeros(R + 1, D)
    fut_b = torch.zeros(R + 1)
    ow = out_emb[torch.from_numpy(rids)].float()
    del out_emb
    fut_w[:R] = ow * norm.std[None, :]             # exact big logits on R at init (see heads.py)
    fut_b[:R] = ow @ norm.mean
    future = FutureHeads(D, R + 1, max_s, fut_w, fut_b)
    heads_file, heads_meta = stages / "heads.safetensors", stages / "heads.json"
    timings = {}
    if not force and heads_meta.is_file() and json.loads(heads_meta.read_text()).get("key") == k_heads \
            and heads_file.is_file():
        st = load_file(str(heads_file))
        word.load_state_dict({k[5:]: v for k, v in st.items() if k.startswith("word.")})
        future.load_state_dict({k[7:]: v for k, v in st.items() if k.startswith("future.")})
        pca_mean, pca_proj = st["pca.mean"], st["pca.proj"]
        hm = json.loads(heads_meta.read_text())
        timings.update(hm.get("timings", {}))
        log(f"[fit] heads: loaded finished stage {heads_file}")
    else:
        torch.manual_seed(seed)
        word = WordHead(V, D, R + 1, n_ctx=cfg["n_ctx"], d_tok=cfg["d_tok"], d_hid=cfg["d_hid"],
                        width=cfg["width"], max_s=max_s, use_hidden=cfg["word_inputs"] == "tokens+hidden",
                        embed=embed)
        word.init_output(fut_w, fut_b)
        hd = tr.head_data()
        t0 = time.time()
        train_future_heads(future, norm, hd, head_rows, rmap, epochs=cfg["future_epochs"], batch=cfg["batch"],
                           soft_weight=cfg["soft_weight"], reg_weight=cfg["reg_weight"],
                           min_steps=cfg["min_steps"], seed=seed)
        timings["future_heads_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        train_word_head(word, norm, hd, head_rows, rmap, epochs=cfg["epochs"], batch=cfg["batch"],
                        soft_weight=cfg["soft_weight"], reg_weight=cfg["reg_weight"], min_steps=cfg["min_steps"],
                        seed=seed + 1)
        timings["word_head_s"] = round(time.time() - t0, 1)
        word.bake()
        sub = head_rows if len(head_rows) <= 20000 else np.sort(
            np.random.default_rng(seed + 2).choice(head_rows, 20000, replace=False))
        pca_mean, pca_proj = pca_fit(norm(torch.from_numpy(np.asarray(tr.hidden[sub], dtype=np.float32))).numpy(),
                                     cfg["n_pca"])
        st = {f"word.{k}": v.contiguous() for k, v in word.state_dict().items()}
        st.update({f"future.{k}": v.contiguous() for k, v in future.state_dict().items()})
        st.update({"pca.mean": pca_mean.contiguous(), "pca.proj": pca_proj.contiguous()})
        save_tensors(st, heads_file)
        write_json(heads_meta, {"key": k_heads, "timings": timings})
        log(f"[fit] heads trained in {timings['future_heads_s'] + timings['word_head_s']:.0f}s -> {heads_file}")
    del embed

    pred = Predictor(word, future, norm, torch.from_numpy(rids), tables, pca_mean, pca_proj,
                     mode="word", max_s=max_s, ngram=ngram)

    # ---- stage 2: predictor mode (on validation)
    vt, vs = pair_index(va.run_start, np.arange(len(va)), max_s)
    vt, vs = _subsample(vt, vs, cfg["max_val_pairs"], seed + 3)
    t0 = time.time()
    va_copy = context_copy_stats(va.tokens, va.run_start)
    tr_copy = context_copy_stats(tr.tokens, tr.run_start)
    log(f"[fit] in-context copy statistics ({time.time() - t0:.1f}s)")
    if len(vt) == 0:
        raise FitError(f"{records}: split {split_val!r} has no position with an earlier one in the same book")
    k_mode = _key("mode", k_heads, cfg["predictor"], cfg["max_val_pairs"], ngram_info, GATE_VERSION)
    mode_meta = stages / "mode.json"
    if not force and mode_meta.is_file() and json.loads(mode_meta.read_text()).get("key") == k_mode:
        mm = json.loads(mode_meta.read_text())
        log(f"[fit] predictor mode: loaded finished stage ({mm['mode']})")
    else:
        acc = {}
        o = predict_pairs(pred, va, vt, vs, modes=("word", "future", "mix"), desc="val heads", copy=va_copy)
        for m in ("word", "future", "mix"):
            c = o[f"head1_correct_{m}"]
            acc[m] = {"accuracy": float(c.mean()),
                      "accuracy_by_s": {int(j): float(c[vs == j].mean()) for j in range(1, max_s + 1)
                                        if (vs == j).any()}}
        mode = max(acc, key=lambda m: acc[m]["accuracy"]) if cfg["predictor"] == "auto" else cfg["predictor"]
        if mode not in acc:
            raise FitError(f"--predictor {mode!r}: choose auto, word, future or mix")
        mm = {"key": k_mode, "mode": mode, "val_accuracy": acc}
        write_json(mode_meta, mm)
        log("[fit] val accuracy (candidate == big argmax): " +
            ", ".join(f"{m} {a['accuracy']:.1%}" for m, a in acc.items()) + f" -> predictor {mode}")
    pred.mode = mm["mode"]

    # ---- stage 3: gates (trained on the gate fold of train)
    gt, gs = pair_index(tr.run_start, gate_rows, max_s)
    gt, gs = _subsample(gt, gs, cfg["max_gate_pairs"], seed + 4)
    k_gate = _key("gates", k_mode, mm["mode"], cfg["max_gate_pairs"], GATE_VERSION)
    gate_file, gate_meta = stages / "gates.safetensors", stages / "gates.json"
    gates: dict = {}
    if not force and gate_meta.is_file() and json.loads(gate_meta.read_text()).get("key") == k_gate \
            and gate_file.is_file():
        gm = json.loads(gate_meta.read_text())
        st = load_file(str(gate_file))
        for n, g in gm["gates"].items():
            gates[n] = GATES[g["kind"]].from_state({k[len(n) + 1:]: v for k, v in st.items()
                                                    if k.startswith(n + ".")}, g["config"])
        log(f"[fit] gates: loaded finished stage {gate_file}")
    else:
        t0 = time.time()
        o = predict_pairs(pred, tr, gt, gs, desc="gate features", copy=tr_copy, keep_X=True)
        dev_pair = chunk_folds(len(tr), seed + 5, 0.2)[gt]
        if dev_pair.all() or not dev_pair.any():
            dev_pair = np.zeros(len(gt), dtype=bool)
            dev_pair[::5] = True
        rows = o["valid"] & ~dev_pair[:, None]
        X, y = o["X"][rows], o["correct"][rows].astype(np.float32)
        gates = {"logreg": LogisticGate().fit(X, y, seed=seed), "mlp": MLPGate(X.shape[1]).fit(X, y, seed=seed)}
        dev_cov = {}
        from gate.model.features import select
        for n, g in gates.items():
            Xd = torch.from_numpy(o["X"][dev_pair])
            sc = g.score(Xd.reshape(-1, Xd.shape[-1])).reshape(Xd.shape[:2])
            dv = {k: o[k][dev_pair] for k in ("valid", "cands")}
            slot, _, best = select(sc, dv)
            ok = o["correct"][dev_pair][np.arange(len(slot)), slot]
            # mean coverage over precision levels around the target: one level alone (99%) on a few thousand
            # pairs hinges on a handful of examples
            levels = sorted({0.95, 0.98, 0.99, 0.995, cfg["target_precision"]})
            dev_cov[n] = float(np.mean(list(coverage_at_precision(best, ok, levels).values())))
        primary = max(dev_cov, key=lambda n: (dev_cov[n], n == "logreg"))
        st = {}
        for n, g in gates.items():
            st.update({f"{n}.{k}": v.contiguous() for k, v in g.state().items()})
        save_tensors(st, gate_file)
        gm = {"key": k_gate, "gates": {n: {"kind": g.kind, "config": g.config()} for n, g in gates.items()},
              "primary": primary, "dev_coverage_at_target": dev_cov, "n_pairs": int(len(gt)),
              "n_train_rows": int(rows.sum()), "n_dev_pairs": int(dev_pair.sum()), "positive_rate": float(y.mean()),
              "any_candidate_right": float(o["correct"].any(1).mean()), "seconds": round(time.time() - t0, 1)}
        write_json(gate_meta, gm)
        log(f"[fit] gates trained on {int(rows.sum()):,} candidates of {int((~dev_pair).sum()):,} pairs (right "
            f"{y.mean():.1%}; some candidate right for {gm['any_candidate_right']:.1%} of pairs); mean coverage at "
            "95-99.5% precision on the gate-dev chunks: " +
            ", ".join(f"{n} {c:.1%}" for n, c in dev_cov.items()) + f" -> primary {primary}")
    primary = gm["primary"]

    # ---- stage 4: calibration on validation (Learn-then-Test)
    o = predict_pairs(pred, va, vt, vs, gates=gates, desc="calibration", copy=va_copy)
    baselines = {"max_prob": (o["head_p"], o["head1_correct"]),            # BiLD's fallback rule
                 "entropy": (1.0 - o["head_entropy"], o["head1_correct"])}  # seed 001
    scored = {**{n: (v["score"], v["correct"]) for n, v in o["sel"].items()}, **baselines}
    # The drafter's gate is picked among the learned gates on validation too: each is calibrated at
    # delta / n_gates (Bonferroni), so the guarantee holds for whichever is picked; the baselines at delta.
    n_gates = len(o["sel"])
    calib = {n: ltt_calibrate(sc, ok, cfg["target_precision"], cfg["delta"] / (n_gates if n in o["sel"] else 1))
             for n, (sc, ok) in scored.items()}
    certified = {n: calib[n]["coverage"] for n in o["sel"] if calib[n]["certified"]}
    if certified:
        primary = max(certified, key=lambda n: (certified[n], n == "logreg"))
    thr = calib[primary]["threshold"]
    val_metrics = {
        "pairs": int(len(vt)), "head_accuracy": float(o["head1_correct"].mean()),
        "drafter_accuracy": float(o["sel"][primary]["correct"].mean()),
        "any_candidate_right": float(o["correct"].any(1).mean()),
        "coverage_at_precision": {n: {str(k): v for k, v in coverage_at_precision(sc, ok).items()}
                                  for n, (sc, ok) in scored.items()},
    }
    c = calib[primary]
    log(f"[fit] calibrated {primary} gate on {len(vt):,} {split_val} pairs: threshold {thr:.4g}, coverage "
        f"{c['coverage']:.1%}, precision {c['precision'] if c['precision'] is not None else float('nan'):.2%}, "
        f"error <= {1 - cfg['target_precision']:.2%} with prob >= {1 - cfg['delta']:.0%} (LTT; primary picked "
        f"among certified gates: " + (", ".join(f"{n} {c:.1%}" for n, c in certified.items()) or "none") + ")"
        + ("" if c["certified"] else " - NO threshold certified: the gate will never skip"))

    # ---- artifact
    cost = pred.cost(big_info["n_params"])
    counts = {split_train: {"positions": len(tr), "books": tr.books, "head_positions": int(len(head_rows)),
                            "gate_positions": int(len(gate_rows)), "gate_pairs": int(len(gt))},
              split_val: {"positions": len(va), "books": va.books, "calibration_pairs": int(len(vt))}}
    meta = {
        "big_model": {"name": name, "fingerprint": rec.fingerprint, "vocab_size": V, "hidden_size": D,
                      "n_layers": entry["n_layers"], "n_params": big_info["n_params"], "path": big_info["path"]},
        "training_data": {"records": str(records.resolve()), "splits": {"train": split_train, "validation":
                          split_val}, "counts": counts, "records_meta": {k: rec.meta.get(k) for k in
                          ("corpus", "context", "stride", "topk", "created") if k in rec.meta}},
        "config": cfg, "seed": seed, "target_precision": cfg["target_precision"], "delta": cfg["delta"],
        "ngram": ngram_info,
        "calibration": calib, "restricted_vocab": {"size": R, "big_argmax_in_vocab_train": in_r_train,
                                                   "big_argmax_in_vocab_val": in_r_val},
        "metrics": {"validation": val_metrics, "predictor_modes": mm["val_accuracy"] if "val_accuracy" in mm
                    else None, "gates": {k: gm[k] for k in ("dev_coverage_at_target", "n_train_rows", "n_dev_pairs",
                                                            "positive_rate", "any_candidate_right") if k in gm}},
        "cost": cost, "timings": {**timings, "fit_total_s": round(time.time() - t_start, 1)},
        "token_classes": list(CLASSES),
    }
    dr = Drafter(pred, gates, primary, thr, cfg["max_skip"], layer, meta)
    dr.save(out)
    log(f"[fit] drafter: {cost['word_head_params'] / 1e6:.2f}M + {cost['future_heads_params'] / 1e6:.2f}M params, "
        f"{cost['drafter_flops_per_token'] / 1e6:.1f} MFLOP/token = "
        f"{cost.get('drafter_flops_vs_big', float('nan')):.1%} of the big model's; saved {out} "
        f"({time.time() - t_start:.0f}s)")
    return out


def build_ngram(rec, path, tr: SplitData, gate_rows: np.ndarray, tokenizer, V: int, log):
    """NgramTable over the train books' full text (from the corpus the records name), masking the continuation
    of every gate-fold position; falls back to the recorded train tokens when the text is not there or does not
    tokenize to the recorded ids."""
    from gate.model.heads import NgramTable
    corpus = Path(str(rec.meta.get("corpus", "")))
    gate_mask_rows = np.zeros(len(tr), dtype=bool)
    gate_mask_rows[gate_rows] = True
    seqs, masks, source = [], [], None
    if corpus.is_dir():
        try:
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
            source = f"corpus {corpus} ({len(seqs)} train books)"
        except (OSError, ValueError) as e:
            log(f"[fit] n-gram table: cannot use the corpus text ({e}); using the recorded tokens")
            seqs, masks = [], []
    if not seqs:
        for start in np.unique(tr.run_start):
            end = start
            while end + 1 < len(tr) and tr.run_start[end + 1] == start:
                end += 1
            seq = np.r_[tr.tokens[start:end + 1], tr.target[end]]
            m = np.r_[False, gate_mask_rows[start:end + 1]]
            seqs.append(seq)
            masks.append(m)
        source = f"recorded {tr.name} tokens of {path}"
    table = NgramTable.build(seqs, V, masks=masks)
    return table, {"source": source, "tokens": int(sum(len(x) for x in seqs)), "entries": table.n_entries()}


def main(argv=None) -> int:
    """`python train.py fit`: train the word-completion head, future-token heads and gates from records."""
    ap = argparse.ArgumentParser(prog="train.py fit", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--records", required=True, help="records folder (python train.py record)")
    ap.add_argument("--out", required=True, help="artifact folder to write (the Drafter)")
    ap.add_argument("--model", default=None, help="which recorded model is the big one (default: the largest)")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--target-precision", type=float, default=DEFAULTS["target_precision"],
                    help="calibrate the gate so skipped tokens equal the big model's greedy token this often")
    ap.add_argument("--delta", type=float, default=DEFAULTS["delta"],
                    help="the precision guarantee holds with probability >= 1 - delta (Learn-then-Test)")
    ap.add_argument("--max-skip", type=int, default=DEFAULTS["max_skip"],
                    help="the big model runs at least once every MAX_SKIP positions (the policy skips while "
                         "since_big < MAX_SKIP); future heads predict t+2 .. t+MAX_SKIP")
    ap.add_argument("--layer", default=DEFAULTS["layer"], help="big-model hidden layer the drafter reads "
                    "(HF numbering; 'last' = n_layers)")
    ap.add_argument("--n-ctx", type=int, default=DEFAULTS["n_ctx"], help="tokens the word head reads")
    ap.add_argument("--restricted", type=int, default=DEFAULTS["restricted"], help="restricted vocabulary size")
    ap.add_argument("--width", type=int, default=DEFAULTS["width"], help="word head MLP width")
    ap.add_argument("--epochs", type=float, default=DEFAULTS["epochs"], help="word head epochs")
    ap.add_argument("--future-epochs", type=float, default=DEFAULTS["future_epochs"], help="future heads epochs")
    ap.add_argument("--predictor", default=DEFAULTS["predictor"], choices=["auto", "word", "future", "mix"],
                    help="which head's top token is the candidate (auto: best validation accuracy)")
    ap.add_argument("--word-inputs", default=DEFAULTS["word_inputs"], choices=["tokens", "tokens+hidden"],
                    help="word head inputs: the last tokens only (seed 003) or also the stale big hidden state")
    ap.add_argument("--max-train", type=int, default=DEFAULTS["max_train"], help="cap on head training positions")
    ap.add_argument("--gate-frac", type=float, default=DEFAULTS["gate_frac"],
                    help="share of the train split (in chunks of 512 positions) kept from the heads to train the gate")
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                    help="torch intra-op threads (0: torch's default). The heads are small: on a busy 2-core machine "
                         "1 thread was 1.4x faster than 2; results are deterministic for a seed and thread count")
    ap.add_argument("--force", action="store_true", help="retrain every stage even if a finished one matches")
    args = ap.parse_args(argv)
    opts = {k: getattr(args, k) for k in ("seed", "target_precision", "delta", "max_skip", "layer", "n_ctx",
                                          "restricted", "width", "epochs", "future_epochs", "predictor",
                                          "word_inputs", "max_train", "threads", "gate_frac")}
    try:
        fit(args.records, args.out, model=args.model, force=args.force,
            log=lambda m: print(m, file=sys.stderr, flush=True), **opts)
    except (FitError, ArtifactError, TokenizerMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # records errors come from another module; keep their message
        if type(e).__name__ == "RecordsError":
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
