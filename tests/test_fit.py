"""`train.py fit` / `evaluate` end to end: tiny random LLaMA records (fast, exercises every path), bad input,
the artifact round trip, determinism and resume, and a small real SmolLM2 record set."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_tools import record as rec_mod
from corpus_tools.records import open_records
from gate.decode.loop import Decoder
from gate.decode.policies import BigOnly, Gate
from gate.model import load as D
from gate.model.copyrule import CopyIndex
from gate.model.precision import combine_sources
from gate.train.evaluate import evaluate
from gate.train.fit import FitError, fit
from runtimes.hf import HFBackend
from runtimes.info import TokenizerMismatch
from runtimes.loading import load

from helpers import (
    SPLIT_REC,
    book_text,
    call_main,
    make_tiny_llama,
    make_tiny_tokenizer,
    save_model,
    split_records,
    write_corpus,
)

TINY_REC = SPLIT_REC
# min_steps 50, not the default 300: these tests check artifacts, resumption and refusals, not what the heads
# learn (a fit takes about 2 s instead of 5; the module fits six times)
SMALL_FIT = dict(restricted=48, width=32, d_tok=8, d_hid=16, epochs=3.0, future_epochs=3.0, n_pca=4,
                 max_gate_pairs=20000, batch=64, dtype="float32", min_steps=50)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the whole module (module fixtures included): tiny models run faster, and the
    determinism test compares runs that must use the same thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama, tiny_tokenizer):
    """(model dir, corpus dir, records dir) for the tiny random LLaMA."""
    return split_records(tmp_path_factory.mktemp("fit"), tiny_llama, tiny_tokenizer, ("middle", "last"))


@pytest.fixture(scope="module")
def tiny_gate(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "drafter"
    fit(tiny[2], out, log=lambda m: None, **SMALL_FIT)
    return out


def _info(model_dir):
    return load(model_dir, dtype="float32").info


def test_artifact_round_trip_and_contract(tiny, tiny_gate):
    model_dir, _, records = tiny
    info = _info(model_dir)
    meta = json.loads((tiny_gate / "drafter.json").read_text())
    assert meta["big_model"]["fingerprint"] == info.fingerprint
    assert meta["hidden_layer"] == info.n_layers and meta["max_skip"] == 4
    for key in ("training_data", "calibration", "metrics", "versions", "cost", "features", "threshold"):
        assert key in meta
    assert meta["training_data"]["counts"]["train"]["positions"] > 0
    dr = D.load_drafter(tiny_gate, info)
    assert (dr.hidden_layer, dr.max_skip) == (info.n_layers, 4)
    assert dr.threshold == meta["threshold"]
    # propose == the predictor + primary gate on the same inputs, and matches a second load exactly
    rec = open_records(records)
    name = rec.models[0]
    a = rec.load("test", fields=["token", f"hidden/{info.n_layers}"], models=[name])
    ids = a["token"][:30].tolist()
    h = torch.from_numpy(a[f"{name}/hidden/{info.n_layers}"][27].astype(np.float32))
    tok, score = dr.propose(ids, h, 2)                  # big computed position 27, ids has 27 + 1 + 2 entries
    # the same through the records code path (context_copy_stats instead of the incremental index)
    from gate.model.features import pick_candidate
    from gate.model.heads import context_copy_stats, run_starts
    cp = context_copy_stats(np.array(ids), run_starts(np.zeros(len(ids)), np.arange(len(ids))))
    cp = {k: v[-1:] for k, v in cp.items()}
    out = dr.predictor.run(dr.predictor.context(ids)[None], h[None], torch.tensor([2]), cp)
    _, want_tok, want_score = pick_candidate(dr.score(out), out)
    assert dr.maps and dr.copy_trust is None and dr.scoring.max_n == 12   # the copy rule is part of the drafter
    index = CopyIndex(12)
    index.sync(ids)
    copy_tok, copy_len = index.query(64)
    want_tok, want_score, _ = combine_sources(want_tok, want_score, np.array([copy_tok]), np.array([copy_len]),
                                              dr.scoring)
    assert tok == int(want_tok[0]) and score == pytest.approx(float(want_score[0]))
    assert 0 <= tok < info.vocab_size and 0.0 <= score <= 1.0
    again = D.load_drafter(tiny_gate, info.to_dict())
    assert again.propose(ids, h, 2) == (tok, score)
    assert dr.propose(ids, h, 4)[1] == 0.0               # since_big >= max_skip: never skip
    assert dr.propose(ids[:3], h, 1)[0] >= 0             # shorter than the context window: padded (and the
    assert dr.propose(ids, h, 2) == (tok, score)         # copy index rebuilt for another text, then again)
    dr.start()
    assert dr.propose(ids, h, 2) == (tok, score)
    with pytest.raises(ValueError):
        dr.propose(ids, h, 0)


def test_fit_is_deterministic_and_resumable(tiny, tiny_gate, tmp_path):
    logs = []
    fit(tiny[2], tmp_path / "again", log=logs.append, **SMALL_FIT)
    a = (tiny_gate / "drafter.safetensors").read_bytes()
    b = (tmp_path / "again" / "drafter.safetensors").read_bytes()
    assert a == b
    logs.clear()
    fit(tiny[2], tmp_path / "again", log=logs.append, **SMALL_FIT)
    assert any("heads: loaded finished stage" in m for m in logs)
    assert any("gates: loaded finished stage" in m for m in logs)
    assert (tmp_path / "again" / "drafter.safetensors").read_bytes() == a
    # another seed retrains (and changes the weights)
    logs.clear()
    fit(tiny[2], tmp_path / "again", log=logs.append, **{**SMALL_FIT, "seed": 1})
    assert not any("heads: loaded" in m for m in logs)
    assert (tmp_path / "again" / "drafter.safetensors").read_bytes() != a


def test_evaluate_writes_report(tiny, tiny_gate, tmp_path):
    m = evaluate(tiny[2], tiny_gate, tmp_path / "eval", log=lambda x: None, probe_k=32)
    for f in ("report.md", "metrics.json", "curves.png", "curves_by_class.png", "runlengths.png", "probes.png"):
        assert (tmp_path / "eval" / f).is_file(), f
    cap = m["coverage_at_precision"]
    assert cap["oracle:head"][0.99] == pytest.approx(m["head_accuracy"])
    assert cap["oracle"][0.99] >= max(m["predictor_accuracy"], m["any_candidate_right"]) - 1e-9
    assert m["any_candidate_right"] >= max(m["predictor_accuracy"], m["head_accuracy"])
    for meth in cap:
        assert all(0 <= v <= 1 for v in cap[meth].values())
        assert cap[meth][0.95] >= cap[meth][0.995]
    # the copy rule and the copy / non-copy split: every method in both, the shares add up, and the oracle
    # (some proposal right) bounds every method: coverage x precision <= the share the oracle skips
    assert "copy" in cap and m["copy_rule"]["in_drafter"] and m["copy_rule"]["scoring"] == "precision maps"
    assert m["copy_positions"]["share"] + m["non_copy"]["share"] == pytest.approx(1.0)
    assert m["copy_positions"]["pairs"] + m["non_copy"]["pairs"] == m["pairs"]
    for part in ("copy_positions", "non_copy"):
        sub = m[part]["coverage_at_precision"]
        assert set(sub) == set(cap)
        for meth, row in sub.items():
            for level, c in row.items():
                assert c * level <= sub["oracle"][0.99] + 1e-9, (part, meth, level)
    for meth, row in cap.items():
        for level, c in row.items():
            assert c * level <= cap["oracle"][0.99] + 1e-9, (meth, level)
    assert "beyond copying" in (tmp_path / "eval" / "report.md").read_text()
    pol = m["policy"][json.loads((tiny_gate / "drafter.json").read_text())["primary_gate"]]
    assert 0 <= pol["coverage"] <= 1 and pol["positions"] > 0
    assert "Coverage at precision" in (tmp_path / "eval" / "report.md").read_text()
    assert set(m["probes"]["layers"]) == set(open_records(tiny[2]).meta["models"][0]["layers"])


# ------------------------------------------------------------------------------------------------ bad input
def test_calibrate_changes_only_the_threshold(tiny, tiny_gate, tmp_path, monkeypatch):
    from gate.train.recalibrate import main as calibrate_main

    out = tmp_path / "recal"
    assert calibrate_main(["--records", str(tiny[2]), "--gate", str(tiny_gate), "--out", str(out), "--split", "test",
                           "--target-precision", "0.6"]) == 0
    old = json.loads((tiny_gate / "drafter.json").read_text())
    new = json.loads((out / "drafter.json").read_text())
    assert (out / "drafter.safetensors").read_bytes() == (tiny_gate / "drafter.safetensors").read_bytes()
    changed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    assert changed <= {"threshold", "calibration", "recalibrated", "precision_maps", "calibrated_on"}
    assert "recalibrated" in changed and new["calibrated_on"]["split"] == "test" and new["calibrated_on"]["books"]
    assert new["precision_maps"]["fitted_on"]["by"] == "train.py calibrate"
    assert new["recalibrated"]["certification"]["oracle_coverage"] > 0
    assert new["recalibrated"]["previous_threshold"] == old["threshold"]
    assert new["calibration"][new["primary_gate"]]["target_precision"] == 0.6
    info = _info(tiny[0])
    assert D.load_drafter(out, info).threshold == new["threshold"]
    # the recalibrated gate still refuses another tokenizer
    other_tok = make_tiny_tokenizer(vocab_size=280)
    other_dir = save_model(tmp_path / "other", make_tiny_llama(len(other_tok), seed=3), other_tok)
    with pytest.raises(TokenizerMismatch):
        D.load_drafter(out, _info(other_dir))
    # --part I/K: disjoint parts of a split's books (train has two); the figures, a second each, are
    # test_evaluate_writes_report's
    for plot in ("_plot_curves", "_plot_by_class", "_plot_runs"):
        monkeypatch.setattr(f"gate.train.evaluate.{plot}", lambda *a, **k: None)
    ev = {part: evaluate(tiny[2], out, tmp_path / f"e{i}", split="train", log=lambda x: None, probes=False,
                         part=part) for i, part in enumerate((None, "1/2", "2/2"))}
    assert ev["1/2"]["positions"] + ev["2/2"]["positions"] == ev[None]["positions"]
    assert min(ev["1/2"]["positions"], ev["2/2"]["positions"]) > 0
    with pytest.raises(FitError, match="--part 3/2"):
        evaluate(tiny[2], out, tmp_path / "e9", split="train", log=lambda x: None, probes=False, part="3/2")


def test_refuses_other_tokenizer(tiny, tiny_gate, tmp_path):
    other_tok = make_tiny_tokenizer(vocab_size=280)
    other_dir = save_model(tmp_path / "other", make_tiny_llama(len(other_tok), seed=3), other_tok)
    info = _info(other_dir)
    with pytest.raises(TokenizerMismatch, match=str(tiny_gate)):
        D.load_drafter(tiny_gate, info)
    # records of the other tokenizer against this gate
    corpus = write_corpus(tmp_path / "corpus", [("a", "train", book_text(0, 2)), ("c", "val", book_text(2, 1)),
                                                ("d", "test", book_text(3, 1))])
    other_rec = tmp_path / "other_records"
    rec_mod.record([other_dir], corpus, other_rec, layers=("last",), **TINY_REC)
    with pytest.raises(TokenizerMismatch, match="other_records"):
        evaluate(other_rec, tiny_gate, tmp_path / "ev", log=lambda x: None)
    rc, err = train_py("evaluate", "--records", other_rec, "--gate", tiny_gate, "--out", tmp_path / "e2")
    one_error_line(rc, err, "were made with tokenizer")
    rc, err = train_py("calibrate", "--records", other_rec, "--gate", tiny_gate, "--split", "test", "--out",
                       tmp_path / "recal")
    one_error_line(rc, err, "were made with tokenizer")
    assert not (tmp_path / "recal" / "drafter.json").exists()
    # fit with --model of another tokenizer than the records
    with pytest.raises(TokenizerMismatch, match="records"):
        fit(tiny[2], tmp_path / "g", model=other_dir, log=lambda m: None, **SMALL_FIT)


def test_bad_records_give_clear_errors(tiny, tmp_path):
    model_dir = tiny[0]
    rc, err = train_py("fit", "--records", tmp_path / "nope", "--out", tmp_path / "g")
    one_error_line(rc, err, "nope")
    assert err.strip().splitlines()[-1].startswith("train.py fit: error: ")
    # no validation split
    corpus = write_corpus(tmp_path / "c1", [("a", "train", book_text(0, 2)), ("d", "test", book_text(3, 1))])
    rec = tmp_path / "r1"
    rec_mod.record([model_dir], corpus, rec, layers=("last",), **TINY_REC)
    with pytest.raises(FitError, match=r"r1.*no validation split"):
        fit(rec, tmp_path / "g1", log=lambda m: None, **SMALL_FIT)
    # an empty validation split
    corpus = write_corpus(tmp_path / "c2", [("a", "train", book_text(0, 2)), ("c", "val", ""), ("d", "test", "x")])
    rec = tmp_path / "r2"
    rec_mod.record([model_dir], corpus, rec, layers=("last",), **TINY_REC)
    with pytest.raises(FitError, match=r"r2.*'val' is empty"):
        fit(rec, tmp_path / "g2", log=lambda m: None, **SMALL_FIT)
    # a hidden layer that was not recorded
    with pytest.raises(FitError, match=r"hidden layer 1 .* not recorded"):
        fit(rec, tmp_path / "g3", log=lambda m: None, **{**SMALL_FIT, "layer": 1})
    # a gate folder that is not a finished artifact
    (tmp_path / "half").mkdir()
    with pytest.raises(D.ArtifactError, match="drafter.json"):
        D.load_drafter(tmp_path / "half", None)


def test_damaged_artifact_is_refused(tiny_gate, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_gate, bad)
    with open(bad / "drafter.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(D.ArtifactError, match="sha256"):
        D.load_drafter(bad, None)


# ------------------------------------------------------------------------------------------------ issue 22
def train_py(*args) -> tuple[int, str]:
    """`python train.py ARGS` run as train.py's main in this process (a subprocess per call imports torch anew:
    seconds each): (exit status, stderr)."""
    import train

    return call_main(train.main, args)


def one_error_line(rc: int, err: str, expected: str) -> None:
    """Exit 2, no traceback, one `error:` line (the last), holding `expected`."""
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and expected in errors[0], err[-2000:]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_calibrate_refuses_the_training_split_and_another_artifact(tiny, tiny_gate, tmp_path):
    """Cases 7-9: the gate's own training books are refused unless --force; --out checked (and locked) before any
    work, and refused when it holds an artifact calibrate did not make from this gate; nothing is touched."""
    import shutil

    records, gate = tiny[2], tiny_gate
    before = snapshot(gate)
    rc, err = train_py("calibrate", "--records", records, "--gate", gate, "--split", "train", "--out", tmp_path / "o")
    one_error_line(rc, err, "--split train: the gate was trained on 2 of its 2 books (")
    assert "or add --force" in err and not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    rc, err = train_py("calibrate", "--records", records, "--gate", gate, "--out", tmp_path / "file")
    one_error_line(rc, err, f"--out {tmp_path / 'file'}: exists and is not a folder")
    assert "[calibrate]" not in err                                            # case 9: refused before the work
    shutil.copytree(gate, tmp_path / "other")                                 # an unrelated artifact
    rc, err = train_py("calibrate", "--records", records, "--gate", gate, "--split", "test", "--out",
                       tmp_path / "other")
    one_error_line(rc, err, f"--out {tmp_path / 'other'}: holds another drafter artifact (not a recalibration of ")
    assert "[calibrate]" not in err and snapshot(tmp_path / "other") == before
    rc, err = train_py("fit", "--drafter", "eagle", "--records", records, "--out", tmp_path / "other")  # case 8
    one_error_line(rc, err, f"--out {tmp_path / 'other'}: holds the heads drafter (train.py fit); this fit "
                            "(--drafter eagle) would replace it")
    assert snapshot(tmp_path / "other") == before
    # forced: calibrated on train; then calibrate may rewrite its own --out, and fit refuses the recalibrated one
    rc, err = train_py("calibrate", "--records", records, "--gate", gate, "--split", "train", "--out", tmp_path / "o",
                       "--force", "--target-precision", "0.6")
    assert rc == 0 and "threshold" in err, err[-2000:]
    rc, err = train_py("calibrate", "--records", records, "--gate", gate, "--split", "test", "--out", tmp_path / "o",
                       "--target-precision", "0.6")
    assert rc == 0, err[-2000:]
    assert json.loads((tmp_path / "o" / "drafter.json").read_text())["recalibrated"]["split"] == "test"
    with pytest.raises(FitError, match="holds a drafter recalibrated by train.py calibrate"):
        fit(records, tmp_path / "o", log=lambda m: None, **SMALL_FIT)
    assert snapshot(gate) == before and sorted(os.listdir(tmp_path / "o")) == ["drafter.json", "drafter.safetensors"]


def test_an_older_artifact_keeps_working_and_calibrate_gives_it_maps(tiny, tiny_gate, tmp_path):
    """An artifact from before the precision maps (a copy trust table, no maps) loads and proposes as it did;
    train.py calibrate on it fits the maps and drops the table, the tensors untouched."""
    import hashlib
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_gate, old)
    meta = json.loads((old / "drafter.json").read_text())
    del meta["precision_maps"]
    meta["copy_trust"] = [0.0] + [0.5] * 11 + [1.0]
    (old / "drafter.json").write_text(json.dumps(meta))
    info = _info(tiny[0])
    dr = D.load_drafter(old, info)
    assert dr.maps is None and dr.copies.max_n == 12 and dr.extend == 0
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 2
    assert dr.propose(ids, torch.zeros(info.hidden_size), 1) == (5, 1.0)    # a trusted 12-token copy, as before
    rc, err = train_py("calibrate", "--records", tiny[2], "--gate", old, "--split", "test", "--out", tmp_path / "new",
                       "--target-precision", "0.6")
    assert rc == 0 and "pairs: " in err and ("of the oracle" in err or "skip nothing here" in err), err[-2000:]
    new = json.loads((tmp_path / "new" / "drafter.json").read_text())
    assert "copy_trust" not in new and set(new["precision_maps"]["gates"]) == {meta["primary_gate"]}
    sha = [hashlib.sha256((p / "drafter.safetensors").read_bytes()).hexdigest() for p in (old, tmp_path / "new")]
    assert sha[0] == sha[1]
    dr = D.load_drafter(tmp_path / "new", info)
    assert dr.maps and dr.extend == 64 and 0 < dr.propose(ids, torch.zeros(info.hidden_size), 1)[1] < 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_calibrate_in_place_on_a_read_only_gate_is_one_error_line(tiny, tiny_gate, tmp_path):
    """Case 9: rewriting --gate in place where it cannot be written is refused before the work."""
    import shutil

    ro = tmp_path / "ro"
    shutil.copytree(tiny_gate, ro)
    ro.chmod(0o555)
    try:
        rc, err = train_py("calibrate", "--records", tiny[2], "--gate", ro, "--split", "test")
        one_error_line(rc, err, f"--gate (rewritten in place without --out) {ro}: cannot write in")
        assert "[calibrate]" not in err
    finally:
        ro.chmod(0o755)


def test_threshold_in_the_log_says_what_it_is():
    """Minor: `threshold 1 -> 1` said nothing; NEVER is 'never', thresholds near 1 show their distance to it."""
    from gate.model.features import NEVER
    from gate.train.calibration import format_threshold

    assert format_threshold(NEVER) == "never (none certified)"
    assert format_threshold(1.0) == "1 (saturated scores only)"
    assert format_threshold(0.99996) == "1 - 4e-05" and format_threshold(0.5) == "0.5"


# ------------------------------------------------------------------------------------------------ SmolLM2
AUSTEN = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.",
    "\u201cMy dear Mr. Bennet,\u201d said his lady to him one day, \u201chave you heard that Netherfield Park is let "
    "at last?\u201d Mr. Bennet replied that he had not. \u201cBut it is,\u201d returned she; \u201cfor Mrs. Long has "
    "just been here, and she told me all about it.\u201d Mr. Bennet made no answer.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite "
    "some of the best blessings of existence; and had lived nearly twenty-one years in the world with very little "
    "to distress or vex her.",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up any "
    "book but the Baronetage; there he found occupation for an idle hour, and consolation in a distressed one.",
]


# ------------------------------------------------------------------------------------------------ issue 29
def test_evaluate_refuses_the_books_the_gate_was_calibrated_on(tiny, tiny_gate, tmp_path, monkeypatch):
    """Case 6: drafter.json says what the threshold was certified on (fit: its validation split; calibrate: the
    split and --part); evaluate refuses those books unless --force (then says so in the log and the report),
    and every report names the calibration."""
    records, gate = tiny[2], tiny_gate
    for plot in ("_plot_curves", "_plot_by_class", "_plot_runs"):   # (a second each; not what is tested)
        monkeypatch.setattr(f"gate.train.evaluate.{plot}", lambda *a, **k: None)
    fitted = json.loads((gate / "drafter.json").read_text())["calibrated_on"]
    assert fitted["by"] == "train.py fit" and fitted["part"] is None and fitted["books"]
    rc, err = train_py("evaluate", "--records", records, "--gate", gate, "--split", fitted["split"], "--out",
                       tmp_path / "e0", "--no-probes")
    one_error_line(rc, err, f"--split {fitted['split']}: the gate was calibrated on 1 of these 1 books")
    assert err.strip().splitlines()[-1].startswith("train.py evaluate: error: ") and not (tmp_path / "e0").exists()
    recal = tmp_path / "recal"
    rc, err = train_py("calibrate", "--records", records, "--gate", gate, "--out", recal, "--split", "train",
                       "--part", "1/2", "--force", "--target-precision", "0.6")
    assert rc == 0, err[-2000:]
    on = json.loads((recal / "drafter.json").read_text())["calibrated_on"]
    assert (on["split"], on["part"], len(on["books"]), on["by"]) == ("train", "1/2", 1, "train.py calibrate")
    rc, err = train_py("evaluate", "--records", records, "--gate", recal, "--split", "train", "--part", "1/2",
                       "--out", tmp_path / "e1", "--no-probes")
    one_error_line(rc, err, "--split train --part 1/2: the gate was calibrated on 1 of these 1 books (")
    assert "by train.py calibrate on split 'train' of " in err and ", part 1/2), so its precision here is the " \
        "calibration's own, not a test of it - evaluate on books it was not calibrated on" in err
    rc, err = train_py("evaluate", "--records", records, "--gate", recal, "--split", "train", "--part", "2/2",
                       "--out", tmp_path / "e2", "--no-probes")
    assert rc == 0 and "warning" not in err, err[-2000:]
    report = (tmp_path / "e2" / "report.md").read_text()
    assert "Gate calibrated on: split 'train' of " in report and ", part 1/2; none of the books below" in report
    rc, err = train_py("evaluate", "--records", records, "--gate", recal, "--split", "train", "--part", "1/2",
                       "--out", tmp_path / "e3", "--no-probes", "--force")
    assert rc == 0 and "[evaluate] warning (--force): --split train --part 1/2: the gate was calibrated on" in err
    assert "1 of the books below are among them (--force)" in (tmp_path / "e3" / "report.md").read_text()
    m = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert m["calibrated_on"] == on and m["calibration_overlap"] == on["books"]


def test_a_batch_resume_sees_a_recalibrated_gate(tiny, tiny_gate, tmp_path):
    """Case 2: a batch with --gate G, then `train.py calibrate --gate G` in place: the resume refuses the old
    rows (the run's identity holds a hash of the artifact, not only its path), or runs them again with
    --rerun-mismatched; every row of the file is then of the recalibrated gate."""
    import shutil

    from gate.decode.cli import main

    gate = tmp_path / "gate"
    shutil.copytree(tiny_gate, gate)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt_ids": [20 + i, 30, 40 + i]}) + "\n" for i in range(2)))
    batch = ["--model", tiny[0], "--input", inp, "--output", out, "-m", "4", "--policy", "gate", "--gate", gate]
    rc, err = call_main(main, batch)
    assert rc == 0, err[-2000:]
    old = {r["run"]["gate_sha256"] for r in map(json.loads, out.read_text().splitlines())}
    rc, err = train_py("calibrate", "--records", tiny[2], "--gate", gate, "--split", "test", "--target-precision",
                       "0.6")
    assert rc == 0, err[-2000:]
    with open(inp, "a") as f:
        f.write(json.dumps({"prompt_ids": [25, 35, 45]}) + "\n")
    before = out.read_bytes()
    rc, err = call_main(main, batch)
    one_error_line(rc, err, f"--output {out}: 2 rows do not match this run's input and settings, first row 1 (id 1): "
                            f"gate_sha256 '{old.pop()}' (this run: '")
    assert out.read_bytes() == before
    rc, err = call_main(main, batch + ["--rerun-mismatched"])
    assert rc == 0, err[-2000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in got) == [1, 2, 3] and len({r["run"]["gate_sha256"] for r in got}) == 1


def test_smollm2_end_to_end(smollm2, tmp_path):
    """Record a few hundred real tokens, fit, evaluate, and propose from a live big-model hidden state."""
    corpus = write_corpus(tmp_path / "corpus", [
        ("pp", "train", "\n\n".join(AUSTEN[:2] * 3)), ("em", "train", "\n\n".join(AUSTEN[2:] * 3)),
        ("va", "val", "\n\n".join(AUSTEN[1:] + AUSTEN[:1])), ("te", "test", "\n\n".join(AUSTEN[3:] + AUSTEN[:3]))])
    records = tmp_path / "records"
    rec_mod.record(["smollm2-135m"], corpus, records, layers=("middle", "last"), context=128, stride=96,
                   max_tokens_per_book=300, shard_tokens=1000, progress=False)
    out = tmp_path / "drafter"
    fit(records, out, log=lambda m: None, **{**SMALL_FIT, "restricted": 256, "width": 64, "min_steps": 300})
    meta = json.loads((out / "drafter.json").read_text())
    assert meta["big_model"]["name"] == "smollm2-135m" and meta["hidden_layer"] == 30
    assert meta["cost"]["drafter_flops_vs_big"] < 0.05
    m = evaluate(records, out, tmp_path / "eval", log=lambda x: None, probe_k=64)
    assert (tmp_path / "eval" / "report.md").is_file() and 0 < m["predictor_accuracy"] <= 1

    dr = D.load_drafter(out, smollm2.info)
    ids = smollm2.tokenizer(AUSTEN[0][:120], add_special_tokens=False).input_ids
    with torch.no_grad():
        hs = smollm2.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[dr.hidden_layer][0]
    p = len(ids) - 2                                       # big model computed up to p; ids has p + 1 + 1
    tok, score = dr.propose(ids, hs[p].float(), 1)
    assert 0 <= tok < smollm2.info.vocab_size and 0 <= score <= 1

    # the trained drafter in the decode loop: lossless under --verify at a threshold that skips everything
    # it is asked about and at the calibrated one, token for token against plain greedy decoding
    want = Decoder(HFBackend(smollm2.model, "big"), BigOnly()).generate(ids, 16).ids
    for th in (0.0, dr.threshold):
        big = HFBackend(smollm2.model, "big")
        res = Decoder(big, Gate(dr, threshold=th), verify=True).generate(ids, 16)
        assert res.ids == want, th
        if th == 0.0:   # every proposal is drafted; each is checked, or dropped behind a rejected one
            L = res.ledger
            assert L["drafted"] > 0 and L["drafted"] == L["verified"] + L["rolled_back_tokens"] - L["rollbacks"]
