#!/usr/bin/env python
"""Demo books: Jane Austen's six novels as EPUB files, made from Debian's r-cran-janeaustenr without R.

    python data/make_demo_books.py [--out data/books] [--debs data/debs] [--force]

1. `apt-get download r-cran-janeaustenr` into --debs (cached; `apt-get update` is run only if the download fails).
   A .deb put there by hand is used as it is.
2. `dpkg-deb --fsys-tarfile` streams the package; only data/Rdata.rdx and data/Rdata.rdb are read from it.
3. Rdata.rdx is a gzip'd R serialization of list(variables = list(<name> = c(offset, length)), ...); the record
   of each variable in Rdata.rdb is a 4-byte big-endian length plus a zlib stream, itself an R serialization of a
   character vector with one element per line of the novel. `unserialize` below reads the subset of R's XDR
   format these files use (standard library only).
4. Lines -> paragraphs (blank-line separated; hard-wrapped lines rejoined into one; verse, whose lines are indented
   to different depths, keeps its line breaks as <br/>) -> chapters (split at "CHAPTER I" / "Chapter 1"; a
   "VOLUME II" line opens the next chapter; what comes before the first chapter is the title page).
5. Each novel becomes an EPUB 3 with ebooklib: title/author/language metadata, a nav page (also listed in the
   spine, as in many real books) and an NCX, one XHTML per chapter, a <p> per paragraph, text HTML-escaped,
   Gutenberg's _italics_ as <em>. Timestamps are fixed so the bytes are the same on every run; each file is written
   to a temporary name and renamed into place. Existing books are kept unless --force.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import html
import io
import os
import re
import secrets
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "r-cran-janeaustenr"
RDATA = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
TITLES = {  # variable names in Rdata.rdx -> book titles
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUTHOR = "Jane Austen"
FIXED_TIME = datetime.datetime(2022, 8, 26)  # the package's publication date: fixed so output bytes never change
CHAPTER = re.compile(r"(?:CHAPTER|Chapter)\s+(?:[0-9]+|[IVXLC]+)\.?")
VOLUME = re.compile(r"VOLUME\s+[IVX]+\.?", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- the package

def fetch_deb(debs: Path, package: str = PACKAGE) -> Path:
    """The cached .deb of `package`, downloading it with apt-get when there is none."""
    debs.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:  # apt writes the file in place: download beside, then move
        download = ["apt-get", "download", package]
        try:
            if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
                print("apt-get download failed; running apt-get update once", file=sys.stderr)
                subprocess.run(["apt-get", "update"], check=True, capture_output=True)
                subprocess.run(download, cwd=tmp, check=True, capture_output=True)
        except FileNotFoundError:
            sys.exit(f"apt-get not found: put {package}_*.deb (from a Debian mirror) into {debs} and run again")
        except subprocess.CalledProcessError as e:
            sys.exit(f"{' '.join(e.cmd)} failed:\n{e.stderr.decode(errors='replace')}")
        deb = next(Path(tmp).glob(f"{package}_*.deb"))
        os.replace(deb, debs / deb.name)
    return debs / deb.name


def deb_files(deb: Path, keep) -> dict[str, bytes]:
    """The files of a .deb's file system tree whose path `keep(path)` accepts, by path in path order, streamed
    from dpkg-deb (exits when dpkg-deb fails)."""
    out = {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and keep(member.name):
                    out[member.name] = tar.extractfile(member).read()
    if proc.returncode:
        sys.exit(f"{deb}: dpkg-deb failed (exit {proc.returncode})")
    return dict(sorted(out.items()))


def read_rdata(deb: Path) -> tuple[bytes, bytes]:
    """Rdata.rdx and Rdata.rdb from the package's file system tar."""
    names = (RDATA + ".rdx", RDATA + ".rdb")
    found = deb_files(deb, lambda p: p in names)
    if not all(found.get(n) for n in names):
        sys.exit(f"{deb}: the package has no {RDATA}.rdx/.rdb")
    return found[names[0]], found[names[1]]


def unserialize(buf: bytes):
    """R's XDR serialization (format 2 or 3) -> Python: vectors -> lists (named ones -> dicts), strings -> str."""
    pos = 0
    symbols: list[str] = []  # REFSXP entries point back into this table

    def int32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from(">i", buf, pos - 4)[0]

    def item():
        nonlocal pos
        flags = int32()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: index in the high bits
            return symbols[(flags >> 8) - 1]
        if kind == 1:  # SYMSXP: a CHARSXP follows
            symbols.append(item())
            return symbols[-1]
        if kind == 9:  # CHARSXP: length, bytes (-1 = NA)
            n = int32()
            pos += max(n, 0)
            return None if n == -1 else buf[pos - n:pos].decode("utf-8")
        if kind == 2:  # LISTSXP (pairlist): [attr] [tag] car cdr
            if has_attr:
                item()
            tag = item() if has_tag else None
            head = (tag, item())
            return [head] + (item() or [])
        if kind in (10, 13, 14):  # logical, integer, double vectors
            n = int32()
            fmt = f">{n}{'d' if kind == 14 else 'i'}"
            value = list(struct.unpack_from(fmt, buf, pos))
            pos += struct.calcsize(fmt)
        elif kind in (16, 19):  # character vector, list
            value = [item() for _ in range(int32())]
        else:
            raise ValueError(f"unsupported R type {kind} at byte {pos - 4}")
        if has_attr:
            names = dict(item()).get("names")
            if names:
                value = dict(zip(names, value))
        return value

    if buf[:2] != b"X\n":
        raise ValueError("not R XDR serialization")
    pos = 2
    version = int32()
    pos += 8  # writer's and minimal reader's R versions
    if version == 3:
        pos += 4 + int32()  # native encoding name
    return item()


def read_novels(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Variable name -> lines of the novel."""
    index = unserialize(gzip.decompress(rdx))
    novels = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[offset:offset + length]
        size = struct.unpack(">I", record[:4])[0]
        data = zlib.decompress(record[4:])
        if len(data) != size:
            raise ValueError(f"Rdata.rdb record {name}: {len(data)} bytes, expected {size}")
        novels[name] = [line or "" for line in unserialize(data)]
    return novels


# ---------------------------------------------------------------------------------------------- text -> book

def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated blocks of hard-wrapped lines -> one line per paragraph; verse keeps "\\n" breaks."""
    out, block = [], []
    for line in lines + [""]:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            indents = {len(x) - len(x.lstrip()) for x in block}
            verse = len(block) > 1 and len(indents) > 1 and min(indents) > 0
            out.append(("\n" if verse else " ").join(" ".join(x.split()) for x in block))
            block = []
    return out


def chapters(paras: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(title page paragraphs, [(heading, paragraphs)]); a volume heading goes into the next chapter's heading."""
    front: list[str] = []
    chaps: list[tuple[str, list[str]]] = []
    volume = ""
    for p in paras:
        if VOLUME.fullmatch(p):
            volume = p
        elif CHAPTER.fullmatch(p):
            chaps.append((f"{volume}\n{p}" if volume else p, []))
            volume = ""
        elif chaps:
            chaps[-1][1].append(p)
        else:
            front.append(p)
    if volume or not chaps:
        raise ValueError("chapter headings not found where expected")
    return front, chaps


def _html_paragraph(p: str) -> str:
    text = re.sub(r"_([^_]+)_", r"<em>\1</em>", html.escape(p, quote=False))
    return f"<p>{text.replace(chr(10), '<br/>')}</p>"


def make_epub(name: str, title: str, lines: list[str]) -> bytes:
    front, chaps = chapters(paragraphs(lines))
    return epub_bytes(f"urn:janeaustenr:{name}", title, AUTHOR,
                      f"Debian package {PACKAGE} (text from Project Gutenberg)", front, chaps)


def epub_bytes(identifier: str, title: str, author: str, source: str, front: list[str],
               chaps: list[tuple[str, list[str]]]) -> bytes:
    """An EPUB 3: a title page of `front` paragraphs, one XHTML per (heading, paragraphs), nav + NCX."""
    from ebooklib import epub  # imported here: --help should not need it

    book = epub.EpubBook()
    book.set_identifier(identifier)
    book.set_title(title)
    book.set_language("en")
    book.add_author(author)
    book.add_metadata("DC", "source", source)
    docs = [epub.EpubHtml(title=title, file_name="title.xhtml", lang="en")]
    docs[0].content = "".join(map(_html_paragraph, front)) or f"<h1>{html.escape(title)}</h1>"
    for i, (heading, paras) in enumerate(chaps, 1):
        nav_title = re.sub(r"\b(CHAPTER|VOLUME)\b", lambda m: m[1].capitalize(), heading.replace("\n", ", "))
        doc = epub.EpubHtml(title=nav_title, file_name=f"chapter_{i:03d}.xhtml", lang="en")
        *vol, chap = heading.split("\n")
        doc.content = "".join(f"<h1>{html.escape(h)}</h1>" for h in vol) + f"<h2>{html.escape(chap)}</h2>" + \
            "".join(map(_html_paragraph, paras))
        docs.append(doc)
    for doc in docs:
        book.add_item(doc)
    book.toc = docs[1:]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = [docs[0], "nav", *docs[1:]]
    raw = io.BytesIO()
    epub.write_epub(raw, book, {"mtime": FIXED_TIME})
    return _fixed_timestamps(raw.getvalue())


def _fixed_timestamps(data: bytes) -> bytes:
    """Re-pack the zip with one fixed date on every member (zipfile stamps the current time)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():  # "mimetype" stays first and stored, as EPUB requires
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_TIME.timetuple()[:6])
            fixed.compress_type, fixed.external_attr = info.compress_type, 0o644 << 16
            dst.writestr(fixed, src.read(info))
    return out.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def book_file(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".epub"


def book_args(doc: str, out: str, argv: list[str] | None) -> argparse.Namespace:
    """--out, --debs, --force: the options of every book-making script here (its docstring as --help)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(doc.split("\n\n")[2:]))
    ap.add_argument("--out", type=Path, default=HERE / out, help=f"folder for the EPUBs (default data/{out})")
    ap.add_argument("--debs", type=Path, default=HERE / "debs", help="cache of the .debs (default data/debs)")
    ap.add_argument("--force", action="store_true", help="re-make books that already exist")
    return ap.parse_args(argv)


def make_books(books: dict, args: argparse.Namespace, what: str) -> int:
    """Write each EPUB of `books` ({file name: (Debian package, make(deb) -> EPUB bytes)}) into args.out that is
    missing there (all with --force), atomically."""
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (package, make) in books.items():
        path = args.out / name
        if path.is_file() and not args.force:
            continue
        write_atomic(path, make(fetch_deb(args.debs, package)))
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB, from Debian package {package}")
    print(f"{what} in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = book_args(__doc__, "books", argv)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    targets = {name: args.out / book_file(title) for name, title in TITLES.items()}
    if not args.force and all(p.is_file() for p in targets.values()):
        print(f"demo books already in {args.out} ({len(targets)} EPUBs); --force re-makes them")
        return 0
    deb = fetch_deb(args.debs)
    novels = read_novels(*read_rdata(deb))
    if set(novels) != set(TITLES):
        sys.exit(f"{deb}: expected the novels {sorted(TITLES)}, found {sorted(novels)}")
    for name, lines in novels.items():
        path = targets[name]
        if path.is_file() and not args.force:
            continue
        write_atomic(path, make_epub(name, TITLES[name], lines))
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB, {len(lines):,} source lines")
    print(f"demo books in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
