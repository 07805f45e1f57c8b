"""EPUB books -> a text corpus split by book: `python train.py corpus --epubs PATH... --out DIR`.

    DIR/manifest.jsonl      one JSON object per book: book_id, title, author, language, source, sha256, chars,
                            words, paragraphs, split, extractor_version
    DIR/text/<book_id>.txt  the book's clean UTF-8 text, paragraphs separated by one blank line
    DIR/report.json         counts per split, failed books (file + reason), duplicates, timing

book_id = slug of the title + "-" + first 8 hex digits of the EPUB's sha256: stable across runs and machines.
Every file is written to a temporary file in the same folder and renamed into place (os.replace), so a crash never
leaves half a file; the manifest is rewritten after each converted book, so a re-run after a crash skips the books
already converted (same sha256, same extractor version, text file present with the recorded length).

Split rule (by book, never by paragraph): with n books, test gets test*n books and val val*n, rounded half up; when
n >= 3 each of val and test with a non-zero fraction gets at least one, and train always keeps at least one.
Pinned books (--pin SPLIT=PATTERN, PATTERN a case-insensitive substring of the book id or title) go to their split
first and count towards its share. The other books are ranked by sha256(seed, normalised title) (ties: by content
hash) and fill test, then val, then train. Ranking on the title keeps a book in its split when its EPUB is
re-made, and is independent of input order and paths; adding books can move books near a share's boundary.
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

from corpus_tools.epub import EpubError, extract_text
from corpus_tools.files import write_text
from corpus_tools.records import sha256_file

SPLITS = ("train", "val", "test")
EXTRACTOR_VERSION = 1  # bump when extraction changes: books converted by an older version are converted again


def build_corpus(inputs: list[Path], out: Path, val: float = 0.1, test: float = 0.1, seed: int = 0,
                 pins: dict[str, list[str]] | None = None, progress: bool = True) -> dict:
    """Convert every EPUB under `inputs` into `out`; returns the report (also written to out/report.json).

    A book that cannot be read is listed in report["failed"] and the batch goes on. `pins` maps a split name to
    patterns (substrings of book id or title) of books that must go to that split.
    """
    t0 = time.perf_counter()
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val and test fractions must be in [0, 1) with val + test < 1, got {val}, {test}")
    if set(pins or {}) - set(SPLITS):
        raise ValueError(f"pins name unknown splits {sorted(set(pins) - set(SPLITS))}; splits are {SPLITS}")
    out = Path(out)
    (out / "text").mkdir(parents=True, exist_ok=True)
    files, failed = _find_epubs(inputs)
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

    books = list(entries.values())
    for book, split in zip(books, assign_splits(books, val, test, seed, pins)):
        book["split"] = split
    write_manifest(out, books)
    for stale in set(e["book_id"] for e in old.values()) - set(e["book_id"] for e in books):
        (out / "text" / f"{stale}.txt").unlink(missing_ok=True)  # books no longer among the inputs
    report = {
        "out": str(out), "books": len(books), "converted": len(books) - reused, "reused": reused,
        "failed": failed, "duplicates": duplicates,
        "unmatched_pins": _unmatched_pins(books, pins),
        "splits": {s: _totals([b for b in books if b["split"] == s]) for s in SPLITS},
        "total": _totals(books), "seconds": round(time.perf_counter() - t0, 3),
        "settings": {"val": val, "test": test, "seed": seed, "pins": pins or {},
                     "extractor_version": EXTRACTOR_VERSION},
    }
    write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def assign_splits(books: list[dict], val: float, test: float, seed: int = 0,
                  pins: dict[str, list[str]] | None = None) -> list[str]:
    """One split name per book (dicts with book_id, title, sha256); the rule is in the module docstring."""
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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no corpus manifest (build one with `python train.py corpus`)")
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return entries


def read_book(corpus_dir: str | Path, book_id: str) -> str:
    if not re.fullmatch(r"[a-z0-9-]+", book_id):
        raise ValueError(f"not a book id: {book_id!r}")
    path = Path(corpus_dir) / "text" / f"{book_id}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no text for book {book_id!r} in corpus {corpus_dir}")
    return path.read_text(encoding="utf-8")


def books_of_split(corpus_dir: str | Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [e for e in load_manifest(corpus_dir) if e["split"] == split]


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
                    help="corpus folder: manifest.jsonl, text/<book_id>.txt, report.json; it is made to hold "
                         "exactly the given books (texts of books no longer given are removed)")
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
    try:
        report = build_corpus(args.epubs, args.out, val=args.val, test=args.test, seed=args.seed, pins=pins,
                              progress=not args.quiet)
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

    from corpus_tools.models import resolve
    tok = AutoTokenizer.from_pretrained(resolve(model))
    counts = dict.fromkeys(SPLITS, 0)
    for e in load_manifest(corpus):
        counts[e["split"]] += len(tok(read_book(corpus, e["book_id"]), verbose=False).input_ids)
    return counts


def format_summary(report: dict) -> str:
    t = report["total"]
    lines = [f"corpus {report['out']}: {report['books']} books ({report['converted']} converted, "
             f"{report['reused']} already there), {t['words']:,} words, {t['paragraphs']:,} paragraphs, "
             f"{report['seconds']:.1f} s"]
    lines += [f"  {s:<5} {v['books']:>5} books {v['words']:>12,} words {v['paragraphs']:>9,} paragraphs"
              + (f" {v['tokens']:>12,} tokens ({report['tokens_of']})" if "tokens" in v else "")
              for s, v in report["splits"].items()]
    lines += [f"  failed: {f['file']}: {f['reason']}" for f in report["failed"]]
    lines += [f"  duplicate: {d['file']} (same file as {d['same_as']})" for d in report["duplicates"]]
    lines += [f"  pin matched no book: {p}" for p in report["unmatched_pins"]]
    lines.append(f"  {len(report['failed'])} failed; report: {Path(report['out']) / 'report.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
