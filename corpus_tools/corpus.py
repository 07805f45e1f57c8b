"""EPUB books -> a text corpus split by book: `python train.py corpus --epubs PATH... --out DIR`.

    DIR/manifest.jsonl      one JSON object per book: book_id, title, author, language, source, sha256, chars,
                            words, paragraphs, split, extractor_version
    DIR/text/<book_id>.txt  the book's clean UTF-8 text, paragraphs separated by one blank line
    DIR/report.json         counts per split, failed books (file + reason), duplicates, timing

book_id = slug of the title + "-" + first 8 hex digits of the EPUB's sha256. Writes are atomic and a re-run
resumes; a re-run adds the books it reads and keeps those it was not given (only --prune removes them); a run that
reads no book fails (CorpusError); the folder is locked. Splits go by book, ranked by a hash of the title (--pin
SPLIT=PATTERN puts books in a split first). Resume, pruning and the split rule in full: docs/corpus.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
import traceback
import unicodedata
from pathlib import Path

from tqdm import tqdm

from common.errors import ProjectError, one_line
from common.files import FolderLock, check_output_dir, write_text
from corpus_tools.epub import EpubError, extract_text
from corpus_tools.records import sha256_file
from runtimes.info import ModelSourceError
from runtimes.sources import resolve

SPLITS = ("train", "val", "test")
EXTRACTOR_VERSION = 1  # bump when extraction changes: books converted by an older version are converted again


class CorpusError(ValueError, ProjectError):
    """A corpus folder that cannot be read, or a corpus run that would lose or change nothing useful; the message
    names the folder or file."""


def build_corpus(inputs: list[Path], out: Path, val: float = 0.1, test: float = 0.1, seed: int = 0,
                 pins: dict[str, list[str]] | None = None, progress: bool = True, prune: bool = False) -> dict:
    """Convert every EPUB under `inputs` into `out`; returns the report (also written to out/report.json).

    A book that cannot be read is listed in report["failed"] and the batch goes on; a run that reads no book
    raises CorpusError and leaves `out` as it was. Books of an earlier run that are not among the inputs stay,
    unless `prune`. `pins` maps a split name to patterns (substrings of book id or title) of books that must go
    to that split.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val and test fractions must be in [0, 1) with val + test < 1, got {val}, {test}")
    if set(pins or {}) - set(SPLITS):
        raise ValueError(f"pins name unknown splits {sorted(set(pins) - set(SPLITS))}; splits are {SPLITS}")
    out = Path(check_output_dir(out, "--out"))
    files, failed = _find_epubs(inputs)
    if not files:
        raise CorpusError(f"no EPUB to read ({_reasons(failed)}); {out} is unchanged")
    if prune and failed:
        raise CorpusError(f"--prune removes the books not among the inputs, but input {failed[0]['file']} "
                          f"({failed[0]['reason']}) reads no book; fix the inputs. {out} is unchanged")
    with FolderLock(out, "train.py corpus"):
        return _build(files, failed, out, val, test, seed, pins, progress, prune)


def _build(files: list[Path], failed: list[dict], out: Path, val: float, test: float, seed: int,
           pins: dict[str, list[str]] | None, progress: bool, prune: bool) -> dict:
    t0 = time.perf_counter()
    old = {e["sha256"]: e for e in load_manifest(out)} if (out / "manifest.jsonl").exists() else {}
    entries: dict[str, dict] = {}  # sha256 -> manifest entry, in input order
    duplicates, reused = [], 0
    for path in tqdm(files, desc="corpus", unit="book", disable=not progress):
        sha = sha256_file(path)
        if sha in entries:  # the same book twice would leak across splits
            duplicates.append({"file": str(path), "same_as": entries[sha]["source"]})
            continue
        if _converted(out, old.get(sha)):
            entries[sha] = dict(old[sha], source=str(path))
            reused += 1
            continue
        try:
            book = extract_text(path)
        except EpubError as e:
            failed.append({"file": str(path), "reason": e.reason})
            continue
        except Exception as e:  # a bug, not bad input: report it and keep the batch going
            traceback.print_exc()
            failed.append({"file": str(path), "reason": f"internal error {type(e).__name__}: {e}"})
            continue
        book_id = f"{slug(book.title)}-{sha[:8]}"
        text = book.text
        write_text(out / "text" / f"{book_id}.txt", text)
        entries[sha] = {"book_id": book_id, "title": book.title, "author": book.author, "language": book.language,
                        "source": str(path), "sha256": sha, "chars": len(text), "words": len(text.split()),
                        "paragraphs": len(book.paragraphs), "split": None, "extractor_version": EXTRACTOR_VERSION}
        write_manifest(out, [*entries.values(), *(e for s, e in old.items() if s not in entries)])

    if not entries:
        raise CorpusError(f"none of the {len(files)} EPUB file(s) could be read ({_reasons(failed)}); "
                          f"{out} is unchanged")
    not_given = [e for s, e in old.items() if s not in entries]
    books = list(entries.values()) + ([] if prune else not_given)
    for book, split in zip(books, assign_splits(books, val, test, seed, pins)):
        book["split"] = split
    write_manifest(out, books)
    pruned = sorted(e["book_id"] for e in not_given) if prune else []
    for stale in pruned:
        (out / "text" / f"{stale}.txt").unlink(missing_ok=True)  # --prune: books no longer among the inputs
    report = {
        "out": str(out), "books": len(books), "converted": len(entries) - reused, "reused": reused,
        "kept": 0 if prune else len(not_given), "pruned": pruned,
        "failed": failed, "duplicates": duplicates,
        "unmatched_pins": _unmatched_pins(books, pins),
        "splits": {s: _totals([b for b in books if b["split"] == s]) for s in SPLITS},
        "total": _totals(books), "seconds": round(time.perf_counter() - t0, 3),
        "settings": {"val": val, "test": test, "seed": seed, "pins": pins or {}, "prune": prune,
                     "extractor_version": EXTRACTOR_VERSION},
    }
    write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def assign_splits(books: list[dict], val: float, test: float, seed: int = 0,
                  pins: dict[str, list[str]] | None = None) -> list[str]:
    """One split name per book (dicts with book_id, title, sha256); the rule is in docs/corpus.md."""
    n = len(books)
    want = {"test": math.floor(test * n + 0.5), "val": math.floor(val * n + 0.5)}
    if n >= 3:
        want = {"test": max(want["test"], int(test > 0)), "val": max(want["val"], int(val > 0))}
    while want["test"] + want["val"] >= n > 0 and want["test"] + want["val"]:  # train keeps at least one book
        want["test" if want["test"] >= want["val"] else "val"] -= 1
    splits: list[str | None] = [_pinned(b, pins) for b in books]
    free = sorted((i for i in range(n) if splits[i] is None), key=lambda i: _rank(books[i], seed))
    for name in ("test", "val"):
        room = max(0, want[name] - splits.count(name))
        for i in free[:room]:
            splits[i] = name
        free = free[room:]
    return [s or "train" for s in splits]


def _rank(book: dict, seed: int) -> tuple[str, str]:
    title = " ".join(book["title"].lower().split())
    return hashlib.sha256(f"{seed}\0{title}".encode()).hexdigest(), book["sha256"]


def _pinned(book: dict, pins: dict[str, list[str]] | None) -> str | None:
    hits = {split for split, patterns in (pins or {}).items() for p in patterns
            if p.lower() in book["book_id"].lower() or p.lower() in book["title"].lower()}
    if len(hits) > 1:
        raise ValueError(f"book {book['book_id']!r} is pinned to several splits: {sorted(hits)}")
    return hits.pop() if hits else None


def _unmatched_pins(books: list[dict], pins: dict[str, list[str]] | None) -> list[str]:
    return [f"{split}={p}" for split, patterns in (pins or {}).items() for p in patterns
            if not any(p.lower() in b["book_id"].lower() or p.lower() in b["title"].lower() for b in books)]


def _totals(books: list[dict]) -> dict:
    return {"books": len(books), **{k: sum(b[k] for b in books) for k in ("words", "paragraphs", "chars")}}


def _reasons(failed: list[dict], n: int = 3) -> str:
    more = f"; and {len(failed) - n} more" if len(failed) > n else ""
    return "; ".join(f"{f['file']}: {f['reason']}" for f in failed[:n]) + more


def _find_epubs(inputs: list[Path]) -> tuple[list[Path], list[dict]]:
    """Folders are searched recursively for *.epub (sorted); files are taken as given, whatever their suffix."""
    files, failed = [], []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() == ".epub" and f.is_file())
            if not found:
                failed.append({"file": str(p), "reason": "no .epub files in this folder"})
            files += found
        elif p.is_file():
            files.append(p)
        else:
            failed.append({"file": str(p), "reason": "no such file or folder"})
    return list(dict.fromkeys(files)), failed


def _converted(out: Path, entry: dict | None) -> bool:
    """An earlier run converted this exact file with this extractor, and its text file is complete."""
    if not entry or entry.get("extractor_version") != EXTRACTOR_VERSION:
        return False
    path = out / "text" / f"{entry['book_id']}.txt"
    return path.is_file() and len(path.read_text(encoding="utf-8")) == entry["chars"]


def slug(title: str, max_len: int = 40) -> str:
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9]+", "-", ascii_title.lower()).strip("-")[:max_len].rstrip("-")
    return s or "book"


def write_manifest(out: Path, entries: list[dict]) -> None:
    write_text(out / "manifest.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


def load_manifest(corpus_dir: str | Path) -> list[dict]:
    path = Path(corpus_dir) / "manifest.jsonl"
    if not Path(corpus_dir).is_dir():
        raise CorpusError(f"{corpus_dir}: no such corpus folder (build one with `python train.py corpus`)")
    if not path.is_file():
        raise CorpusError(f"{path}: no corpus manifest (build one with `python train.py corpus`)")
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot read the corpus manifest ({one_line(e)})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("book_id"), str):
                raise CorpusError(f"{path}:{n}: not a manifest entry (a JSON object with a book_id)")
            entries.append(entry)
    return entries


def read_book(corpus_dir: str | Path, book_id: str) -> str:
    if not re.fullmatch(r"[a-z0-9-]+", book_id):
        raise CorpusError(f"{corpus_dir}: not a book id: {book_id!r}")
    path = Path(corpus_dir) / "text" / f"{book_id}.txt"
    if not path.is_file():
        raise CorpusError(f"{path}: no text for book {book_id!r} in corpus {corpus_dir}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot read book {book_id!r} ({one_line(e)})") from None


def books_of_split(corpus_dir: str | Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [e for e in load_manifest(corpus_dir) if e.get("split") == split]


def _pin_arg(value: str) -> tuple[str, str]:
    split, sep, pattern = value.partition("=")
    if not sep or split not in SPLITS or not pattern:
        raise argparse.ArgumentTypeError(f"expected SPLIT=PATTERN with SPLIT in {', '.join(SPLITS)}, got {value!r}")
    return split, pattern


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="train.py corpus",
        description="Turn EPUB books into one clean UTF-8 text per book, a manifest and a train/val/test split "
                    "by book. Books already converted (same file hash) are skipped; unreadable books are listed "
                    "in report.json and the rest go on.")
    ap.add_argument("--epubs", nargs="+", type=Path, required=True, metavar="PATH",
                    help="EPUB files and/or folders (searched recursively for *.epub)")
    ap.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="corpus folder: manifest.jsonl, text/<book_id>.txt, report.json; books are added to it, "
                         "books of earlier runs that are not given now stay (see --prune)")
    ap.add_argument("--prune", action="store_true",
                    help="make the corpus hold exactly the given books: remove the texts of books of earlier runs "
                         "that are not given now (refused when an input path is missing or holds no EPUB)")
    ap.add_argument("--val", type=float, default=0.1, help="share of books for validation (default 0.1)")
    ap.add_argument("--test", type=float, default=0.1, help="share of books for test (default 0.1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the deterministic split (default 0)")
    ap.add_argument("--pin", type=_pin_arg, action="append", default=[], metavar="SPLIT=PATTERN",
                    help="put books whose id or title contains PATTERN (case-insensitive) into SPLIT; repeatable")
    ap.add_argument("--tokens-of", metavar="MODEL",
                    help="also count tokens per split with this model's tokenizer (e.g. smollm2-135m)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    pins: dict[str, list[str]] = {}
    for split, pattern in args.pin:
        pins.setdefault(split, []).append(pattern)
    if args.tokens_of:  # a bad model name fails now, not after the books are converted
        try:
            resolve(args.tokens_of)
        except ModelSourceError as e:
            print(f"train.py corpus: error: --tokens-of: {one_line(e)}", file=sys.stderr)
            return 2
    try:
        report = build_corpus(args.epubs, args.out, val=args.val, test=args.test, seed=args.seed, pins=pins,
                              progress=not args.quiet, prune=args.prune)
    except ProjectError as e:
        print(f"train.py corpus: error: {one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        ap.error(str(e))
    if args.tokens_of and report["books"]:
        report["tokens_of"] = args.tokens_of
        for split, tokens in count_tokens(args.out, args.tokens_of).items():
            report["splits"][split]["tokens"] = tokens
    print(format_summary(report))
    return 0 if report["books"] else 1


def count_tokens(corpus: Path, model: str) -> dict[str, int]:
    """Tokens per split under a model's tokenizer (the tokenizer only; no weights are loaded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(model))
    counts = dict.fromkeys(SPLITS, 0)
    for e in load_manifest(corpus):
        counts[e["split"]] += len(tok(read_book(corpus, e["book_id"]), verbose=False).input_ids)
    return counts


def format_summary(report: dict) -> str:
    t = report["total"]
    kept = f", {report['kept']} kept from earlier runs" if report.get("kept") else ""
    lines = [f"corpus {report['out']}: {report['books']} books ({report['converted']} converted, "
             f"{report['reused']} already there{kept}), {t['words']:,} words, {t['paragraphs']:,} paragraphs, "
             f"{report['seconds']:.1f} s"]
    lines += [f"  {s:<5} {v['books']:>5} books {v['words']:>12,} words {v['paragraphs']:>9,} paragraphs"
              + (f" {v['tokens']:>12,} tokens ({report['tokens_of']})" if "tokens" in v else "")
              for s, v in report["splits"].items()]
    lines += [f"  failed: {f['file']}: {f['reason']}" for f in report["failed"]]
    lines += [f"  duplicate: {d['file']} (same file as {d['same_as']})" for d in report["duplicates"]]
    lines += [f"  pin matched no book: {p}" for p in report["unmatched_pins"]]
    lines += [f"  pruned (not given): {b}" for b in report.get("pruned", [])]
    lines.append(f"  {len(report['failed'])} failed; report: {Path(report['out']) / 'report.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
