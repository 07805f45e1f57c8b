"""Tokenizer inventory (the word-completion idea): which tokens are punctuation, which continue a word, how often.

`python train.py inventory --model M --corpus DIR [--out DIR] [--split train]` tokenizes the corpus books with
the model's tokenizer and writes `inventory.json` (per-token kind and corpus count) and `inventory.md` (the
findings: the punctuation and word-continuation tokens, how often they occur, what share of the text they are).

Static token kinds, one per token id (`kind_of_text`): punct / suffix / word / space / other. Positional classes
are corpus_tools.tokens' CLASSES; this module adds their array form (`class_tables` once per tokenizer, then
`token_class_from_tables` on plain arrays) so the gate can classify at decode time without the tokenizer.
`restricted_vocab()` is what the word-completion head uses to pick its output vocabulary (see gate/model/heads.py).
The kinds and classes defined: docs/corpus.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

from common.errors import ProjectError, one_line
from common.files import check_output_dir, write_text
from corpus_tools import tokens
from corpus_tools.corpus import CorpusError, load_manifest, read_book
from corpus_tools.tokens import CLASSES, CONTINUATION, OTHER, WORD_START
from runtimes.info import tokenizer_fingerprint
from runtimes.loading import load_tokenizer

KINDS = ("punct", "suffix", "word", "space", "other")
PUNCT, SUFFIX, WORD, SPACE, OTHER_KIND = range(5)
APOSTROPHES = ("'", "\u2019")


def _is_punct_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def kind_of_text(text: str, special: bool = False) -> int:
    """Static kind of a token from its decoded text (the kinds: docs/corpus.md)."""
    if special or not text or "\ufffd" in text:
        return OTHER_KIND
    core = text.strip()
    if not core:
        return SPACE
    lead_space = text[0].isspace()
    if all(_is_punct_char(c) for c in core):
        return PUNCT
    if core[0].isalpha():
        return WORD if lead_space else SUFFIX
    if (not lead_space and len(core) > 1 and core[0] in APOSTROPHES and core[1:].isalpha()):
        return SUFFIX
    return OTHER_KIND


def token_table(tokenizer) -> dict[str, np.ndarray]:
    """Per-token-id arrays over the whole vocabulary: `kind` (int8, KINDS), `texts`, and the shared class
    tables `cls` (int8 index into CLASSES, without context) and `ends_alnum` (see `class_tables`)."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kind = np.array([kind_of_text(t, i in special) for i, t in enumerate(texts)], dtype=np.int8)
    cls, ends_alnum = class_tables(tokenizer)
    return {"kind": kind, "cls": cls, "ends_alnum": ends_alnum, "texts": np.array(texts, dtype=object)}


def class_tables(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(context-free class per id, ends-with-letter-or-digit per id), exactly as corpus_tools.tokens uses them."""
    ids = np.arange(len(tokenizer))
    names = tokens.token_class_from_tokenizer(tokenizer, ids)
    cls = np.array([CLASSES.index(c) for c in names], dtype=np.int8)
    # ends_alnum: the ids after which a continuation-class token stays a continuation
    prev_probe = tokens.token_class_from_tokenizer(tokenizer, np.full(len(ids), _a_continuation(cls)), ids)
    ends_alnum = prev_probe == CLASSES[CONTINUATION]
    return cls, ends_alnum


def _a_continuation(cls: np.ndarray) -> int:
    c = np.flatnonzero(cls == CONTINUATION)
    if not len(c):
        raise ValueError("tokenizer has no word-continuation tokens; cannot classify positions")
    return int(c[0])


def token_class_from_tables(prev_ids, ids, cls: np.ndarray, ends_alnum: np.ndarray) -> np.ndarray:
    """Positional class (CLASSES index, int8) of token `ids` after token `prev_ids` (arrays or ints; prev < 0
    or outside the table means no glueing token). Same rule as corpus_tools.tokens.token_class_from_tokenizer, on arrays."""
    ids = np.asarray(ids, dtype=np.int64)
    prev = np.asarray(prev_ids, dtype=np.int64)
    known = (ids >= 0) & (ids < len(cls))
    out = np.where(known, cls[np.where(known, ids, 0)], OTHER).astype(np.int8)
    pk = (prev >= 0) & (prev < len(ends_alnum))
    glued = pk & ends_alnum[np.where(pk, prev, 0)]
    out[(out == CONTINUATION) & ~glued] = WORD_START
    return out


def restricted_vocab(freq: np.ndarray, kind: np.ndarray, size: int,
                     always_kinds: tuple[int, ...] = (PUNCT,), min_count: int = 1) -> np.ndarray:
    """The output vocabulary of a restricted head: sorted token ids, at most `size` of them.

    First every token of `always_kinds` (punctuation by default) seen at least `min_count` times, then the
    most frequent remaining tokens by `freq` (ties broken by id, so the choice is deterministic). `freq` is
    what the head should predict: the fit uses the big model's argmax counts on the train split, plus the
    text counts as a tie-breaker. Tokens never seen are never chosen.
    """
    freq = np.asarray(freq, dtype=np.float64)
    if freq.shape != kind.shape:
        raise ValueError(f"freq has {freq.shape[0]} entries but the vocabulary has {kind.shape[0]}")
    seen = freq >= max(min_count, 1e-12)
    must = np.flatnonzero(np.isin(kind, always_kinds) & seen)
    order = np.lexsort((np.arange(freq.size), -freq))         # by frequency desc, then id
    must = must[np.argsort(-freq[must], kind="stable")][:size]
    chosen = list(must)
    taken = set(chosen)
    for i in order:
        if len(chosen) >= size or not seen[i]:
            break
        if i not in taken:
            chosen.append(int(i))
            taken.add(int(i))
    return np.array(sorted(chosen), dtype=np.int64)


# ---------------------------------------------------------------------------------------------- corpus side
def read_corpus(corpus: Path, split: str | None = None) -> list[tuple[str, str]]:
    """(book_id, text) for the books of a corpus folder (manifest.jsonl + text/<book_id>.txt)."""
    rows = [r for r in load_manifest(corpus) if not split or r.get("split") == split]
    if not rows:
        raise CorpusError(f"{corpus / 'manifest.jsonl'}: no books" + (f" in split {split!r}" if split else ""))
    return [(r["book_id"], read_book(corpus, r["book_id"])) for r in rows]


def count_tokens(tokenizer, books: list[tuple[str, str]], cls, ends_alnum):
    """Token counts over the vocabulary, counts per positional class, and per-token counts of the positions
    where the token is a word continuation."""
    n = len(tokenizer)
    counts = np.zeros(n, dtype=np.int64)
    cont_counts = np.zeros(n, dtype=np.int64)
    cls_counts = np.zeros(len(CLASSES), dtype=np.int64)
    for _, text in books:
        ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)
        if ids.size == 0:
            continue
        counts += np.bincount(ids, minlength=n)[:n]
        prev = np.concatenate([[-1], ids[:-1]])
        c = token_class_from_tables(prev, ids, cls, ends_alnum)
        cls_counts += np.bincount(c, minlength=len(CLASSES))
        cont_counts += np.bincount(ids[c == CONTINUATION], minlength=n)[:n]
    return counts, cls_counts, cont_counts


def _md_token(text: str) -> str:
    """A token's text inside a markdown table code span: whitespace made visible, pipes escaped."""
    return (text.replace("\n", "\\n").replace("\t", "\\t").replace("|", "\\|").replace("`", "'")
            .replace(" ", "\u2423"))


def build_inventory(tokenizer, books, top: int = 40) -> tuple[dict, str]:
    tab = token_table(tokenizer)
    kind, texts = tab["kind"], tab["texts"]
    counts, cls_counts, cont_counts = count_tokens(tokenizer, books, tab["cls"], tab["ends_alnum"])
    total = int(counts.sum())
    inv = {
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": int(len(tokenizer)),
        "books": [b for b, _ in books],
        "corpus_tokens": total,
        "kinds": {k: int((kind == i).sum()) for i, k in enumerate(KINDS)},
        "kind_share_of_corpus": {k: float(counts[kind == i].sum() / max(total, 1)) for i, k in enumerate(KINDS)},
        "class_share_of_corpus": {c: float(cls_counts[i] / max(total, 1)) for i, c in enumerate(CLASSES)},
        "tokens": [{"id": int(i), "text": texts[i], "kind": KINDS[kind[i]], "count": int(counts[i]),
                    "as_continuation": int(cont_counts[i])} for i in np.flatnonzero(counts)],
    }
    # markdown findings
    lines = [f"# Tokenizer inventory ({len(books)} books, {total:,} tokens)", "",
             f"Tokenizer fingerprint `{inv['fingerprint']}`, vocabulary {inv['vocab_size']:,}.", "",
             "| kind | tokens in vocabulary | used in corpus | share of corpus tokens |", "|---|---|---|---|"]
    for i, k in enumerate(KINDS):
        lines.append(f"| {k} | {int((kind == i).sum()):,} | {int(((kind == i) & (counts > 0)).sum()):,} | "
                     f"{inv['kind_share_of_corpus'][k]:.1%} |")
    lines += ["", "Positional classes (corpus_tools.tokens: a marker-less piece glued to a letter or digit continues "
              "a word):", "",
              "| class | share of corpus tokens |", "|---|---|"]
    lines += [f"| {c} | {inv['class_share_of_corpus'][c]:.1%} |" for c in CLASSES]
    for title, cnt, sel in (("punctuation tokens", counts, kind == PUNCT),
                            ("suffix-kind tokens (no leading space; a word start after a quote or newline)", counts,
                             kind == SUFFIX),
                            ("word-continuation tokens, counted where they continue a word", cont_counts,
                             cont_counts > 0)):
        ids = np.flatnonzero(sel & (cnt > 0))
        ids = ids[np.argsort(-cnt[ids], kind="stable")][:top]
        lines += ["", f"## Most frequent {title}", "", "| id | token | count | share of corpus |",
                  "|---|---|---|---|"]
        lines += [f"| {j} | `{_md_token(texts[j])}` | {cnt[j]:,} | {cnt[j] / max(total, 1):.2%} |" for j in ids]
    return inv, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """`python train.py inventory`: punctuation and word-continuation tokens of a tokenizer, counted in a corpus."""
    ap = argparse.ArgumentParser(prog="train.py inventory", description=main.__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="model whose tokenizer to inventory")
    ap.add_argument("--corpus", required=True, help="corpus folder (manifest.jsonl + text/)")
    ap.add_argument("--split", default=None, help="count only the books of this split (default: all)")
    ap.add_argument("--out", default=None, help="output folder (default: CORPUS/../inventory)")
    ap.add_argument("--top", type=int, default=40, help="tokens listed per kind in inventory.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    corpus = Path(args.corpus)
    out = Path(args.out) if args.out else corpus.resolve().parent / "inventory"
    try:
        check_output_dir(out, "--out")
        books = read_corpus(corpus, args.split)
        tok = load_tokenizer(args.model)
    except ProjectError as e:
        print(f"train.py inventory: error: {one_line(e)}", file=sys.stderr)
        return 2
    inv, md = build_inventory(tok, books, args.top)
    inv["model"] = args.model
    write_text(out / "inventory.json", json.dumps(inv, ensure_ascii=False))
    write_text(out / "inventory.md", md)
    print(md)
    print(f"[inventory] wrote {out}/inventory.json and inventory.md in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
