"""`python train.py selfgen`: a corpus of the big model's own greedy continuations (on-policy training data).

Why: a decoder that skips big-model passes works on the big model's own greedy text, not on book text. Greedy
text is far more predictable from its context (small models repeat themselves), so a gate trained and calibrated
only on teacher-forced book text neither learns to trust what is easy in decoding (in-context copies) nor is
calibrated for it. Medusa-2 trains its heads on such self-distilled data for the same reason.

What: for each book of the chosen splits, `--per-book` prompts of `--prompt-tokens` tokens (openings of long
paragraphs spread over the book, `prompts_of_book`), each continued greedily by the big model for
`--new-tokens` tokens. Each sample (prompt + continuation, as text) is written as one "book" of a normal corpus
folder (manifest.jsonl + text/), with the split of its source book, so it goes through `train.py record` and
`fit` like any corpus; a record of it starts at the sample's first token, as decoding does.

Resumable: each sample's text is written atomically when its batch is done and skipped on a re-run; the
manifest is written last. Before any generation --out is checked and locked (a second run into it refuses at
once) and prompt + new tokens are checked against the model's context length (corpus_tools.models.check_context).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from corpus_tools.corpus import SPLITS, CorpusError, books_of_split, read_book, write_manifest
from corpus_tools.errors import one_line
from corpus_tools.files import FolderLock, LockedError, OutputPathError, check_output_dir, write_text
from corpus_tools.tokens import encode_text


def prompts_of_book(text: str, tokenizer, n: int, n_tokens: int) -> list[list[int]]:
    """n prompts of n_tokens tokens: openings of paragraphs long enough to hold them, spread over the book
    (the first 5% of paragraphs, title pages and contents, are left out)."""
    paras = text.split("\n\n")
    paras = paras[len(paras) // 20:]
    long = [ids for ids in (encode_text(tokenizer, p) for p in paras if len(p) > 4 * n_tokens)
            if len(ids) >= n_tokens]
    pick = sorted({(j + 1) * len(long) // (n + 1) for j in range(n)} - {len(long)})
    return [long[i][:n_tokens] for i in pick]


def split_prompts(corpus: str | Path, tokenizer, n: int, n_tokens: int, split: str = "test") -> list[list[int]]:
    """n prompts from the books of one split, interleaved across books (prompt i from book i % B)."""
    books = books_of_split(corpus, split)
    if not books:
        raise ValueError(f"{corpus}: no books in split {split!r}")
    per_book = -(-n // len(books))
    by_book = [prompts_of_book(read_book(corpus, b["book_id"]), tokenizer, per_book, n_tokens) for b in books]
    out = [p for j in range(per_book) for ps in by_book if j < len(ps) for p in ps[j:j + 1]]
    return out[:n]


@torch.inference_mode()
def continue_greedy(model, prompts: list[list[int]], new_tokens: int, eos_ids) -> list[list[int]]:
    """Greedy continuations of equal-length prompts in one batch (no padding needed), cut at the first EOS."""
    x = torch.tensor(prompts)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=eos_ids[0] if eos_ids else None)[:, x.shape[1]:]
    conts = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        conts.append(row[:cut])
    return conts


def selfgen(model_name: str, corpus: str | Path, out: str | Path, splits=SPLITS, per_book: int = 50,
            prompt_tokens: int = 48, new_tokens: int = 128, batch: int = 16, dtype: str = "float32",
            progress: bool = True) -> list[dict]:
    """Write the samples (see the module docstring) into the corpus folder `out`; returns its manifest entries."""
    for name, n in (("--per-book", per_book), ("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens),
                    ("--batch", batch)):
        if n < 1:
            raise ValueError(f"{name} {n}: must be at least 1")
    corpus, out = Path(corpus), Path(check_output_dir(out, "--out"))
    books_of_split(corpus, splits[0])  # a missing or broken corpus fails here, before the model loads
    with FolderLock(out, "train.py selfgen"):
        return _selfgen(model_name, corpus, out, splits, per_book, prompt_tokens, new_tokens, batch, dtype, progress)


def _selfgen(model_name, corpus, out, splits, per_book, prompt_tokens, new_tokens, batch, dtype, progress):
    from corpus_tools.models import check_context, load

    lm = load(model_name, dtype)
    check_context(prompt_tokens + new_tokens, lm.info, f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens}")
    eos = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    (out / "text").mkdir(parents=True, exist_ok=True)
    jobs = []   # (entry, prompt ids) for every sample
    for split in splits:
        for book in books_of_split(corpus, split):
            for k, ids in enumerate(prompts_of_book(read_book(corpus, book["book_id"]), lm.tokenizer, per_book,
                                                    prompt_tokens)):
                entry = dict(book_id=f"{book['book_id']}-g{k:03d}", title=f"{book['title']} (greedy {k})",
                             source=f"{corpus}/{book['book_id']}", split=split, model=model_name,
                             fingerprint=lm.info.fingerprint, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
                jobs.append((entry, ids))
    todo = [j for j in jobs if not (out / "text" / f"{j[0]['book_id']}.txt").is_file()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="selfgen", unit="sample", disable=not progress)
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        conts = continue_greedy(lm.model, [ids for _, ids in chunk], new_tokens, eos)
        for (entry, ids), cont in zip(chunk, conts):
            write_text(out / "text" / f"{entry['book_id']}.txt", lm.tokenizer.decode(ids + cont))
        bar.update(len(chunk))
    bar.close()
    entries = []
    for entry, _ in jobs:
        text = (out / "text" / f"{entry['book_id']}.txt").read_text(encoding="utf-8")
        entries.append(dict(entry, sha256=hashlib.sha256(text.encode()).hexdigest(), chars=len(text),
                            words=len(text.split()), paragraphs=text.count("\n\n") + 1))
    write_manifest(out, entries)
    return entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train.py selfgen", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the big model whose greedy text to collect")
    ap.add_argument("--corpus", required=True, help="source corpus folder (train.py corpus)")
    ap.add_argument("--out", required=True, help="corpus folder to write (record it with train.py record)")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    ap.add_argument("--per-book", type=int, default=50, help="prompts per source book")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="prompts generated together")
    ap.add_argument("--dtype", default="float32", help="decode with the dtype you record and decode with")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from corpus_tools.models import ModelSourceError
    try:
        entries = selfgen(args.model, args.corpus, args.out, args.splits, args.per_book, args.prompt_tokens,
                          args.new_tokens, args.batch, args.dtype, not args.no_progress)
    except (CorpusError, OutputPathError, LockedError, ModelSourceError, ValueError) as e:  # and ContextLengthError
        print(f"train.py selfgen: error: {one_line(e)}", file=sys.stderr)
        return 2
    counts = {s: sum(e["split"] == s for e in entries) for s in SPLITS}
    print(f"selfgen: {len(entries)} samples ({', '.join(f'{s}: {n}' for s, n in counts.items())}) in {args.out}")
    return 0 if entries else 1
