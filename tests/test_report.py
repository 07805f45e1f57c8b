"""Token classes (corpus_tools/tokens.py) and the seed-003 findings report (corpus_tools/report.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from corpus_tools import record as rec_mod
from corpus_tools import report
from corpus_tools.tokens import token_class_from_tokenizer

from helpers import TINY, book_text, save_model, write_corpus


def classes_of(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    return [(tok.decode([i]), c) for i, c in zip(ids, token_class_from_tokenizer(tok, ids, [-1] + ids[:-1]))]


def test_token_classes_byte_level_bpe(smollm2):
    got = dict(classes_of(smollm2.tokenizer, "\u201cMy dear Mr. Bennet,\u201d said Elizabeth\u2019s aunt.\n\nIt"))
    assert got[" dear"] == "word_start" and got[" Benn"] == "word_start" and got["et"] == "continuation"
    assert got["."] == "punct" and got[",\u201d"] == "punct" and got["\n"] == "other"
    assert got["My"] == "word_start" and got["It"] == "word_start"  # after a quote / a newline: no 'Ġ' marker
    # without the previous token a marker-less word counts as a continuation
    assert token_class_from_tokenizer(smollm2.tokenizer, smollm2.tokenizer("It").input_ids).tolist() == ["continuation"]


def test_token_classes_sentencepiece_marker():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    raw.train_from_iterator(["the cat sat on the mat, the end."] * 3,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    ids = [tok.convert_tokens_to_ids(t) for t in ("\u2581the", "at", ",", "<unk>")]
    assert token_class_from_tokenizer(tok, ids).tolist() == ["word_start", "continuation", "punct", "other"]
    assert token_class_from_tokenizer(tok, [10 ** 6]).tolist() == ["other"]  # padded output rows beyond the vocabulary


def test_skips_with_a_limit_stop_at_book_ends():
    sure = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    book = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    assert report.skipped_with_limit(sure, book, 1) == 2 + 1 + 2  # runs 3 | 1 (book 0) | 3 (book 1)
    assert report.skipped_with_limit(sure, book, 100) == sure.sum()


def test_report_writes_markdown_and_plots(tiny_llama, tiny_tokenizer, tmp_path):
    model = save_model(tmp_path / "tiny", tiny_llama, tiny_tokenizer)
    corpus = write_corpus(tmp_path / "corpus", [("a", "train", book_text(0, 2)), ("b", "val", book_text(1, 1))])
    rec_mod.record([model], corpus, tmp_path / "run" / "records", **TINY)
    assert report.main(["--records", str(tmp_path / "run" / "records"), "--short-sample", "40",
                        "--short-context", "8"]) == 0
    out = tmp_path / "run" / "report"
    md = (out / "report.md").read_text()
    for heading in ("How sure is the model", "perfect \"skip when sure\" rule", "What the sure positions are",
                    "Is the current sentence enough? (last 8 tokens", "## Answers"):
        assert heading in md
    r = json.loads((out / "report.json").read_text())
    assert r["short"]["n"] == 40 and [row["threshold"] for row in r["sure"]] == [0.95, 0.99, 0.999]
    for png in ("pmax_hist.png", "coverage.png", "classes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_missing_records(tmp_path, capsys):
    assert report.main(["--records", str(tmp_path / "nothing")]) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("k", [1, 16])
def test_short_context_windows_end_at_the_position(k):
    a = {"pos": np.r_[np.arange(20), np.arange(5)], "book": np.r_[np.zeros(20, int), np.ones(5, int)],
         "token": np.arange(25, dtype=np.int32), "target": np.arange(1, 26, dtype=np.int32)}

    class Echo:  # next token = last input token + 1, with certainty
        device = "cpu"

        def __call__(self, x, logits_to_keep=1):
            logits = torch.full((x.shape[0], 1, 64), -1e9)
            logits[torch.arange(x.shape[0]), 0, x[:, -1] + 1] = 0
            return SimpleNamespace(logits=logits)

    a["p_max"] = np.where(np.arange(25) % 3 == 0, 0.999, 0.5)
    idx, weight = report.sample_positions(a, k, 10, 0.95, seed=0)
    assert len(idx) == min(10, (a["pos"] >= k - 1).sum()) and (a["pos"][idx] >= k - 1).all()
    assert np.isclose(weight.sum(), (a["pos"] >= k - 1).sum())  # weights restore the population size
    s = report.short_context(SimpleNamespace(model=Echo()), a, idx, k)
    assert (s["argmax"] == a["target"][idx]).all() and (s["p_max"] == 1).all()
