"""Recording per-token outputs (corpus_tools/record.py) and reading them back (corpus_tools/records.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.files import OutputPathError
from corpus_tools import record as rec_mod
from corpus_tools.records import RecordsError, open_records
from runtimes.info import ContextLengthError, TokenizerMismatch
from runtimes.loading import load

from helpers import (
    TINY,
    TINY_TEXT,
    book_text,
    call_main,
    hold_lock,
    kill,
    make_tiny_llama,
    make_tiny_tokenizer,
    save_model,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), [
        ("book-a", "train", book_text(0, 4)), ("book-b", "train", book_text(1, 2)),
        ("book-c", "val", book_text(2, 1)), ("tiny-d", "test", "Yes.")])


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory, tiny_dir, corpus):
    out = tmp_path_factory.mktemp("rec") / "records"
    rec_mod.record([tiny_dir], corpus, out, **TINY)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_windows_record_every_position_once_with_enough_context():
    for n_pos, context, stride in [(0, 8, 4), (5, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 5), (100, 16, 16)]:
        wins = rec_mod.windows(n_pos, context, stride)
        recorded = np.concatenate([np.arange(w.first, w.end) for w in wins]) if wins else np.array([])
        assert recorded.tolist() == list(range(n_pos))
        for w in wins:
            assert w.end - w.start <= context and w.start <= w.first
            assert w.start == 0 or w.first - w.start >= context - stride


def test_records_match_a_direct_forward_pass(tiny_records, tiny_dir, corpus):
    lm = load(tiny_dir, "float32")
    rec = open_records(tiny_records)
    name = rec.models[0]
    assert rec.splits == ["train", "val", "test"] and rec.books("train") == ["book-a", "book-b"]
    assert rec.meta["models"][0]["layers"] == [1, 2]  # middle and last of a 2-layer model
    a = rec.load("train")
    assert a["token"].dtype == np.int32 and a[f"{name}/hidden/2"].dtype == np.float16
    assert a[f"{name}/topk_ids"].shape == (len(a["token"]), 8)
    for b, book_id in enumerate(rec.books("train")):
        ids = lm.tokenizer((corpus / "text" / f"{book_id}.txt").read_text()).input_ids
        sel = a["book"] == b
        assert a["pos"][sel].tolist() == list(range(len(ids) - 1))
        assert a["token"][sel].tolist() == ids[:-1] and a["target"][sel].tolist() == ids[1:]
        for w in rec_mod.windows(len(ids) - 1, TINY["context"], TINY["stride"]):
            with torch.no_grad():
                out = lm.model(torch.tensor([ids[w.start:w.end]]), output_hidden_states=True)
            lg = out.logits[0, w.first - w.start:].float()
            p = torch.softmax(lg, -1)
            rows = np.flatnonzero(sel)[w.first:w.end]
            assert a[f"{name}/argmax"][rows].tolist() == lg.argmax(-1).tolist()
            tgt = torch.tensor(ids[w.first + 1:w.end + 1])
            np.testing.assert_allclose(a[f"{name}/p_target"][rows], p.gather(1, tgt[:, None])[:, 0], atol=1e-5)
            np.testing.assert_allclose(a[f"{name}/p_max"][rows], p.max(-1).values, atol=1e-5)
            np.testing.assert_allclose(a[f"{name}/entropy"][rows], torch.special.entr(p).sum(-1), atol=1e-4)
            np.testing.assert_allclose(a[f"{name}/entropy_norm"][rows] * np.log(300), a[f"{name}/entropy"][rows],
                                       rtol=1e-5)
            np.testing.assert_allclose(a[f"{name}/topk_p"][rows], p.topk(8, -1).values, atol=1e-5)
            h = out.hidden_states[2][0, w.first - w.start:]
            np.testing.assert_allclose(a[f"{name}/hidden/2"][rows].astype(np.float32), h, atol=2e-3, rtol=2e-3)


@pytest.mark.real_model
def test_smollm2_records_match_a_direct_forward_pass(tmp_path):
    """float32: on AVX2-only CPUs bf16 matmuls are several times slower (see the record module docstring)."""
    smollm2 = load("smollm2-135m", "float32")
    text = "\n\n".join(TINY_TEXT * 3)
    corpus = write_corpus(tmp_path / "corpus", [("pride", "train", text)])
    rec_mod.record(["smollm2-135m"], corpus, tmp_path / "rec", context=128, stride=96, batch_size=2,
                   max_tokens_per_book=300, dtype="float32", progress=False)
    a = open_records(tmp_path / "rec").load("train")
    ids = smollm2.tokenizer(text).input_ids
    assert a["token"].tolist() == ids[:300] and a["target"].tolist() == ids[1:301]
    for w in rec_mod.windows(300, 128, 96):
        with torch.no_grad():
            out = smollm2.model(torch.tensor([ids[w.start:w.end]]), output_hidden_states=True)
        lg = out.logits[0, w.first - w.start:].float()
        p = torch.softmax(lg, -1)
        sl = slice(w.first, w.end)
        assert a["smollm2-135m/argmax"][sl].tolist() == lg.argmax(-1).tolist()
        np.testing.assert_allclose(a["smollm2-135m/p_max"][sl], p.max(-1).values, atol=1e-4)
        tgt = torch.tensor(ids[w.first + 1:w.end + 1])
        np.testing.assert_allclose(a["smollm2-135m/p_target"][sl], p.gather(1, tgt[:, None])[:, 0], atol=1e-4)
        h = out.hidden_states[15][0, w.first - w.start:]
        np.testing.assert_allclose(a["smollm2-135m/hidden/15"][sl].astype(np.float32), h, rtol=2e-3, atol=2e-2)
    assert a["smollm2-135m/p_max"].mean() > 0.3  # real text, real model: often confident


def test_resume_after_a_crash_gives_identical_files(tiny_dir, corpus, tiny_records, tmp_path, monkeypatch):
    real_save, calls = np.save, []

    def crash_on_the_30th_file(path, arr, *a, **k):  # mid-way through the third shard
        calls.append(path)
        if len(calls) == 30:
            raise KeyboardInterrupt("simulated kill")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(rec_mod.np, "save", crash_on_the_30th_file)
    with pytest.raises(KeyboardInterrupt):
        rec_mod.record([tiny_dir], corpus, tmp_path / "rec", **TINY)
    monkeypatch.setattr(rec_mod.np, "save", real_save)
    assert not (tmp_path / "rec" / "manifest.json").exists()
    book = tmp_path / "rec" / "train" / "book-a"
    assert not list(book.glob(".*.tmp"))  # an interrupted shard removes its temporary folder
    (book / ".00002.999999-dead.tmp").mkdir()  # what a SIGKILL would leave: removed on resume
    with pytest.raises(RecordsError, match="incomplete"):
        open_records(tmp_path / "rec")
    rec_mod.record([tiny_dir], corpus, tmp_path / "rec", **TINY)
    assert not list(book.glob(".*.tmp"))
    assert files_of(tmp_path / "rec") == files_of(tiny_records)


def test_other_settings_are_refused(tiny_dir, corpus, tiny_records):
    with pytest.raises(RecordsError, match="stride: 48 -> 32"):
        rec_mod.record([tiny_dir], corpus, tiny_records, **{**TINY, "stride": 32})


def test_a_corrupt_shard_is_named(tiny_dir, corpus, tmp_path):
    out = tmp_path / "rec"
    rec_mod.record([tiny_dir], corpus, out, **TINY)
    victim = out / "train" / "book-b" / "00001" / "m0" / "p_max.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    rec = open_records(out)
    rec.load("val")  # other splits still load
    with pytest.raises(RecordsError, match="train/book-b/00001"):
        rec.load("train", fields=["p_max"])
    rec.load("train", fields=["p_max"], verify=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(RecordsError, match="manifest.json"):
        open_records(out)


def test_models_with_other_tokenizers_are_refused(tiny_dir, corpus, tmp_path):
    other_tok = make_tiny_tokenizer(vocab_size=280)
    other = save_model(tmp_path / "other", make_tiny_llama(len(other_tok)), other_tok)
    with pytest.raises(TokenizerMismatch):
        rec_mod.record([tiny_dir, other], corpus, tmp_path / "rec", **TINY)
    assert not (tmp_path / "rec").exists()  # refused before any work
    assert rec_mod.main(["--model", tiny_dir, "--model", other, "--corpus", str(corpus),
                         "--out", str(tmp_path / "rec"), "--dtype", "float32", "--no-progress"]) == 2


def test_models_sharing_a_tokenizer_are_aligned(tiny_llama_pair, tiny_tokenizer, corpus, tmp_path):
    big, small = (save_model(tmp_path / n, m, tiny_tokenizer) for n, m in zip(("big", "small"), tiny_llama_pair))
    rec_mod.record([big, small], corpus, tmp_path / "rec", splits=["val"], layers=["last"], **TINY)
    rec = open_records(tmp_path / "rec")
    assert rec.models == [big, small] and rec.splits == ["val"]
    a = rec.load("val", fields=["token", "argmax", "hidden/3", "hidden/1"])
    assert a[f"{big}/hidden/3"].shape == (len(a["token"]), 64) and a[f"{small}/hidden/1"].shape[1] == 32
    ids = torch.tensor(a["token"][:TINY["context"]].astype(np.int64))[None]
    for name, model in zip((big, small), tiny_llama_pair):
        with torch.no_grad():
            assert a[f"{name}/argmax"][:TINY["context"]].tolist() == model(ids).logits[0].argmax(-1).tolist()
    assert set(rec.load("val", models=[small])) == {"token", "target", "pos", "book"} | {
        f"{small}/{f}" for f in rec.fields(small)}


def test_int8_hidden_states_are_smaller_and_close(tiny_dir, corpus, tiny_records, tmp_path):
    rec_mod.record([tiny_dir], corpus, tmp_path / "rec", splits=["train"], hidden_dtype="int8", **TINY)
    name = tiny_dir
    full = open_records(tiny_records).load("train", fields=["hidden/1"])[f"{name}/hidden/1"].astype(np.float32)
    q = open_records(tmp_path / "rec").load("train", fields=["hidden/1"])[f"{name}/hidden/1"].astype(np.float32)
    rel = np.linalg.norm(q - full, axis=1) / np.linalg.norm(full, axis=1)
    assert np.median(rel) < 0.03
    size = lambda p: sum(f.stat().st_size for f in p.rglob("hidden.1*.npy"))  # noqa: E731
    assert size(tmp_path / "rec") < 0.6 * size(tiny_records / "train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow   # two fresh processes importing torch, accelerate and gloo: half a minute on 2 cores
def test_two_processes_share_the_books(tiny_dir, corpus, tiny_records, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each book once, one manifest, same records."""
    out = tmp_path / "rec"
    args = ["--model", tiny_dir, "--dtype", "float32", "--corpus", str(corpus), "--out", str(out),
            "--context", "64", "--stride", "48", "--batch-size", "2", "--shard-tokens", "200", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                        "2", "--main_process_port", str(_free_port()), "train.py", "record", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    done_by = {json.loads(f.read_text())["process"] for f in out.glob("*/*/book.json")}
    assert done_by == {0, 1}
    one, two = open_records(tiny_records), open_records(out)
    assert two.meta["books"] == one.meta["books"] and two.meta["positions"] == one.meta["positions"]
    for split in one.splits:
        a, b = one.load(split), two.load(split)
        for k in a:
            if a[k].dtype.kind in "iu":
                assert np.array_equal(a[k], b[k]), k
            else:
                np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=2e-3, err_msg=k)


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        rec_mod.main(["--help"])
    assert e.value.code == 0


def test_output_path_is_checked_before_any_work(corpus, tmp_path):
    """Issue 13 case 11: `record --out FILE` was a FileExistsError after loading the models; now it is refused
    before anything else (the model name here is not even looked at)."""
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "records"):
        with pytest.raises(OutputPathError, match="--out .*file"):
            rec_mod.record(["no-such-model"], corpus, out, **TINY)
    assert (tmp_path / "file").read_text() == "x"


def test_context_beyond_the_model_is_refused_with_the_numbers(tiny_dir, corpus, tmp_path):
    with pytest.raises(ContextLengthError, match=r"--context 4096: 4,096 tokens, more than the 2,048 tokens"):
        rec_mod.record([tiny_dir], corpus, tmp_path / "rec", **{**TINY, "context": 4096})
    assert not (tmp_path / "rec").exists()


def test_a_second_writer_refuses_at_once_and_a_dead_ones_lock_does_not_block(tiny_dir, corpus, tiny_records,
                                                                             tmp_path):
    """Issue 13 case 12: while another process holds the records folder, `train.py record` into it (its main, run
    here) exits 2 at once naming that process; once it is dead (SIGKILL: its lock file stays), the run goes
    through."""
    import train

    out = tmp_path / "rec"
    args = ["record", "--model", tiny_dir, "--corpus", corpus, "--out", out, "--context", "64", "--stride", "48",
            "--batch-size", "2", "--shard-tokens", "200", "--no-progress"]
    holder = hold_lock(out, "train.py record")
    try:
        rc, err = call_main(train.main, args)
    finally:
        kill(holder)
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"train.py record: error: {out}: in use by train.py record (pid {holder.pid} on {socket.gethostname()}); "
        f"wait for it to finish (its lock: {out / '.lock'})")
    assert os.listdir(out) == [".lock"]  # nothing written; the dead holder's lock file is left
    rc, err = call_main(train.main, args)
    assert rc == 0, err[-2000:]
    assert open_records(out).meta["positions"] == open_records(tiny_records).meta["positions"]
    assert not (out / ".lock").exists()
