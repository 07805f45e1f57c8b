"""`python train.py selfgen`: a corpus of the big model's own greedy continuations (on-policy training data).

For each book of the chosen splits, `--per-book` prompts of `--prompt-tokens` tokens (`prompts_of_book`), each
continued greedily by the big model for `--new-tokens` tokens; each sample (prompt + continuation, as text) is one
"book" of a normal corpus folder (manifest.jsonl + text/) with its source book's split, ready for `train.py
record` and `fit`. Or `--prompts FILE [--chat]`: one instruction a line, answered greedily; about 15% of the lines
go to the validation split. Resumable; --out is checked and locked, and prompt + new tokens checked against the
model's context, before any generation. Why on-policy data, and the details: docs/corpus.md.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from tqdm import tqdm

from common.errors import ProjectError, one_line
from common.files import FolderLock, check_output_dir, write_text
from corpus_tools.corpus import SPLITS, CorpusError, books_of_split, read_book, write_manifest
from corpus_tools.tokens import chat_ids, encode_text
from runtimes.info import check_context
from runtimes.open import BACKENDS, open_backend


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


def read_prompts(path: str | Path) -> list[str]:
    """The instructions of a prompts file: non-empty lines not starting with '#'."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot read the prompts file ({one_line(e)})") from None
    prompts = [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
    if not prompts:
        raise CorpusError(f"{path}: no prompts (one instruction a line; '#' starts a comment)")
    return prompts


def prompt_jobs(prompts: list[str], tok, chat: bool, model_name: str, fingerprint: str, new_tokens: int):
    """(manifest entry, prompt ids, text before the answer) for each prompt of a prompts file."""
    jobs = []
    for k, line in enumerate(prompts):
        digest = hashlib.sha256(line.encode()).hexdigest()
        split = "val" if int(digest[:8], 16) % 100 < 15 else "train"
        ids = chat_ids(tok, line) if chat else encode_text(tok, line + "\n\n")
        entry = dict(book_id=f"prompt-{k:04d}-{digest[:8]}", title=line[:60], source="prompts", split=split,
                     model=model_name, fingerprint=fingerprint, prompt_tokens=len(ids), new_tokens=new_tokens,
                     chat=chat)
        jobs.append((entry, ids, line + "\n\n"))
    return jobs


def selfgen(model_name: str, corpus: str | Path | None, out: str | Path, splits=SPLITS, per_book: int = 50,
            prompt_tokens: int = 48, new_tokens: int = 128, batch: int = 16, dtype: str = "float32",
            progress: bool = True, prompts: str | Path | None = None, chat: bool = False,
            backend: str = "hf") -> list[dict]:
    """Write the samples (see the module docstring) into the corpus folder `out`; returns its manifest entries."""
    for name, n in (("--per-book", per_book), ("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens),
                    ("--batch", batch)):
        if n < 1:
            raise ValueError(f"{name} {n}: must be at least 1")
    if (corpus is None) == (prompts is None):
        raise ValueError("give --corpus (continue book openings) or --prompts (answer instructions), not both")
    lines = read_prompts(prompts) if prompts is not None else None
    out = Path(check_output_dir(out, "--out"))
    if corpus is not None:
        corpus = Path(corpus)
        books_of_split(corpus, splits[0])  # a missing or broken corpus fails here, before the model loads
    with FolderLock(out, "train.py selfgen"):
        lm = open_backend(model_name, backend, dtype)
        if lines is not None:
            jobs = prompt_jobs(lines, lm.tokenizer, chat, model_name, lm.info.fingerprint, new_tokens)
            longest = max(len(ids) for _, ids, _ in jobs)
            check_context(longest + new_tokens, lm.info, f"the longest prompt ({longest} tokens) + --new-tokens "
                                                         f"{new_tokens}")
        else:
            check_context(prompt_tokens + new_tokens, lm.info,
                          f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens}")
            jobs = book_jobs(lm, model_name, corpus, splits, per_book, prompt_tokens, new_tokens)
        return _selfgen(lm, jobs, out, new_tokens, batch, progress)


def book_jobs(lm, model_name, corpus, splits, per_book, prompt_tokens, new_tokens):
    """(manifest entry, prompt ids, text before the continuation) for the openings of every book."""
    jobs = []
    for split in splits:
        for book in books_of_split(corpus, split):
            for k, ids in enumerate(prompts_of_book(read_book(corpus, book["book_id"]), lm.tokenizer, per_book,
                                                    prompt_tokens)):
                entry = dict(book_id=f"{book['book_id']}-g{k:03d}", title=f"{book['title']} (greedy {k})",
                             source=f"{corpus}/{book['book_id']}", split=split, model=model_name,
                             fingerprint=lm.info.fingerprint, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
                jobs.append((entry, ids, None))
    return jobs


def _selfgen(lm, jobs, out, new_tokens, batch, progress):
    eos = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    (out / "text").mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (out / "text" / f"{j[0]['book_id']}.txt").is_file()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="selfgen", unit="sample", disable=not progress)
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        conts = lm.backend.greedy([ids for _, ids, _ in chunk], new_tokens, eos)
        for (entry, ids, head), cont in zip(chunk, conts):
            text = lm.tokenizer.decode(ids + cont) if head is None else head + lm.tokenizer.decode(cont)
            write_text(out / "text" / f"{entry['book_id']}.txt", text)
        bar.update(len(chunk))
    bar.close()
    entries = []
    for entry, _, _ in jobs:
        text = (out / "text" / f"{entry['book_id']}.txt").read_text(encoding="utf-8")
        entries.append(dict(entry, sha256=hashlib.sha256(text.encode()).hexdigest(), chars=len(text),
                            words=len(text.split()), paragraphs=text.count("\n\n") + 1))
    write_manifest(out, entries)
    return entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train.py selfgen", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the big model whose greedy text to collect")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="source corpus folder (train.py corpus): continue openings of its books")
    src.add_argument("--prompts", help="a prompts file (one instruction a line, '#' comments): answer each")
    ap.add_argument("--chat", action="store_true", help="with --prompts: wrap each in the model's chat template")
    ap.add_argument("--out", required=True, help="corpus folder to write (record it with train.py record)")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    ap.add_argument("--per-book", type=int, default=50, help="prompts per source book")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="prompts generated together")
    ap.add_argument("--dtype", default="float32", help="decode with the dtype you record and decode with")
    ap.add_argument("--backend", choices=tuple(BACKENDS), default="hf",
                    help="model runtime: transformers, or llama.cpp for GGUF models (one prompt at a time; "
                         "--batch and --dtype do not apply)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.chat and args.corpus:   # it was silently ignored: book openings are continued, not answered
        print("train.py selfgen: error: --chat wraps the instructions of --prompts in the chat template; with "
              "--corpus (book openings to continue) it does not apply: drop --chat, or use --prompts",
              file=sys.stderr)
        return 2
    try:
        entries = selfgen(args.model, args.corpus, args.out, args.splits, args.per_book, args.prompt_tokens,
                          args.new_tokens, args.batch, args.dtype, not args.no_progress, args.prompts, args.chat,
                          args.backend)
    except (ProjectError, ValueError) as e:
        print(f"train.py selfgen: error: {one_line(e)}", file=sys.stderr)
        return 2
    counts = {s: sum(e["split"] == s for e in entries) for s in SPLITS}
    print(f"selfgen: {len(entries)} samples ({', '.join(f'{s}: {n}' for s, n in counts.items())}) in {args.out}")
    return 0 if entries else 1
