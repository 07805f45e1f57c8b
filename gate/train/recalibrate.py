"""`python train.py calibrate --records R --gate G [--out G2]`: new precision maps and threshold, on your text.

Any drafter of `train.py fit` (the heads drafter's primary gate, the feature head's gate, the router): its
precision maps (gate/model/precision.py) re-fitted and its threshold certified on records of your own text, with
the fit's calibration (gate.train.data.certify_pairs; certify_eagle, certify_router for the other two).

    recalibrate(records, gate, out=None, split="validation", ...) -> the new calibration entry

Only the maps, the threshold and their metadata change: the tensors are copied byte for byte. Refused before any
work: bad numbers, an unwritable --out or one holding another artifact (unless --force), a split the gate was
trained on (unless --force), records of another tokenizer (or, for a router, of another pair). docs/training.md.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common.files import FolderLock, check_output_dir, write_json
from gate.model.artifact import META_FILE, ArtifactError, check_files
from gate.model.copyrule import MAX_N
from gate.model.eagle import EAGLE_FORMAT, EAGLE_TENSORS
from gate.model.heads import context_copy_stats, pair_index
from gate.model.heads_drafter import FORMAT, TENSOR_FILE
from gate.model.load import kind_of, load_drafter, read_meta
from gate.model.precision import maps_meta
from gate.model.router import ROUTER_FORMAT, ROUTER_TENSORS, check_identity, load_router_parts, router_maps
from gate.train.calibration import format_threshold
from gate.train.config import FitConfig
from gate.train.data import (
    FitError,
    certify_pairs,
    find_split,
    load_split,
    open_records_checked,
    predict_pairs,
    select_part,
    split_books,
    subsample_pairs,
)
from gate.train.evaluate import check_records_vs_gate, open_inputs
from gate.train.fit_eagle import certify_eagle, drafts_on
from gate.train.fit_router import PairSplit, certify_router, load_pair, pair_entries, since_big

TENSOR_FILES = (TENSOR_FILE, EAGLE_TENSORS, ROUTER_TENSORS)


def check_kind(gate) -> dict:
    """The gate's drafter.json, if of a kind this command recalibrates (every format gate/model/load.py reads)."""
    meta = read_meta(gate)
    if meta["format"] not in (FORMAT, EAGLE_FORMAT, ROUTER_FORMAT):
        raise ArtifactError(f"--gate {gate}: {kind_of(meta)}; calibrate recalibrates the drafters of `train.py fit`")
    return meta


def check_out(gate: Path, out: Path, force: bool) -> None:
    """Refuse an --out folder that holds an artifact this command did not make from this gate (unless force)."""
    if force or out.resolve() == gate.resolve() or not (out / META_FILE).exists() and \
            not any((out / f).exists() for f in TENSOR_FILES):
        return
    try:
        recal = read_meta(out).get("recalibrated") or {}
    except ArtifactError:
        recal = {}
    if not recal or recal.get("gate", str(gate.resolve())) != str(gate.resolve()):   # (older ones name no gate)
        raise FitError(f"--out {out}: holds another drafter artifact (not a recalibration of {gate}); name a new "
                       "folder, or add --force to replace it")


def training_books(meta: dict, records: Path, split: str) -> set[str]:
    """The books of the gate's training split (drafter.json's training_data: the heads drafter's counts, the
    feature head's and the router's train_books); when it lists none, every book of `split` if it is the training
    split ("train" unless named) of the very records the gate was trained on."""
    data = meta.get("training_data", {})
    train = data.get("splits", {}).get("train") or data.get("train_split")
    books = data.get("counts", {}).get(train, {}).get("books") or data.get("train_books")
    if books:
        return set(books)
    recs = data.get("records") or meta.get("records") or []
    recs = [recs] if isinstance(recs, str) else recs
    mine = str(Path(records).resolve()) in {str(Path(r).resolve()) for r in recs}
    return {"*"} if mine and split == (train or "train") else set()


def check_split(meta: dict, records, split: str, books: list[str], force: bool) -> None:
    """Refuse calibrating on books the gate was trained on, unless force."""
    trained = training_books(meta, records, split)
    overlap = books if "*" in trained else sorted(set(books) & trained)
    if overlap and not force:
        raise FitError(f"--split {split}: the gate was trained on {len(overlap)} of its {len(books)} books "
                       f"({', '.join(overlap[:3])}{', ...' if len(overlap) > 3 else ''}); a threshold certified on "
                       "its own training text promises a precision it does not have on new text - calibrate on a "
                       "split it was not trained on (validation, test), or add --force")


@dataclass
class Run:
    """One drafter's calibration pairs certified (what recalibrate writes down)."""
    records: Path
    split: str
    books: list
    primary: str            # the gate recalibrated
    threshold: float        # its threshold before
    maps: dict | None       # every gate's maps before (None: an artifact from before them)
    pairs: int
    cert: dict              # certify_pairs' result


def open_split(records, gate, meta: dict, split: str):
    """(records, its path, big model's name, split name) for a feature head or a router, checked against the
    gate (another tokenizer: TokenizerMismatch)."""
    rec = open_records_checked(records)
    path = Path(getattr(rec, "path", records))
    name = check_records_vs_gate(rec, path, meta, gate)
    split = find_split(rec, path, split) if split in ("test", "validation") else split
    if split not in rec.splits:
        raise FitError(f"{path}: no split {split!r} (splits: {', '.join(rec.splits)})")
    return rec, path, name, split


def heads_run(records, gate, meta, split, part, tp, dl, mf, max_pairs, force) -> Run:
    inp = open_inputs(records, gate, split, part)
    check_split(meta, inp.records, inp.split, split_books(inp.te, part), force)
    dr, te = inp.dr, inp.te
    t, s = subsample_pairs(*pair_index(te.run_start, np.arange(len(te)), dr.predictor.max_s), max_pairs, 0)
    if len(t) == 0:
        raise FitError(f"{inp.records}: split {inp.split!r} has no position with an earlier one in the same book")
    o = predict_pairs(dr.predictor, te, t, s, gates={dr.primary: dr.gate}, desc="recalibration",
                      copy=context_copy_stats(te.tokens, te.run_start))
    max_n = meta.get("config", {}).get("copy_max_n", MAX_N) if dr.maps is None else dr.scoring.max_n
    cert = certify_pairs(o, te, dr.predictor.tables, max_n, tp, dl, mf, 0, baselines=False)
    return Run(inp.records, inp.split, split_books(te, part), dr.primary, dr.threshold, dr.maps, len(t), cert)


def eagle_run(records, gate, meta, split, part, tp, dl, mf, max_pairs, force) -> Run:
    rec, path, name, split = open_split(records, gate, meta, split)
    entry = next(m for m in rec.meta["models"] if m["name"] == name)
    dr = load_drafter(gate, {"name": name, "fingerprint": rec.fingerprint, "hidden_size": entry["hidden_size"],
                             "vocab_size": entry["vocab_size"], "n_layers": entry["n_layers"]})
    te = select_part(load_split(rec, path, split, name, dr.hidden_layer), part, path)
    check_split(meta, path, split, split_books(te, part), force)
    n = max(1, max_pairs // dr.depth)          # positions: up to depth pairs each
    o = drafts_on(dr.fast or dr.head, [te], None if len(te) <= n else [np.arange(n)],
                  SimpleNamespace(eagle_depth=dr.depth),
                  dr.tables, "recalibration")
    cert = certify_eagle(dr.gate, o, [te], dr.tables, tp, dl, mf, 0)
    return Run(path, split, split_books(te, part), dr.GATE, dr.threshold,
               None if dr.maps is None else {dr.GATE: dr.maps}, len(o["t"]), cert)


def router_run(records, gate, meta, split, part, tp, dl, mf, max_pairs, force) -> Run:
    rec, path, _, split = open_split(records, gate, meta, split)
    big, small = pair_entries(rec, path, meta["big_model"]["name"])
    try:
        for role, entry in (("big", big), ("small", small)):
            check_identity(meta[f"{role}_model"], {"fingerprint": rec.fingerprint, **entry}, role, str(gate))
    except ValueError as e:
        raise FitError(str(e)) from None
    check_files(Path(gate), meta)
    feats, gate_fn = load_router_parts(gate, meta, {"fingerprint": rec.fingerprint, **small})
    d = load_pair(rec, path, split, big, small, meta.get("copy_max_n", MAX_N))
    if part is not None:
        b, sm = select_part(d.big, part, path), select_part(d.small, part, path)
        d = PairSplit(b, sm, *b.copy_rule(meta.get("copy_max_n", MAX_N)))
    check_split(meta, path, split, split_books(d.big, part), force)
    rows, s = subsample_pairs(*since_big(d, meta["max_skip"], 0, meta["features"]["big_hidden"]), max_pairs, 0)
    if len(rows) == 0:
        raise FitError(f"{path}: split {split!r} has no position to calibrate on")
    primary = meta["primary_gate"]
    cert = certify_router(feats, {primary: gate_fn}, [(d, rows, s)], tp, dl, mf, 0)
    old = router_maps(meta, gate)
    return Run(path, split, split_books(d.big, part), primary, float(meta["threshold"]),
               None if old is None else {primary: old}, len(rows), cert)


RUNS = {FORMAT: heads_run, EAGLE_FORMAT: eagle_run, ROUTER_FORMAT: router_run}


def recalibrate(records, gate, out=None, split: str = "validation", part: str | None = None,
                target_precision: float | None = None, delta: float | None = None, max_pairs: int = 400000,
                log=print, command: str = "", force: bool = False, map_frac: float | None = None) -> dict:
    """Certify a new threshold for `gate` on the records' split; write the recalibrated artifact to `out`
    (default: `gate` itself, only drafter.json rewritten). Returns the new calibration entry. The caller holds
    the output folder's lock (main does)."""
    if max_pairs < 1:
        raise FitError(f"--max-pairs {max_pairs}: must be >= 1")
    meta = check_kind(gate)
    tp = meta.get("target_precision", 0.99) if target_precision is None else target_precision
    dl = meta.get("delta", 0.1) if delta is None else delta
    settings = meta.get("config") or meta.get("settings") or {}
    mf = settings.get("map_frac", FitConfig().map_frac) if map_frac is None else map_frac
    run = RUNS[meta["format"]](records, gate, meta, split, part, tp, dl, mf, max_pairs, force)
    cert, primary = run.cert, run.primary
    cal, lt = cert["calibration"][primary], cert["ltt_part"]
    cal = {k: v for k, v in cal.items() if k != "coverage_at_target"}
    report = certification(cal, cert["oracle"], int((~lt).sum()), int(lt.sum()))
    log(f"[calibrate] {kind_of(meta)}, gate {primary}, on {run.pairs:,} pairs of {run.records} ({run.split}"
        f"{', part ' + part if part else ''}): threshold {format_threshold(run.threshold)} -> "
        f"{format_threshold(cal['threshold'])}")
    log("[calibrate] " + report["text"])
    maps = {**(run.maps or {}), primary: cert["maps"][primary]}
    fitted = {"records": str(run.records), "split": run.split, "part": part, "pairs": int((~lt).sum()),
              "map_frac": mf, "by": "train.py calibrate"}
    on = {"records": str(Path(run.records).resolve()), "split": run.split, "part": part, "books": run.books,
          "by": "train.py calibrate"}
    calibration = cal if meta["format"] == ROUTER_FORMAT else {**meta.get("calibration", {}), primary: cal}
    meta = {k: v for k, v in meta.items() if k != "copy_trust"}      # an older artifact's trust table: replaced
    meta = dict(meta, threshold=cal["threshold"], calibration=calibration, calibrated_on=on,
                precision_maps=maps_meta(maps, {**meta.get("precision_maps", {}), "fitted_on": fitted}),
                recalibrated={"gate": str(Path(gate).resolve()), "records": str(run.records), "split": run.split,
                              "part": part, "pairs": int(run.pairs), "map_pairs": int((~lt).sum()),
                              "ltt_pairs": int(lt.sum()), "books": run.books,
                              "previous_threshold": run.threshold, "target_precision": tp, "delta": dl,
                              "certification": {k: v for k, v in report.items() if k != "text"},
                              "command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_artifact(Path(gate), Path(out) if out else Path(gate), meta)
    return cal


def certification(cal: dict, oracle: float, map_pairs: int, ltt_pairs: int) -> dict:
    """What a calibration certified, against the oracle (skip exactly where some proposal is the big model's
    token) on the same pairs; "text": the report's lines."""
    tp = cal["target_precision"]
    frac = cal["coverage"] / oracle if oracle > 0 else None
    rep = {"certified": cal["certified"], "coverage": cal["coverage"], "precision": cal["precision"],
           "oracle_coverage": oracle, "fraction_of_oracle": frac}
    head = (f"pairs: {map_pairs:,} for the precision maps, {ltt_pairs:,} for the threshold; "
            f"oracle coverage at {tp:.0%} precision on the latter {oracle:.1%}\n")
    if not cal["certified"]:
        rep["text"] = head + (f"NOTHING certified: no threshold keeps precision >= {tp:.0%} with probability >= "
                              f"{1 - cal['delta']:.0%} on this text - the gate will skip nothing here")
    else:
        rep["text"] = head + (f"certified: threshold {format_threshold(cal['threshold'])}, coverage "
                              f"{cal['coverage']:.1%} at precision {cal['precision']:.2%} (error <= "
                              f"{1 - tp:.2%} with probability >= {1 - cal['delta']:.0%}) = "
                              f"{frac:.2f} of the oracle")
    return rep


def write_artifact(src: Path, dst: Path, meta: dict) -> None:
    """drafter.json with the new meta; the tensors (every file drafter.json lists) copied unchanged when dst is
    another folder (drafter.json is written last: a folder without it is incomplete, and load_drafter checks the
    tensors' sha256). The caller holds dst's lock."""
    if dst.resolve() != src.resolve():
        dst.mkdir(parents=True, exist_ok=True)
        (dst / META_FILE).unlink(missing_ok=True)
        for name in meta.get("files", {}):
            shutil.copyfile(src / name, dst / name)
    write_json(dst / META_FILE, meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train.py calibrate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--records", required=True, help="records of your text (python train.py record), made with "
                    "the gate's big model")
    ap.add_argument("--gate", required=True, help="drafter folder written by `python train.py fit`")
    ap.add_argument("--out", help="folder for the recalibrated drafter (default: rewrite --gate's drafter.json)")
    ap.add_argument("--split", default="validation", help="the records' split to calibrate on")
    ap.add_argument("--part", metavar="I/K", help="only every K-th book of the split, from the I-th (keep the "
                    "other part to check the new threshold with `train.py evaluate --part`)")
    ap.add_argument("--target-precision", type=float, help="default: the gate's own")
    ap.add_argument("--delta", type=float, help="default: the gate's own")
    ap.add_argument("--max-pairs", type=int, default=400000, help="at most this many (position, since_big) pairs")
    ap.add_argument("--map-frac", type=float, help="share of the pairs the precision maps are fitted on (the "
                    "threshold is certified on the rest); default: the gate's own")
    ap.add_argument("--force", action="store_true", help="calibrate on a split the gate was trained on, and let "
                    "--out replace another artifact")
    args = ap.parse_args(argv)
    cmd = "python train.py calibrate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.target_precision is not None and not 0.5 <= args.target_precision < 1:
        raise FitError(f"--target-precision {args.target_precision}: must be in [0.5, 1)")
    if args.delta is not None and not 0 < args.delta < 1:
        raise FitError(f"--delta {args.delta}: must be in (0, 1)")
    if args.max_pairs < 1:
        raise FitError(f"--max-pairs {args.max_pairs}: must be >= 1")
    if args.map_frac is not None and not 0 < args.map_frac < 1:
        raise FitError(f"--map-frac {args.map_frac}: must be in (0, 1)")
    gate, out = Path(args.gate), Path(args.out or args.gate)
    check_kind(gate)
    check_output_dir(out, "--out" if args.out else "--gate (rewritten in place without --out)")
    check_out(gate, out, args.force)
    with FolderLock(out, "train.py calibrate"):   # before any work, held to the end
        recalibrate(args.records, args.gate, args.out, args.split, args.part, args.target_precision, args.delta,
                    args.max_pairs, log=lambda x: print(x, file=sys.stderr, flush=True), command=cmd,
                    force=args.force, map_frac=args.map_frac)
    return 0
