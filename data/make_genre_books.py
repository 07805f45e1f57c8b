#!/usr/bin/env python
"""Held-out genres: English prose that is not a novel, as EPUBs, from Debian packages. Nothing is tuned on them.

    python data/make_genre_books.py [--out data/genres] [--debs data/debs] [--force]

The demo trains and calibrates on six Austen novels; a gate that only learned Austen (or only learned to copy)
shows it here. Three genres, each from a Debian package (downloaded once with `apt-get download` into --debs):
  manual    the Debian Policy Manual (package debian-policy): normative technical prose. The package ships an
            EPUB, which is used as it is: a real-world EPUB, not one made by this project.
  lexicon   the Jargon File 4.4.7 (package jargon-text): a lexicon of hacker slang with essay chapters, shipped
            as plain text; made into an EPUB the way data/make_demo_books.py makes the novels (hard-wrapped lines
            rejoined into paragraphs, a <p> each), one chapter per 60 paragraphs after the table of contents.
  guide     the Ubuntu Packaging Guide (package ubuntu-packaging-guide-epub): a how-to with shell sessions and
            file listings, shipped as an EPUB (used as it is). Added after the gate's scoring was designed.
  devil     FINAL CHECK ONLY: The Devil's Dictionary (package dict-devil, a dictd database: the entries as plain
            text, hard-wrapped), one chapter per letter. Nothing is designed, tuned or trained with it in view: the
            speed benchmarks run on it last, to report what the defaults do on text the project never saw.
Not used, on purpose: the Bible (bible-kjv*), which stays unseen by the project. Output bytes are the same on
every run; each file is written atomically.
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_demo_books import book_args, deb_files, epub_bytes, make_books, paragraphs  # noqa: E402

POLICY = ("debian-policy", "./usr/share/doc/debian-policy/policy.epub")
JARGON = ("jargon-text", "./usr/share/doc/jargon-text/jargon.txt.gz")
GUIDE = ("ubuntu-packaging-guide-epub", "./usr/share/doc/ubuntu-packaging-guide-epub/ubuntu-packaging-guide.epub")
DEVIL = ("dict-devil", "./usr/share/dictd/devil.dict.dz")
CHAPTER_PARAGRAPHS = 60


def member(deb: Path, path: str) -> bytes:
    """One file of a .deb's file system tree."""
    f = deb_files(deb, lambda p: p == path).get(path)
    if f is None:
        sys.exit(f"{deb}: {path} is not a file")
    return f


def jargon_epub(raw_gz: bytes) -> bytes:
    paras = paragraphs(gzip.decompress(raw_gz).decode("utf-8").splitlines())
    start = next(i for i, p in enumerate(paras) if len(p.split()) > 40)   # skip the title and table of contents
    body = paras[start:]
    chaps = [(f"Part {i // CHAPTER_PARAGRAPHS + 1}", body[i:i + CHAPTER_PARAGRAPHS])
             for i in range(0, len(body), CHAPTER_PARAGRAPHS)]
    return epub_bytes("urn:jargon-file:4.4.7", "The Jargon File", "Eric S. Raymond (ed.)",
                      "Debian package jargon-text", paras[:1], chaps)


def devil_epub(raw_dz: bytes) -> bytes:
    """The dictd text (dictzip is gzip) without its database header entries, a chapter per initial letter."""
    lines = gzip.decompress(raw_dz).decode("utf-8", "replace").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "PREFACE")
    paras = [p for p in paragraphs(lines[start:]) if not p.startswith("00-database")]
    chaps: dict[str, list[str]] = {}
    for p in paras:
        head = p[:1].upper() if p[:1].isalpha() and p.split()[0].isupper() else ""
        key = head or (list(chaps)[-1] if chaps else "Preface")
        chaps.setdefault(key, []).append(p)
    return epub_bytes("urn:devils-dictionary:bierce", "The Devil's Dictionary", "Ambrose Bierce",
                      "Debian package dict-devil", paras[:1], list(chaps.items()))


BOOKS = {  # file name -> (package, how to make the EPUB from the .deb)
    "debian-policy-manual.epub": (POLICY[0], lambda deb: member(deb, POLICY[1])),
    "the-jargon-file.epub": (JARGON[0], lambda deb: jargon_epub(member(deb, JARGON[1]))),
    "ubuntu-packaging-guide.epub": (GUIDE[0], lambda deb: member(deb, GUIDE[1])),
    "the-devils-dictionary.epub": (DEVIL[0], lambda deb: devil_epub(member(deb, DEVIL[1]))),   # final check only
}


def main(argv: list[str] | None = None) -> int:
    return make_books(BOOKS, book_args(__doc__, "genres", argv), "genre books")


if __name__ == "__main__":
    sys.exit(main())
