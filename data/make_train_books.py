#!/usr/bin/env python
"""Training genres: more kinds of English text for drafters, as EPUBs, from Debian packages (none is judged on).

    python data/make_train_books.py [--out data/train_books] [--debs data/debs] [--force]

A drafter trained on six Austen novels and everyday chat answers sees two kinds of text; the held-out genres
(data/make_genre_books.py) are manuals, a lexicon, a how-to and a satirical dictionary. These five books widen
the training side without touching any of them:
  git       the Git user manual and command pages (package git-doc, AsciiDoc sources as plain text)
  perl      Perl's tutorials and FAQ (package perl-doc, POD)
  gnu       the GNU Coding Standards and Information for Maintainers (package gnu-standards, plain text)
  vim       Vim's user manual (package vim-runtime, help files usr_*.txt)
  fortunes  quotations, jokes and verse (package fortunes); the art files are left out, and so is every fortune
            that quotes Bierce, his Devil's Dictionary or the Jargon File (both are held-out genres).
Markup is stripped line by line (POD commands, AsciiDoc blocks, Vim tags and links); code lines stay, as text a
model meets in such documents. Output bytes are the same on every run; each file is written atomically.
"""
from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_demo_books import book_args, deb_files, epub_bytes, make_books, paragraphs  # noqa: E402

CHAPTER_PARAGRAPHS = 60
PERL_PODS = re.compile(r"perl(faq\d?|intro|\w*tut|syn|data|sub|mod|style|trap|var|run|sec|port|re|perf|pod)\.pod")
HELD_OUT = re.compile(r"bierce|devil's dictionary|jargon", re.I)
FORTUNE_SKIP = {"art", "ascii-art", "definitions"}


def chunked(paras: list[str]) -> list[tuple[str, list[str]]]:
    return [(f"Part {i // CHAPTER_PARAGRAPHS + 1}", paras[i:i + CHAPTER_PARAGRAPHS])
            for i in range(0, len(paras), CHAPTER_PARAGRAPHS)]


def by_file(files: dict[str, bytes], clean) -> list[tuple[str, list[str]]]:
    """A chapter per file (long files in parts of CHAPTER_PARAGRAPHS paragraphs), its text through `clean`."""
    chaps = []
    for path, raw in files.items():
        text = gzip.decompress(raw) if path.endswith(".gz") else raw
        paras = [p for p in paragraphs(clean(text.decode("utf-8", "replace").splitlines())) if len(p.split()) > 2]
        name = Path(path).name.split(".")[0]
        for i, (_, part) in enumerate(chunked(paras)):
            chaps.append((name if i == 0 else f"{name} ({i + 1})", part))
    return chaps


def asciidoc(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        s = line.strip()
        if re.fullmatch(r"[-=~^+.*_]{4,}", s) or re.fullmatch(r"\[\[?[^\]]*\]\]?", s) or s.startswith(
                ("include::", "ifdef::", "endif::", "ifndef::", "//")) or re.match(r":[\w-]+:", s):
            out.append("")
            continue
        line = re.sub(r"^=+ ", "", re.sub(r"<<[^,>]*,([^>]*)>>", r"\1", line))            # headings, links
        out.append(re.sub(r"linkgit:([\w-]+)\[\d\]", r"\1", line))
    return out


def pod(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            out += ["", rest, ""] if cmd.startswith(("=head", "=item")) and rest.strip() else [""]
            continue
        out.append(re.sub(r"[BCIFLESXZ]<+\s*([^<>]*?)\s*>+", r"\1", line))
    return out


def vimhelp(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if re.fullmatch(r"[=\-]{10,}", line.strip()) or line.startswith("vim:"):
            out.append("")
            continue
        line = re.sub(r"\s*\*[^*\s]+\*", "", line)                 # tags
        out.append(re.sub(r"\|([^|\s]+)\|", r"\1", line).replace("~", "").rstrip(" <>"))
    return out


def fortunes(files: dict[str, bytes]) -> list[tuple[str, list[str]]]:
    chaps = []
    for path, raw in files.items():
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:   # a few files are Latin-1
            text = raw.decode("latin-1")
        items = re.sub(r".\x08|[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text).split("\n%\n")   # overstrikes, bells
        paras = ["\n".join(x.rstrip() for x in f.strip("\n").splitlines()) for f in items]
        paras = [p for p in paras if p.strip() and not HELD_OUT.search(p)]
        chaps += [(f"{Path(path).name} {h[5:]}", ps) for h, ps in chunked(paras)]
    return chaps


def git_book(deb: Path) -> bytes:
    files = deb_files(deb, lambda p: p.startswith("./usr/share/doc/git-doc/") and p.endswith(".txt"))
    manual = {k: v for k, v in files.items() if k.endswith("user-manual.txt")}
    chaps = by_file(manual, asciidoc) + by_file({k: v for k, v in files.items() if k not in manual}, asciidoc)
    return epub_bytes("urn:skipgate-train:git-doc", "Git User Manual and Commands", "The Git project",
                      "Debian package git-doc", ["Git documentation"], chaps)


def perl_book(deb: Path) -> bytes:
    files = deb_files(deb, lambda p: "/pod/" in p and PERL_PODS.fullmatch(Path(p).name) is not None)
    return epub_bytes("urn:skipgate-train:perl-doc", "Perl Tutorials and FAQ", "The Perl 5 Porters",
                      "Debian package perl-doc", ["Perl documentation"], by_file(files, pod))


def gnu_book(deb: Path) -> bytes:
    files = deb_files(deb, lambda p: p.endswith(".text.gz"))
    return epub_bytes("urn:skipgate-train:gnu-standards", "GNU Coding Standards", "Free Software Foundation",
                      "Debian package gnu-standards", ["GNU Coding Standards"], by_file(files, lambda x: x))


def vim_book(deb: Path) -> bytes:
    files = deb_files(deb, lambda p: re.search(r"/doc/usr_\d\d\.txt$", p) is not None)
    return epub_bytes("urn:skipgate-train:vim-runtime", "Vim User Manual", "Bram Moolenaar",
                      "Debian package vim-runtime", ["Vim user manual"], by_file(files, vimhelp))


def fortunes_book(deb: Path) -> bytes:
    files = deb_files(deb, lambda p: p.startswith("./usr/share/games/fortunes/") and "." not in Path(p).name
                    and Path(p).name not in FORTUNE_SKIP)
    return epub_bytes("urn:skipgate-train:fortunes", "Fortunes", "Various", "Debian package fortunes",
                      ["Fortunes"], fortunes(files))


BOOKS = {  # file name -> (package, how to make the EPUB from the .deb)
    "git-manual.epub": ("git-doc", git_book),
    "perl-tutorials.epub": ("perl-doc", perl_book),
    "gnu-standards.epub": ("gnu-standards", gnu_book),
    "vim-user-manual.epub": ("vim-runtime", vim_book),
    "fortunes.epub": ("fortunes", fortunes_book),
}


def main(argv: list[str] | None = None) -> int:
    return make_books(BOOKS, book_args(__doc__, "train_books", argv), "training books")


if __name__ == "__main__":
    sys.exit(main())
