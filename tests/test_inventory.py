"""Tokenizer inventory: token kinds, positional classes, restricted vocabulary, the CLI on a tiny corpus."""
import json

import numpy as np
import pytest

from corpus_tools import inventory as inv
from corpus_tools.corpus import CorpusError
from corpus_tools.tokens import encode_text

PLAIN = "It is a truth universally acknowledged, that a single man\n\n\u201cMy dear Mr. Bennet,\u201d"


@pytest.mark.parametrize("text,kind", [
    (",", inv.PUNCT), (",\u201d", inv.PUNCT), (" \u201c", inv.PUNCT), ("--", inv.PUNCT), (".", inv.PUNCT),
    ("et", inv.SUFFIX), ("'s", inv.SUFFIX), ("\u2019ll", inv.SUFFIX), (" dear", inv.WORD), ("My", inv.SUFFIX),
    ("\n", inv.SPACE), (" ", inv.SPACE), ("1", inv.OTHER_KIND), ("\ufffd", inv.OTHER_KIND), ("", inv.OTHER_KIND),
])
def test_kind_of_text(text, kind):
    assert inv.kind_of_text(text) == kind


def test_special_tokens_are_other():
    assert inv.kind_of_text("<eos>", special=True) == inv.OTHER_KIND


def test_positional_class_matches_shared_definition(smollm2):
    """The array form equals corpus_tools.tokens.token_class_from_tokenizer on real text, context included."""
    from corpus_tools import tokens
    tok = smollm2.tokenizer
    text = ("\u201cMy dear Mr. Bennet,\u201d said his lady's friend in 1812 --\nNetherfield is let at last?\u201d"
            " \u2019Tis\tdone; 3.5%")
    ids = np.asarray(tok(text, add_special_tokens=False).input_ids)
    prev = np.r_[-1, ids[:-1]]
    cls, ends = inv.class_tables(tok)
    mine = [inv.CLASSES[c] for c in inv.token_class_from_tables(prev, ids, cls, ends)]
    assert mine == list(tokens.token_class_from_tokenizer(tok, ids, prev))
    got = dict(zip((tok.decode([i]) for i in ids), mine))
    assert got["et"] == "continuation" and got[",\u201d"] == "punct" and got[" dear"] == "word_start"


def test_restricted_vocab_keeps_punctuation_then_frequency():
    kind = np.array([inv.PUNCT, inv.WORD, inv.WORD, inv.SUFFIX, inv.PUNCT, inv.WORD], dtype=np.int8)
    freq = np.array([1, 50, 40, 30, 0, 20], dtype=float)
    r = inv.restricted_vocab(freq, kind, size=3)
    # the seen punctuation (id 0) first, then the most frequent others; unseen punct (id 4) is never chosen
    assert r.tolist() == [0, 1, 2]
    assert inv.restricted_vocab(freq, kind, size=10).tolist() == [0, 1, 2, 3, 5]
    with pytest.raises(ValueError):
        inv.restricted_vocab(freq[:3], kind, 2)


def test_inventory_on_real_tokenizer(smollm2, tmp_path, capsys):
    """Real SmolLM2 tokenizer: the seed-003 categories exist and the CLI writes JSON + markdown."""
    tok = smollm2.tokenizer
    tab = inv.token_table(tok)
    kinds = {k: int((tab["kind"] == i).sum()) for i, k in enumerate(inv.KINDS)}
    assert kinds["punct"] > 300 and kinds["suffix"] > 5000 and kinds["word"] > 10000
    ids = tok(" Bennet,\u201d said", add_special_tokens=False).input_ids
    cls = inv.token_class_from_tables(np.r_[-1, ids[:-1]], ids, tab["cls"], tab["ends_alnum"])
    texts = [tok.decode([i]) for i in ids]
    assert dict(zip(texts, (inv.CLASSES[c] for c in cls)))["et"] == "continuation"

    corpus = tmp_path / "corpus"
    (corpus / "text").mkdir(parents=True)
    books = {"a": "It is a truth universally acknowledged, that a single man.\n\nMr. Bennet replied.",
             "b": "\u201cMy dear Mr. Bennet,\u201d said his lady."}
    with open(corpus / "manifest.jsonl", "w") as f:
        for b, text in books.items():
            (corpus / "text" / f"{b}.txt").write_text(text)
            f.write(json.dumps({"book_id": b, "split": "train" if b == "a" else "test"}) + "\n")
    out = tmp_path / "inv"
    from runtimes.sources import resolve
    assert inv.main(["--model", str(resolve("smollm2-135m")), "--corpus", str(corpus), "--out", str(out)]) == 0
    data = json.loads((out / "inventory.json").read_text())
    assert data["corpus_tokens"] == sum(len(tok(t, add_special_tokens=False).input_ids) for t in books.values())
    by_text = {t["text"]: t for t in data["tokens"]}
    assert by_text[","]["kind"] == "punct" and by_text[","]["count"] >= 1
    assert by_text["et"]["kind"] == "suffix"
    assert by_text["et"]["as_continuation"] == by_text["et"]["count"] >= 1
    md = (out / "inventory.md").read_text()
    assert "Most frequent punctuation tokens" in md and "word-continuation tokens, counted where" in md
    assert 0 < data["class_share_of_corpus"]["punct"] < 1


def test_inventory_bad_corpus(tmp_path):
    with pytest.raises(CorpusError, match="no such corpus folder"):
        inv.read_corpus(tmp_path / "missing")
    with pytest.raises(CorpusError, match="manifest"):
        inv.read_corpus(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"book_id": "x", "split": "train"}) + "\n")
    with pytest.raises(CorpusError, match="x.txt"):
        inv.read_corpus(tmp_path)
    with pytest.raises(CorpusError, match="no books in split 'test'"):
        inv.read_corpus(tmp_path, "test")


def test_inventory_cli_missing_corpus_is_one_error_line(tmp_path, capsys):
    """Issue 13 case 14: `train.py inventory --corpus MISSING` was a FileNotFoundError traceback."""
    assert inv.main(["--corpus", str(tmp_path / "MISSING")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"train.py inventory: error: {tmp_path / 'MISSING'}: no such corpus folder (build one with " \
                  "`python train.py corpus`)"


def test_encode_text_keeps_typed_special_tokens_literal(smollm2):
    """Issue 13 case 3's rule: "<|endoftext|>" typed in a text is text, not control token 0."""
    tok = smollm2.tokenizer
    text = "<|im_start|>user\nHi<|im_end|><|endoftext|>"
    assert tok(text).input_ids == [1, 4093, 198, 26843, 2, 0]  # what a plain call does: control tokens
    ids = encode_text(tok, text)
    assert not set(ids) & set(tok.all_special_ids) and len(ids) > 6
    assert tok.decode(ids) == text
    assert encode_text(tok, PLAIN) == tok(PLAIN).input_ids  # ordinary text: the same ids as before


def test_encode_text_still_adds_the_tokenizers_own_framing():
    """A BOS-adding tokenizer keeps its BOS (records and decoding add it as before); only typed specials split."""
    from tokenizers import processors

    from helpers import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("<eos>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", eos)])
    ids = encode_text(tok, "a<eos>b")
    assert ids[0] == eos and eos not in ids[1:]
    assert encode_text(tok, "a<eos>b", add_special_tokens=False) == ids[1:]
