"""`python train.py calibrate --records R --gate G [--out G2]`: new precision maps and threshold, on your text.

The heads drafter's primary gate: its precision maps (gate/model/precision.py) re-fitted and its threshold
certified on records of your own text, with the fit's calibration (gate.train.data.certify_pairs).

    recalibrate(records, gate, out=None, split="validation", ...) -> the new calibration entry

Only the maps, the threshold and their metadata change: drafter.safetensors is copied byte for byte. Refused before
any work: bad numbers, another drafter kind, an unwritable --out or one holding another artifact (unless --force),
a split the gate was trained on (unless --force), records of another tokenizer. docs/training.md says why.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common.files import FolderLock, check_output_dir, write_json
from gate.model.artifact import META_FILE, ArtifactError
from gate.model.heads import context_copy_stats, pair_index
from gate.model.copyrule import MAX_N
from gate.model.heads_drafter import FORMAT, TENSOR_FILE, maps_meta
from gate.model.load import kind_of, read_meta
from gate.train.calibration import format_threshold, ltt_calibrate
from gate.train.config import FitConfig
from gate.train.data import FitError, certify_pairs, predict_pairs, subsample_pairs
from gate.train.evaluate import open_inputs


def check_kind(gate) -> dict:
    """The gate's drafter.json, if it is the heads drafter (the one this command recalibrates)."""
    meta = read_meta(gate)
    if meta["format"] != FORMAT:
        raise ArtifactError(f"--gate {gate}: {kind_of(meta)}; calibrate recalibrates the heads drafter of "
                            "`train.py fit` only")
    return meta


def check_out(gate: Path, out: Path, force: bool) -> None:
    """Refuse an --out folder that holds an artifact this command did not make from this gate (unless force)."""
    if force or out.resolve() == gate.resolve() or not (out / META_FILE).exists() and not (out / TENSOR_FILE).exists():
        return
    try:
        recal = read_meta(out).get("recalibrated") or {}
    except ArtifactError:
        recal = {}
    if not recal or recal.get("gate", str(gate.resolve())) != str(gate.resolve()):   # (older ones name no gate)
        raise FitError(f"--out {out}: holds another drafter artifact (not a recalibration of {gate}); name a new "
                       "folder, or add --force to replace it")


def training_books(meta: dict, records: Path, split: str) -> set[str]:
    """The books of the gate's training split (drafter.json's training_data); when drafter.json lists none, every
    book of `split` if it is the training split of the very records the gate was trained on."""
    data = meta.get("training_data", {})
    train = data.get("splits", {}).get("train")
    books = data.get("counts", {}).get(train, {}).get("books")
    if books:
        return set(books)
    return {"*"} if str(Path(records).resolve()) == data.get("records") and split == train else set()


def split_books(te, part: str | None) -> list[str]:
    """The books of a loaded split (only those of the part, with --part)."""
    return list(te.books) if part is None else sorted({te.books[b] for b in set(te.book)})


def check_split(inp, part: str | None, force: bool) -> None:
    """Refuse calibrating on books the gate was trained on, unless force."""
    trained = training_books(inp.meta, inp.records, inp.split)
    books = split_books(inp.te, part)
    overlap = books if "*" in trained else sorted(set(books) & trained)
    if overlap and not force:
        raise FitError(f"--split {inp.split}: the gate was trained on {len(overlap)} of its {len(books)} books "
                       f"({', '.join(overlap[:3])}{', ...' if len(overlap) > 3 else ''}); a threshold certified on "
                       "its own training text promises a precision it does not have on new text - calibrate on a "
                       "split it was not trained on (validation, test), or add --force")


def recalibrate(records, gate, out=None, split: str = "validation", part: str | None = None,
                target_precision: float | None = None, delta: float | None = None, max_pairs: int = 400000,
                log=print, command: str = "", force: bool = False, map_frac: float | None = None) -> dict:
    """Certify a new threshold for `gate` on the records' split; write the recalibrated artifact to `out`
    (default: `gate` itself, only drafter.json rewritten). Returns the new calibration entry. The caller holds
    the output folder's lock (main does)."""
    if max_pairs < 1:
        raise FitError(f"--max-pairs {max_pairs}: must be >= 1")
    check_kind(gate)
    inp = open_inputs(records, gate, split, part)
    check_split(inp, part, force)
    dr, te, meta = inp.dr, inp.te, inp.meta
    tp = meta.get("target_precision", 0.99) if target_precision is None else target_precision
    dl = meta.get("delta", 0.1) if delta is None else delta
    t, s = subsample_pairs(*pair_index(te.run_start, np.arange(len(te)), dr.predictor.max_s), max_pairs, 0)
    if len(t) == 0:
        raise FitError(f"{inp.records}: split {inp.split!r} has no position with an earlier one in the same book")
    o = predict_pairs(dr.predictor, te, t, s, gates={dr.primary: dr.gate}, desc="recalibration",
                      copy=context_copy_stats(te.tokens, te.run_start))
    max_n = meta.get("config", {}).get("copy_max_n", MAX_N) if dr.maps is None else dr.scoring.max_n
    mf = meta.get("config", {}).get("map_frac", FitConfig().map_frac) if map_frac is None else map_frac
    cert = certify_pairs(o, te, dr.predictor.tables, max_n, tp, dl, mf, 0, baselines=False)
    cal, lt = cert["calibration"][dr.primary], cert["ltt_part"]
    report = certification(cal, cert["oracle"], int((~lt).sum()), int(lt.sum()))
    log(f"[calibrate] {dr.primary} gate on {len(t):,} pairs of {inp.records} ({inp.split}"
        f"{', part ' + part if part else ''}): threshold {format_threshold(dr.threshold)} -> "
        f"{format_threshold(cal['threshold'])}")
    log("[calibrate] " + report["text"])
    maps = {**(dr.maps or {}), dr.primary: cert["maps"][dr.primary]}
    fitted = {"records": str(inp.records), "split": inp.split, "part": part, "pairs": int((~lt).sum()),
              "map_frac": mf, "by": "train.py calibrate"}
    meta = {k: v for k, v in meta.items() if k != "copy_trust"}      # an older artifact's trust table: replaced
    meta = dict(meta, threshold=cal["threshold"], calibration={**meta.get("calibration", {}), dr.primary: cal},
                precision_maps=maps_meta(maps, {**meta.get("precision_maps", {}), "fitted_on": fitted}),
                recalibrated={"gate": str(Path(gate).resolve()), "records": str(inp.records), "split": inp.split,
                              "part": part, "pairs": int(len(t)), "map_pairs": int((~lt).sum()),
                              "ltt_pairs": int(lt.sum()), "books": split_books(te, part),
                              "previous_threshold": dr.threshold, "target_precision": tp, "delta": dl,
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
    """drafter.json with the new meta; the tensors copied unchanged when dst is another folder (drafter.json is
    written last: a folder without it is incomplete, and load_drafter checks the tensors' sha256). The caller
    holds dst's lock."""
    if dst.resolve() != src.resolve():
        dst.mkdir(parents=True, exist_ok=True)
        (dst / META_FILE).unlink(missing_ok=True)
        shutil.copyfile(src / TENSOR_FILE, dst / TENSOR_FILE)
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
