"""EPUB -> clean text: `extract_text(path) -> Book(title, paragraphs)`; every bad input raises `EpubError`.

Follows container.xml -> OPF -> spine (zipfile + lxml). A Book's paragraphs are in spine order, one line each
(every block element ends one; `<br/>` is a line break inside one; `<pre>` keeps its lines); navigation, tables of
contents, page breaks and note markers are left out; Unicode punctuation is kept, Unicode spaces become plain
spaces, soft hyphens, zero-width and control characters are dropped. EpubError, naming the file and the problem:
DRM, a spine file missing from the archive, bytes no encoding decodes, U+FFFD in the file, a book with no text.
Why it is written by hand, and every rule: docs/corpus.md.
"""
from __future__ import annotations

import posixpath
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import lxml.html
from lxml import etree

from common.errors import ProjectError


class EpubError(ValueError, ProjectError):
    """A book that cannot be turned into text; the message names the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Book:
    title: str
    paragraphs: list[str]
    author: str = ""
    language: str = ""
    skipped: list[str] = field(default_factory=list)  # spine files left out (empty, TOC page, not XHTML)

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


HTML_TYPES = {"application/xhtml+xml", "text/html", "application/html+xml", "text/x-oeb1-document"}
FONT_EXTS = (".ttf", ".otf", ".woff", ".woff2", ".eot")
# Elements whose text is not prose.
SKIP = {"head", "title", "style", "script", "nav", "template", "noscript", "svg", "math", "rt", "rp",
        "object", "iframe", "select", "button", "textarea"}
# Inline elements continue the current paragraph; every other element (p, div, h1, li, blockquote, section,
# unknown tags, ...) is a block: it ends the paragraph before it and after it, so words are never glued.
INLINE = {"a", "abbr", "acronym", "b", "bdi", "bdo", "big", "cite", "code", "data", "del", "dfn", "em", "font",
          "i", "img", "ins", "kbd", "label", "mark", "nobr", "q", "rb", "ruby", "s", "samp", "small", "span",
          "strike", "strong", "sub", "sup", "time", "tt", "u", "var", "wbr", "br", "td", "th"}
# Navigation, page numbers and note markers marked as such (Sphinx's role="navigation" bars, EPUB3 epub:type).
SKIP_ROLES = {"navigation", "doc-toc", "doc-pagelist", "doc-pagebreak", "doc-noteref"}
SKIP_EPUB_TYPES = {"toc", "landmarks", "page-list", "pagebreak", "noteref"}
EPUB_TYPE = "{http://www.idpf.org/2007/ops}type"
TOC_MIN_LINKS, TOC_LINK_SHARE = 3, 0.7  # a spine page with >= 3 internal links making >= 70% of its text is a TOC
WS = re.compile(r"\s+")  # Unicode-aware: includes NBSP, narrow NBSP, figure space, tabs, newlines
# One str.translate table: drop soft hyphens, zero-width characters, BOMs and non-space control characters; map
# C1 controls to the cp1252 characters they stand for (five C1 codes have none: they stay, and are an error).
CLEAN = dict.fromkeys([0xAD, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF] + [c for c in range(32) if not chr(c).isspace()])
CLEAN.update({c: bytes([c]).decode("cp1252") for c in range(0x80, 0xA0) if c not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)})
BAD_CHARS = re.compile("[\x80-\x9f\ufffd]")
CP1252_LABELS = {"iso-8859-1", "iso8859-1", "latin-1", "latin1", "l1", "ascii", "us-ascii", "windows-1252", "cp1252"}
DECL = re.compile(rb"""<\?xml[^>]*encoding\s*=\s*["']([A-Za-z0-9._:-]+)["']|charset\s*=\s*["']?([A-Za-z0-9._:-]+)""")
XML_PARSER = etree.XMLParser(resolve_entities="internal", no_network=True, remove_comments=True, remove_pis=True)


def extract_text(path: str | Path) -> Book:
    """Read one EPUB in spine order into paragraphs. Raises EpubError for any unreadable or unusable book."""
    path = Path(path)
    if not path.is_file():
        raise EpubError(path, "no such file")
    if path.stat().st_size == 0:
        raise EpubError(path, "empty file (0 bytes)")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise EpubError(path, f"not a readable zip archive (corrupt, truncated or not an EPUB): {e}") from None
    with zf:
        return _read_book(_Archive(path, zf))


class _Archive:
    """The zip plus the error context: every failure names the EPUB file and the member involved."""

    def __init__(self, path: Path, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        self.names = set(zf.namelist())
        self.lower = {n.lower(): n for n in self.names}

    def fail(self, reason: str) -> EpubError:
        return EpubError(self.path, reason)

    def find(self, name: str) -> str | None:
        """The archive member for a resolved href: exact, else URL-decoded, else ignoring case and a leading "/"
        (books made on Windows/macOS file systems often get the case of an href wrong)."""
        for cand in (name, unquote(name)):
            if cand in self.names:
                return cand
        return self.lower.get(unquote(name).lstrip("/").lower())

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(name)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            # bad CRC, broken deflate stream, unknown compression method, password-protected member
            raise self.fail(f"corrupt archive member {name}: {e}") from None

    def xml(self, name: str, what: str) -> etree._Element:
        try:
            return etree.fromstring(self.read(name), XML_PARSER)
        except etree.XMLSyntaxError as e:
            detail = re.sub(r" \(<string>, line \d+\)$", "", str(e))  # lxml's location of an in-memory string
            raise self.fail(f"bad {what} XML in {name}: {detail}") from None


def _read_book(ar: _Archive) -> Book:
    if "META-INF/container.xml" not in ar.names:
        raise ar.fail("no META-INF/container.xml (not an EPUB, or a damaged one)")
    rootfiles = ar.xml("META-INF/container.xml", "container").findall(".//{*}rootfile[@full-path]")
    if not rootfiles:
        raise ar.fail("META-INF/container.xml names no OPF package file (rootfile)")
    opf_name = ar.find(rootfiles[0].get("full-path"))
    if opf_name is None:
        raise ar.fail(f"OPF package file {rootfiles[0].get('full-path')} named in container.xml is missing")
    opf = ar.xml(opf_name, "OPF")
    base = posixpath.dirname(opf_name)

    manifest = {}  # id -> (archive path without fragment, media type, properties)
    for item in opf.iterfind("{*}manifest/{*}item"):
        href = (item.get("href") or "").split("#", 1)[0]
        name = posixpath.normpath(posixpath.join(base, href)) if href else ""
        media = item.get("media-type", "").split(";")[0].strip().lower()
        manifest[item.get("id")] = (name, media, (item.get("properties") or "").split())
    spine = opf.find("{*}spine")
    if spine is None:
        raise ar.fail(f"OPF {opf_name} has no <spine> (reading order unknown)")
    itemrefs = spine.findall("{*}itemref")
    if not itemrefs:
        raise ar.fail(f"OPF {opf_name} has an empty <spine>")
    _check_drm(ar, manifest)

    book = Book(title=_meta(opf, "title") or ar.path.stem, paragraphs=[], author=_meta(opf, "creator"),
                language=_meta(opf, "language"))
    seen = set()
    for ref in itemrefs:
        idref = ref.get("idref")
        if idref not in manifest:
            raise ar.fail(f"spine refers to id {idref!r}, which is not in the OPF manifest")
        name, media, props = manifest[idref]
        if name in seen or ref.get("linear") == "no":
            continue
        seen.add(name)
        if "nav" in props or media not in HTML_TYPES:
            book.skipped.append(name)
            continue
        member = ar.find(name)
        if member is None:
            raise ar.fail(f"chapter {name or '(no href)'} (spine item {idref!r}) is missing from the archive")
        paragraphs, is_toc = _document_paragraphs(ar, member)
        if is_toc or not paragraphs:
            book.skipped.append(name)
            continue
        book.paragraphs.extend(paragraphs)
    if not book.paragraphs:
        raise ar.fail("no text found in any spine document")
    return book


def _meta(opf: etree._Element, dc_name: str) -> str:
    el = opf.find(f"{{*}}metadata//{{http://purl.org/dc/elements/1.1/}}{dc_name}")
    return " ".join((el.text or "").split()) if el is not None else ""


def _check_drm(ar: _Archive, manifest: dict) -> None:
    """encryption.xml listing anything but fonts means DRM: the text would come out as ciphertext."""
    if "META-INF/encryption.xml" not in ar.names:
        return
    fonts = {name for name, media, _ in manifest.values() if "font" in media or "opentype" in media}
    enc = ar.xml("META-INF/encryption.xml", "encryption")
    locked = [unquote(ref.get("URI", "")) for ref in enc.iterfind(".//{*}CipherReference")]
    locked = [name for name in locked if name not in fonts and not name.lower().endswith(FONT_EXTS)]
    if locked:
        shown = ", ".join(locked[:3]) + (" ..." if len(locked) > 3 else "")
        raise ar.fail(f"encrypted (DRM-protected) content, listed in META-INF/encryption.xml: {shown}")


def _document_paragraphs(ar: _Archive, member: str) -> tuple[list[str], bool]:
    """Paragraphs of one XHTML file, and whether it looks like a table of contents."""
    data = ar.read(member)
    if not data.strip():
        return [], False
    text = _decode(ar, member, data)
    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", text)  # lxml refuses str input that declares an encoding
    try:
        root = etree.fromstring(text, XML_PARSER)
    except etree.XMLSyntaxError:  # HTML-ish XHTML (&nbsp; without a DTD, unclosed tags): parse it as HTML
        try:
            root = lxml.html.document_fromstring(text)
        except (etree.ParserError, ValueError) as e:
            raise ar.fail(f"cannot parse chapter {member}: {e}") from None
    body = next(root.iter("{*}body"), root)
    walker = _Walker()
    walker.walk(body)
    walker.flush()
    bad = sorted({f"U+{ord(c):04X}" for p in walker.paragraphs for c in BAD_CHARS.findall(p)})
    if bad:
        raise ar.fail(f"chapter {member} contains {', '.join(bad)} (text corrupted by a wrong encoding)")
    is_toc = walker.links >= TOC_MIN_LINKS and walker.link_chars >= TOC_LINK_SHARE * walker.chars
    return walker.paragraphs, is_toc


def _decode(ar: _Archive, member: str, data: bytes) -> str:
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(enc)
            except UnicodeDecodeError as e:
                raise ar.fail(f"chapter {member} starts with a {enc} byte-order mark but is not {enc}: {e}") from None
    m = DECL.search(data[:1024])
    declared = (m.group(1) or m.group(2)).decode("ascii").lower() if m else "utf-8"
    if declared.startswith(("utf-16", "utf-32")):
        candidates = [declared]
    else:
        candidates = ["utf-8", "cp1252" if declared in CP1252_LABELS else declared, "cp1252"]
    for enc in dict.fromkeys(candidates):
        try:
            return data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
    raise ar.fail(f"chapter {member}: cannot decode text (declared {declared}; not valid UTF-8 or cp1252 either)")


class _Walker:
    """Collects paragraphs from an (X)HTML tree: blocks end paragraphs, <br/> ends a line, whitespace collapses."""

    def __init__(self):
        self.paragraphs: list[str] = []
        self.parts: list[str] = []
        self.pre = 0  # depth inside <pre>, where source newlines are real line breaks
        self.in_link = 0
        self.links = self.link_chars = self.chars = 0

    def add(self, text: str | None) -> None:
        if not text:
            return
        text = text.translate(CLEAN)
        if self.pre:
            text = "\n".join(WS.sub(" ", line) for line in text.split("\n"))
        else:
            text = WS.sub(" ", text)
        n = len(text.replace(" ", "").replace("\n", ""))
        self.chars += n
        if self.in_link:
            self.link_chars += n
        self.parts.append(text)

    def flush(self) -> None:
        """End the current paragraph; blank lines inside it (<br/><br/>, blank lines in <pre>) split it."""
        lines = [line.strip() for line in "".join(self.parts).split("\n")]
        self.parts.clear()
        block: list[str] = []
        for line in lines + [""]:
            if line:
                block.append(line)
            elif block:
                self.paragraphs.append("\n".join(block))
                block = []

    def walk(self, el: etree._Element) -> None:
        if not isinstance(el.tag, str):  # comment, processing instruction or entity: only its tail is text
            self.add(el.tail)
            return
        tag = el.tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower()  # {ns}p (XML) or epub:switch (HTML parser)
        if tag in SKIP or el.get("role") in SKIP_ROLES or SKIP_EPUB_TYPES & set(
                (el.get(EPUB_TYPE) or el.get("epub:type") or "").split()):
            self.add(el.tail)
            return
        block = tag not in INLINE
        link = tag == "a" and _internal(el.get("href"))
        if block:
            self.flush()
        elif tag == "br":
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")
        self.pre += tag == "pre"
        self.in_link += link
        self.links += link
        self.add(el.text)
        for child in el:
            self.walk(child)
        self.pre -= tag == "pre"
        self.in_link -= link
        if block:
            self.flush()
        self.add(el.tail)


def _internal(href: str | None) -> bool:
    return bool(href) and not re.match(r"[a-z][a-z0-9+.-]*:", href, re.I)  # no scheme: points into the book
