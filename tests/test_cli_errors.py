"""Bad input to `train.py`: exit status 2, one `error:` line naming the problem, never a traceback (issue 13).

Each case calls train.py's main(argv) in this process, as `python train.py ...` would (a fresh interpreter per case
imports torch and transformers anew: seconds each); a few cases run the real script in a subprocess, as a user
would (test_the_script_itself). Output paths, locks and the model/corpus checks come before any work, so every
case is quick; the model cases use a tiny random LLaMA saved as a local HF folder. The locked folder is locked by
this process through another open file, which flock() refuses just as it refuses another process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.files import FolderLock

from helpers import assert_one_error_line, call_main, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a file, a tiny corpus, a tiny model, a fake GGUF, a garbled drafter, a locked folder."""
    t = tmp_path_factory.mktemp("ws")
    (t / "file").write_text("not a folder")
    (t / "corpus" / "text").mkdir(parents=True)
    (t / "corpus" / "text" / "b.txt").write_text("Some text. " * 20)
    (t / "corpus" / "manifest.jsonl").write_text(json.dumps(
        {"book_id": "b", "title": "B", "split": "train", "chars": 220, "words": 40, "paragraphs": 1}) + "\n")
    save_tiny_model(t / "tiny")  # max_position_embeddings 2048
    (t / "fake.gguf").write_bytes(os.urandom(100))
    (t / "garbled").mkdir()
    (t / "garbled" / "drafter.json").write_bytes(b'{"format": \xff\xfe garbage')
    (t / "router").mkdir()   # a router's description (issue 22: calibrate named it a feature-head drafter)
    (t / "router" / "drafter.json").write_text(json.dumps(
        {"format": "skipgate-router/1", "big_model": {}, "small_model": {}, "gate": {}, "features": {},
         "threshold": 0.5, "max_skip": 64, "hidden_layer": 2, "files": {}}))
    with FolderLock(t / "locked", "train.py fit"):  # held by this test process for the whole module
        yield t


CASES = [  # (train.py arguments, text the error line must contain); {t} is the workspace
    ("corpus --epubs {t}/no_such --out {t}/corpus", "no EPUB to read ({t}/no_such: no such file or folder); "
                                                   "{t}/corpus is unchanged"),        # case 1
    ("corpus --epubs {t}/no_such --out {t}/file", "--out {t}/file: exists and is not a folder"),
    ("corpus --epubs tests/data --out {t}/locked", "{t}/locked: in use by train.py fit (pid {pid} "),
    ("models {t}/fake.gguf", "{t}/fake.gguf: not a GGUF file"),                       # case 8
    ("models nonexistent-model", "unknown model 'nonexistent-model'"),                # case 13
    ("inventory --corpus {t}/MISSING", "{t}/MISSING: no such corpus folder"),         # case 14
    ("record --model {t}/tiny --corpus {t}/corpus --out {t}/file", "--out {t}/file: exists and is not a folder"),
    ("record --model {t}/tiny --corpus {t}/MISSING --out {t}/rec", "{t}/MISSING: no such corpus folder"),
    ("record --model nonexistent-model --corpus {t}/corpus --out {t}/rec", "unknown model 'nonexistent-model'"),
    ("record --model {t}/tiny --corpus {t}/corpus --out {t}/rec --context 4096",
     "--context 4096: 4,096 tokens, more than the 2,048 tokens"),                     # case 2's check
    ("record --model {t}/tiny --corpus {t}/corpus --out {t}/locked", "in use by train.py fit (pid {pid} "),
    ("fit --records {t}/records --out {t}/file", "--out {t}/file: exists and is not a folder"),   # case 11
    ("fit --records {t}/records --out /proc/gate", "--out /proc/gate: cannot write in /proc"),
    ("fit --records {t}/records --out {t}/locked", "{t}/locked: in use by train.py fit (pid {pid} "),  # case 12
    ("selfgen --model {t}/tiny --corpus {t}/MISSING --out {t}/sg", "{t}/MISSING: no such corpus folder"),
    ("selfgen --model {t}/tiny --corpus {t}/corpus --out {t}/sg --new-tokens 4096",
     "--prompt-tokens 48 + --new-tokens 4096: 4,144 tokens, more than the 2,048 tokens"),
    ("report --records {t}/MISSING", "{t}/MISSING"),
    ("evaluate --records {t}/records --gate {t}/garbled", "{t}/garbled/drafter.json: not valid JSON"),  # case 15
    ("no-such-command", "unknown command 'no-such-command'"),
    ("record --model {t}/tiny --corpus {t}/corpus --out {t}/rec --context many", "invalid int value: 'many'"),
    # issue 22, case 10: every numeric option checked before any work (the records need not even exist)
    *[(f"fit --drafter eagle --records {{t}}/records --out {{t}}/g {opt}", f"{opt}: must be {rng}") for opt, rng in (
        ("--eagle-epochs nan", "> 0"), ("--eagle-epochs 0", "> 0"), ("--eagle-epochs -1", "> 0"),
        ("--eagle-depth 0", ">= 1"), ("--eagle-depth -2", ">= 1"), ("--eagle-vocab 0", ">= 2"),
        ("--eagle-window 0", ">= 2"), ("--eagle-batch 0", ">= 1"), ("--eagle-lr nan", "> 0"), ("--threads -1", ">= 0"),
        ("--target-precision 1", "in [0.5, 1)"), ("--delta 0", "in (0, 1)"), ("--gate-frac 1", "in (0, 1)"))],
    ("fit --drafter eagle --records {t}/records --out {t}/g --eagle-window 4", "--eagle-window 4: must be more "
                                                                                "than --eagle-depth 4"),
    ("fit --drafter router --records {t}/records --out {t}/g --router-topk 0", "--router-topk 0: must be >= 1"),
    ("fit --drafter router --records {t}/records --out {t}/g --router-pca -1", "--router-pca -1: must be >= 1"),
    ("calibrate --records {t}/records --gate {t}/garbled --max-pairs -5", "--max-pairs -5: must be >= 1"),
    ("calibrate --records {t}/records --gate {t}/garbled --max-pairs 0", "--max-pairs 0: must be >= 1"),   # minor
    # a router is recalibrated too (issue 19): the records are checked, and --out, before any work
    ("calibrate --records {t}/records --gate {t}/router", "{t}/records: no such records folder"),
    ("calibrate --records {t}/records --gate {t}/router --out {t}/file", "--out {t}/file: exists and is not a "
                                                                         "folder"),
    ("selfgen --model {t}/tiny --corpus {t}/corpus --chat --out {t}/sg", "--chat wraps the instructions of "
                                                                         "--prompts"),                  # minor
    # issue 29: fit's and evaluate's own errors carry the command's name (checked for every case below)
    ("fit --records {t}/records --out {t}/g", "{t}/records"),
    ("evaluate --records {t}/records --gate {t}/router", "bench/pair.py coverage"),
    # profile: a missing file is named as missing (case 13), --json checked before measuring (cases 10, 14)
    ("profile {t}/missing.gguf", "{t}/missing.gguf: no such file; the llama.cpp backend needs a GGUF model"),
    ("profile {t}", "{t}: is a folder; the llama.cpp backend needs a GGUF model"),
    ("profile smollm2-135m --json {t}", "--json {t}: is a folder; name a file"),
    ("profile smollm2-135m --json {t}/no_such/p.json", "--json {t}/no_such/p.json: folder {t}/no_such does not "
                                                       "exist"),
]


def assert_nothing_written(ws):
    assert not (ws / "rec").exists() and not (ws / "sg").exists()  # refused before writing anything
    assert not (ws / "g").exists() and (ws / "file").read_text() == "not a folder"
    assert sorted(os.listdir(ws / "router")) == ["drafter.json"]   # no lock, nothing written beside it


@pytest.mark.parametrize("args,expected", CASES, ids=[c[0].split(" {t}")[0].split(" /")[0] + f"-{i}"
                                                      for i, c in enumerate(CASES)])
def test_bad_input_is_one_error_line(ws, args, expected):
    import train

    fill = {"t": ws, "pid": os.getpid()}
    cmd = args.split()[0]
    rc, err = call_main(train.main, args.format(**fill).split())
    assert_one_error_line(rc, err, expected.format(**fill),   # README: `train.py COMMAND: error: ...`
                          start=f"train.py {cmd}: error: " if cmd in train.COMMANDS else "train.py: error: ")
    assert_nothing_written(ws)


# The real script in a subprocess: train.py's own dispatch, and a lock held by another process (this one) on a
# folder train.py checks itself (neither imports torch: well under a second); an argparse error inside a command
# and a refusal after the model is loaded (each imports torch: seconds, so left to the slow run).
SCRIPT_CASES = [
    ("no-such-command", "unknown command 'no-such-command'"),
    ("fit --records {t}/records --out {t}/locked", "{t}/locked: in use by train.py fit (pid {pid} "),
    pytest.param("record --model {t}/tiny --corpus {t}/corpus --out {t}/rec --context many",
                 "invalid int value: 'many'", marks=pytest.mark.slow),
    pytest.param("record --model {t}/tiny --corpus {t}/corpus --out {t}/rec --context 4096",
                 "--context 4096: 4,096 tokens, more than the 2,048 tokens", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("args,expected", SCRIPT_CASES, ids=["dispatch", "lock", "argparse", "after-loading"])
def test_the_script_itself(ws, args, expected):
    """`python train.py ...` as a user runs it: the script's exit status and stderr, no traceback."""
    fill = {"t": ws, "pid": os.getpid()}
    r = subprocess.run([sys.executable, "train.py", *args.format(**fill).split()], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_error_line(r.returncode, r.stderr, expected.format(**fill), start="train.py")
    assert_nothing_written(ws)


@pytest.mark.parametrize("content,problem", [
    (b'{"format": \xff garbage', "not valid JSON"), (b'{"format": "skipgate-drafter/', "not valid JSON"),
    (b"[1, 2]", "not a drafter description"), (b"", "not valid JSON")])
def test_a_garbled_drafter_json_is_named(tmp_path, content, problem):
    """Issue 13 case 15: whatever is wrong with drafter.json, the message names the file."""
    from gate.model.load import ArtifactError, read_meta

    (tmp_path / "drafter.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=f"^{tmp_path / 'drafter.json'}: {problem}"):
        read_meta(tmp_path)


def test_a_damaged_drafter_json_is_named(tmp_path):
    from gate.model.heads_drafter import FORMAT
    from gate.model.load import ArtifactError, read_meta

    (tmp_path / "drafter.json").write_text(json.dumps({"format": FORMAT, "gates": {}}))
    with pytest.raises(ArtifactError, match=f"^{tmp_path / 'drafter.json'}: damaged drafter description "
                                            r"\(missing big_model, predictor, primary_gate"):
        read_meta(tmp_path)


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    """Only the project's error types become an `error:` line: anything else is a bug and propagates."""
    import train

    monkeypatch.setattr("runtimes.loading.main", lambda argv: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(["models"])


def test_profile_json_dash_is_stdout(monkeypatch, capfd):
    """Issue 29 case 14: `train.py profile MODEL --json -` writes the JSON to stdout, as '-' means for infer.py
    (not a file named '-'); the tables then go to stderr. The measurement is stood in for (its own tests:
    test_cost.py)."""
    import train
    from gate.decode import cost

    class Fake:
        name = "fake.gguf"

    prof = cost.CostProfile({"file": "fake.gguf", "backend": "Fake", "threads": 1}, 10.0, [1, 2], [1.0, 1.5])
    monkeypatch.setattr(cost, "profiled_backends", lambda args: iter([("fake (as shipped)", Fake())]))
    monkeypatch.setattr(cost, "profile_key", lambda backend, hidden: prof.key)
    monkeypatch.setattr(cost, "load_or_measure", lambda *a, **k: prof)
    monkeypatch.chdir(ROOT)
    assert train.main(["profile", "fake.gguf", "--json", "-"]) == 0
    got = capfd.readouterr()
    assert json.loads(got.out) == {"fake (as shipped)": prof.to_dict()}
    assert "best ceiling" in got.err and not (ROOT / "-").exists()
