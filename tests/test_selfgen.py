"""`train.py selfgen`: the big model's own greedy continuations as a corpus (tiny random LLaMA)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from corpus_tools import selfgen as sg
from runtimes.hf import HFBackend

from helpers import TINY_TEXT, paragraph_corpus, save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """This module's own tiny model (seed 3), not conftest's."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


def write_corpus(path):
    return paragraph_corpus(path, ["train", "train", "val"],
                            lambda i: [TINY_TEXT[(i + k) % len(TINY_TEXT)] for k in range(12)])


def greedy_one_by_one(model, ids, n):
    """Reference: argmax of a full forward pass over the whole prefix, one token at a time."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_samples_are_the_models_greedy_text_and_resume(tiny_dir, tmp_path, monkeypatch):
    from runtimes.loading import load
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "sg"
    entries = sg.selfgen(str(tiny_dir), corpus, out, per_book=3, prompt_tokens=8, new_tokens=12, batch=2,
                         progress=False)
    assert [e["split"] for e in entries] == ["train"] * 6 + ["val"] * 3
    assert len({e["book_id"] for e in entries}) == 9
    lm = load(str(tiny_dir))
    book0 = (corpus / "text" / "b0.txt").read_text()
    prompts = sg.prompts_of_book(book0, lm.tokenizer, 3, 8)
    assert len(prompts) == 3 and all(len(p) == 8 for p in prompts)
    for k, p in enumerate(prompts):   # batched generation == one-token-at-a-time greedy, token for token
        want = lm.tokenizer.decode(greedy_one_by_one(lm.model, p, 12))
        assert (out / "text" / f"b0-g{k:03d}.txt").read_text() == want
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest == entries

    # a re-run generates nothing; a lost sample is generated again, identically
    lost = out / "text" / "b2-g001.txt"
    before = lost.read_text()
    lost.unlink()
    calls = []
    real = HFBackend.greedy
    monkeypatch.setattr(HFBackend, "greedy", lambda b, ps, n, e: calls.append(len(ps)) or real(b, ps, n, e))
    assert sg.selfgen(str(tiny_dir), corpus, out, per_book=3, prompt_tokens=8, new_tokens=12, batch=2,
                      progress=False) == entries
    assert calls == [1] and lost.read_text() == before


def test_split_prompts_interleave_books(tiny_dir, tmp_path):
    from runtimes.loading import load
    corpus = write_corpus(tmp_path / "corpus")
    tok = load(str(tiny_dir)).tokenizer
    ps = sg.split_prompts(corpus, tok, 4, 8, split="train")
    per_book = [sg.prompts_of_book((corpus / "text" / f"b{i}.txt").read_text(), tok, 2, 8) for i in (0, 1)]
    assert ps == [per_book[0][0], per_book[1][0], per_book[0][1], per_book[1][1]]
    with pytest.raises(ValueError, match="no books in split 'test'"):
        sg.split_prompts(corpus, tok, 2, 8, split="test")


def test_settings_and_folder_are_checked_before_generating(tiny_dir, tmp_path):
    """Prompt + new tokens beyond the model's context, an --out that is a file, and an --out another run holds
    are refused before any generation (and write nothing)."""
    from common.files import FolderLock, LockedError, OutputPathError
    from runtimes.info import ContextLengthError

    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(ContextLengthError, match=r"--prompt-tokens 48 \+ --new-tokens 2048: 2,096 tokens, more "
                                                 r"than the 2,048 tokens"):
        sg.selfgen(str(tiny_dir), corpus, tmp_path / "out", per_book=1, new_tokens=2048, progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="--out .*file: exists and is not a folder"):
        sg.selfgen(str(tiny_dir), corpus, tmp_path / "file", per_book=1, progress=False)
    with FolderLock(tmp_path / "out", "train.py selfgen"):
        with pytest.raises(LockedError, match=rf"in use by train.py selfgen \(pid {os.getpid()} "):
            sg.selfgen(str(tiny_dir), corpus, tmp_path / "out", per_book=1, progress=False)
    with pytest.raises(ValueError, match="--per-book 0: must be at least 1"):
        sg.selfgen(str(tiny_dir), corpus, tmp_path / "out", per_book=0, progress=False)


def test_prompts_file_answers_each_instruction_with_the_models_greedy_text(tiny_dir, tmp_path):
    """--prompts: prompts of different lengths in one batch (left-padded) get the same greedy answers as one by
    one; the sample text is the instruction, a blank line and the answer; splits come from a hash of the line."""
    from runtimes.loading import load

    lines = ["Explain how volcanoes form.", "Write a poem about the sea and the long summer evenings.", "Why?"]
    (tmp_path / "p.txt").write_text("# a comment\n\n" + "\n".join(lines) + "\n")
    entries = sg.selfgen(str(tiny_dir), None, tmp_path / "out", prompts=tmp_path / "p.txt", new_tokens=6, batch=3,
                         progress=False)
    assert len(entries) == 3 and {e["split"] for e in entries} <= {"train", "val"}
    lm = load(str(tiny_dir))
    for line, e in zip(lines, entries):
        ids = sg.encode_text(lm.tokenizer, line + "\n\n")
        want = greedy_one_by_one(lm.model, ids, 6)[len(ids):]
        text = (tmp_path / "out" / "text" / f"{e['book_id']}.txt").read_text()
        assert text == line + "\n\n" + lm.tokenizer.decode(want)
    with pytest.raises(ValueError, match="not both"):
        sg.selfgen(str(tiny_dir), tmp_path, tmp_path / "o2", prompts=tmp_path / "p.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(sg.CorpusError, match="no prompts"):
        sg.selfgen(str(tiny_dir), None, tmp_path / "o3", prompts=tmp_path / "empty.txt")
