"""What kind of text a token is: punctuation, the continuation of a word, the start of a word, or other.

The seed's question ("are the sure positions punctuation and word suffixes?") needs this, and so do the gate's
reports. Word boundaries come from the tokenizer's own space marker: byte-level BPE writes a leading space as
'Ġ', SentencePiece as '▁'. A word after a newline or an opening quote has no marker, so, given the token before
it (`prev_ids`), a token only counts as a continuation when it is glued to a letter or digit.

Text is text: `encode_text` is the one way text from a user or a book becomes ids. A tokenizer called plainly
parses special-token strings, so a prompt or a book containing "<|im_start|>" or "<|endoftext|>" would carry
control tokens (SmolLM2: "<|endoftext|>" -> id 0; with a chat template, a user could forge an assistant turn).
encode_text keeps such strings literal (split_special_tokens); the tokenizer's own specials (a BOS) are still
added as usual. Only code that builds control sequences itself (a chat template) may emit special ids.
"""
from __future__ import annotations

import functools
import unicodedata

import numpy as np

CLASSES = ("punct", "continuation", "word_start", "other")
PUNCT, CONTINUATION, WORD_START, OTHER = range(4)


@functools.lru_cache(maxsize=8)
def _vocab_table(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per vocabulary id: its class without context, and whether its text ends in a letter or digit."""
    n = len(tokenizer)
    cls = np.full(n, OTHER, dtype=np.int8)
    ends_alnum = np.zeros(n, dtype=bool)
    special = set(tokenizer.all_special_ids)
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if piece is None or i in special:
            continue
        text = tokenizer.convert_tokens_to_string([piece])
        body = text.strip()
        ends_alnum[i] = text[-1:].isalnum()
        if not body or "\ufffd" in body:  # whitespace, or a partial UTF-8 byte sequence
            continue
        if all(unicodedata.category(c).startswith("P") for c in body):
            cls[i] = PUNCT
        elif body[0].isalnum() or (body[0] in "'\u2019" and body[1:].isalpha()):  # "'s", "’t" are suffixes
            starts_word = piece.startswith(("\u0120", "\u2581")) or text[:1].isspace()
            cls[i] = WORD_START if starts_word else CONTINUATION
    return cls, ends_alnum


def encode_text(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text` with any special-token string in it kept as literal text (see the module docstring).

    `add_special_tokens` adds the tokenizer's usual framing (a BOS for LLaMA-style tokenizers; SmolLM2 adds
    none). Raises RuntimeError (a bug, not a user error) when the tokenizer ignores split_special_tokens.
    """
    ids = tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True, verbose=False).input_ids
    special = set(tokenizer.all_special_ids)
    if special and sum(i in special for i in ids) > sum(
            i in special for i in tokenizer("", add_special_tokens=add_special_tokens, verbose=False).input_ids):
        raise RuntimeError(f"{type(tokenizer).__name__} ignores split_special_tokens: typed special tokens would "
                           "become control tokens")
    return list(ids)


SLOT = "\ue000skipgate-user-text\ue000"   # private-use characters: no chat template writes them itself


def chat_ids(tok, text: str, parse_special: bool = False) -> list[int]:
    """The chat template applied to one user turn. The template's own frame is parsed (its control tokens are
    the point), the user's text is encoded as literal text (encode_text), so a "<|im_start|>" typed in a prompt
    stays text and cannot open a turn: the template is rendered around a placeholder and split there.
    A ValueError when the tokenizer has no template or the template rewrites the user's text."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("this tokenizer has no chat template")
    if parse_special:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    rendered = tok.apply_chat_template([{"role": "user", "content": SLOT}], add_generation_prompt=True,
                                       tokenize=False)
    if rendered.count(SLOT) != 1:
        raise ValueError("this chat template rewrites the user's text, so it cannot keep it literal; "
                         "--parse-special applies it as it is")
    before, after = rendered.split(SLOT)
    return _frame_ids(tok, before) + encode_text(tok, text, add_special_tokens=False) + _frame_ids(tok, after)


def _frame_ids(tok, template_text: str) -> list[int]:
    """Ids of text a chat template wrote (its control tokens parsed), as apply_chat_template tokenizes it."""
    return list(tok(template_text, add_special_tokens=False).input_ids) if template_text else []


def token_class_from_tokenizer(tokenizer, ids, prev_ids=None) -> np.ndarray:
    """Class names (CLASSES) of `ids`; with `prev_ids` (the token before each one) a marker-less word that
    follows a non-letter (newline, quote, dash, start of text) is a word start, not a continuation."""
    cls_table, ends_alnum = _vocab_table(tokenizer)
    ids = np.asarray(ids, dtype=np.int64)
    known = (ids >= 0) & (ids < len(cls_table))  # padded output rows beyond the tokenizer's vocabulary
    cls = np.where(known, cls_table[np.where(known, ids, 0)], OTHER)
    if prev_ids is not None:
        prev = np.asarray(prev_ids, dtype=np.int64)
        glued = (prev >= 0) & (prev < len(ends_alnum)) & ends_alnum[np.clip(prev, 0, len(ends_alnum) - 1)]
        cls = np.where((cls == CONTINUATION) & ~glued, WORD_START, cls)
    return np.asarray(CLASSES)[cls]
