"""Builds EPUB files for the tests, byte by byte with zipfile, so that broken ones can be made as easily as good
ones. The text is the opening of Pride and Prejudice (public domain) with typographic quotes and dashes."""
from __future__ import annotations

import html
import io
import zipfile
from pathlib import Path

PRIDE = [  # chapter 1 and the start of chapter 2
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood, this "
    "truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters.",
    "\u201cMy dear Mr.\u00a0Bennet,\u201d said his lady to him one day, \u201chave you heard that Netherfield Park "
    "is let at last?\u201d",
    "Mr. Bennet replied that he had not.",
    "\u201cBut it is,\u201d returned she; \u201cfor Mrs. Long has just been here, and she told me all about it.\u201d",
    "Mr. Bennet made no answer.",
    "\u201cDo you not want to know who has taken it?\u201d cried his wife impatiently.",
    "\u201cYou want to tell me, and I have no objection to hearing it.\u201d",
    "Mr. Bennet was among the earliest of all those who waited on Mr. Bingley. He had always intended to visit "
    "him, though to the last always assuring his wife that he should not go; and till the evening after the visit "
    "was paid she had no knowledge of it\u2014it was then disclosed in the following manner\u2026",
]
PRIDE_TEXT = [p.replace("\u00a0", " ") for p in PRIDE]  # what extraction gives back: NBSP becomes a space
CP1252_BODY = "<p>\u201cMy dear Mr. Bennet,\u201d said his lady\u2014\u2018have you heard?\u2019</p>"
CP1252_TEXT = "\u201cMy dear Mr. Bennet,\u201d said his lady\u2014\u2018have you heard?\u2019"
CONTAINER = """<?xml version="1.0" encoding="UTF-8"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
  <rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>
</container>"""


def xhtml(body: str, title: str = "Chapter", head: str = "", decl: str = '<?xml version="1.0" encoding="utf-8"?>\n'
          ) -> str:
    """A chapter document; `body` is inserted as is."""
    return (f'{decl}<html xmlns="http://www.w3.org/1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops">\n'
            f"<head><title>{title}</title>{head}</head>\n<body>{body}</body>\n</html>\n")


def paragraphs_xhtml(paragraphs: list[str], heading: str | None = None, title: str = "Chapter") -> str:
    body = f"<h1>{html.escape(heading)}</h1>" if heading else ""
    body += "\n".join(f"<p>{html.escape(p, quote=False)}</p>" for p in paragraphs)
    return xhtml(body, title=title)


def nav_xhtml(entries: list[tuple[str, str]]) -> str:
    items = "".join(f'<li><a href="{href}">{html.escape(label)}</a></li>' for href, label in entries)
    return xhtml(f'<nav epub:type="toc" id="toc"><h1>Table of Contents</h1><ol>{items}</ol></nav>', title="Contents")


def ncx(entries: list[tuple[str, str]]) -> str:
    points = "".join(f'<navPoint id="n{i}" playOrder="{i}"><navLabel><text>{html.escape(label)}</text></navLabel>'
                     f'<content src="{href}"/></navPoint>' for i, (href, label) in enumerate(entries, 1))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<ncx xmlns="http://www.daisy.org/z3986/2005/ncx/" version="2005-1">'
            f'<head/><docTitle><text>NCX Title</text></docTitle><navMap>{points}</navMap></ncx>')


def opf(manifest: list[tuple[str, str, str, str]], spine: list[str] | None, title: str = "Pride and Prejudice",
        spine_attrs: dict[str, str] | None = None) -> str:
    """manifest: (id, href, media-type, properties); spine: idrefs (None: no <spine> element at all)."""
    props = {i: f' properties="{p}"' if p else "" for i, _, _, p in manifest}
    items = "".join(f'<item id="{i}" href="{h}" media-type="{m}"{props[i]}/>' for i, h, m, _ in manifest)
    refs = "".join(f'<itemref idref="{i}" {(spine_attrs or {}).get(i, "")}/>' for i in spine or [])
    spine_xml = "" if spine is None else f'<spine toc="ncx">{refs}</spine>'
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<package xmlns="http://www.idpf.org/2007/opf" version="3.0" '
            f'unique-identifier="id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/">'
            f'<dc:identifier id="id">urn:test:{html.escape(title)}</dc:identifier><dc:title>{title}</dc:title>'
            f'<dc:creator>Jane Austen</dc:creator><dc:language>en</dc:language></metadata>'
            f"<manifest>{items}</manifest>{spine_xml}</package>")


def write_epub(path: Path, docs: list[tuple[str, str | bytes]], *, title: str = "Pride and Prejudice",
               manifest_order: list[str] | None = None, nav: bool = True, nav_in_spine: bool = True,
               opf_text: str | None = None, container: str | None = CONTAINER,
               extra: dict[str, str | bytes] | None = None, omit: tuple[str, ...] = ()) -> Path:
    """An EPUB 3 whose spine lists `docs` (href, content) in order; the manifest may list them in another order.

    nav adds nav.xhtml (properties="nav", placed in the spine first when nav_in_spine) and an NCX; opf_text
    replaces the package document; container=None leaves META-INF/container.xml out; omit leaves members out of
    the zip while the manifest still lists them; extra adds members as they are.
    """
    hrefs = [h for h, _ in docs]
    ids = {h: f"c{i}" for i, h in enumerate(hrefs)}
    manifest = [(ids[h], h, "application/xhtml+xml", "") for h in (manifest_order or hrefs)]
    spine = [ids[h] for h in hrefs]
    files: dict[str, str | bytes] = {f"OEBPS/{h.split('#')[0]}": c for h, c in docs}
    if nav:
        entries = [(h, f"Chapter {i}") for i, h in enumerate(hrefs, 1)]
        manifest += [("nav", "nav.xhtml", "application/xhtml+xml", "nav"),
                     ("ncx", "toc.ncx", "application/x-dtbncx+xml", "")]
        spine = ["nav", *spine] if nav_in_spine else spine
        files["OEBPS/nav.xhtml"] = nav_xhtml(entries)
        files["OEBPS/toc.ncx"] = ncx(entries)
    files["OEBPS/content.opf"] = opf_text if opf_text is not None else opf(manifest, spine, title)
    if container is not None:
        files["META-INF/container.xml"] = container
    files.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        for name, content in files.items():
            if name not in omit:
                zf.writestr(name, content)
    return path


def pride_epub(path: Path, title: str = "Pride and Prejudice") -> Path:
    """A clean two-chapter book."""
    return write_epub(path, [("ch1.xhtml", paragraphs_xhtml(PRIDE[:8], "Chapter 1")),
                             ("ch2.xhtml", paragraphs_xhtml(PRIDE[8:], "Chapter 2"))], title=title)


# ------------------------------------------------------------------------------------------------ broken books

def _good(tmp_path: Path) -> bytes:
    """A good book's bytes (the file is removed, so that a folder of broken books holds no good one)."""
    path = pride_epub(tmp_path / "source.epub")
    data = path.read_bytes()
    path.unlink()
    return data


def _bad_crc(tmp_path: Path) -> bytes:
    data = bytearray(_good(tmp_path))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("OEBPS/ch1.xhtml")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 10:start + 20] = b"\x00" * 10  # damage the deflate stream inside the archive
    return bytes(data)


def _opf_without_spine() -> str:
    return opf([("c", "ch1.xhtml", "application/xhtml+xml", "")], None)


BROKEN = {  # name -> (builder(tmp_path) -> path, words expected in the reason)
    "empty": (lambda t: _write(t, "empty.epub", b""), "empty file"),
    "not_zip": (lambda t: _write(t, "notes.epub", b"Chapter 1\nIt is a truth universally acknowledged\n"), "zip"),
    "truncated": (lambda t: _write(t, "truncated.epub", _good(t)[:1500]), "zip"),
    "corrupt_member": (lambda t: _write(t, "crc.epub", _bad_crc(t)), "corrupt archive member OEBPS/ch1.xhtml"),
    "no_container": (lambda t: write_epub(t / "nocontainer.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE))],
                                          container=None), "no META-INF/container.xml"),
    "no_opf": (lambda t: write_epub(t / "noopf.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE))],
                                    omit=("OEBPS/content.opf",)), "OPF package file OEBPS/content.opf"),
    "bad_container": (lambda t: write_epub(t / "badcont.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE))],
                                           container=CONTAINER[:-20]), "bad container XML"),
    "bad_opf": (lambda t: write_epub(t / "badopf.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE))],
                                     opf_text="<package><manifest><item id='a'></manifest>"), "bad OPF XML"),
    "no_spine": (lambda t: write_epub(t / "nospine.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE))], nav=False,
                                      opf_text=_opf_without_spine()), "no <spine>"),
    "missing_chapter": (lambda t: write_epub(t / "missing.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE[:2])),
                                                                  ("ch2.xhtml", paragraphs_xhtml(PRIDE[2:]))],
                                             omit=("OEBPS/ch2.xhtml",)),
                        "chapter OEBPS/ch2.xhtml (spine item 'c1') is missing"),
    "only_empty_chapters": (lambda t: write_epub(t / "hollow.epub", [("a.xhtml", b""), ("b.xhtml", xhtml(""))]),
                            "no text found"),
    "drm": (lambda t: write_epub(t / "drm.epub", [("ch1.xhtml", bytes(range(256)) * 8)], extra={
        "META-INF/encryption.xml": encryption_xml("OEBPS/ch1.xhtml")}), "encrypted (DRM-protected)"),
    "undecodable": (lambda t: _write_chapter(t, "undecodable.epub", xhtml(CP1252_BODY).encode("cp1252")
                                             .replace(b"said", b"sa\x81\x8d")), "cannot decode"),
    "replacement_char": (lambda t: _write_chapter(t, "fffd.epub", xhtml("<p>Mr. Bennet\ufffds wife</p>")),
                         "U+FFFD"),
    "undefined_c1_reference": (lambda t: _write_chapter(t, "c1.epub", xhtml("<p>bad &#129; here</p>")), "U+0081"),
}


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _write_chapter(tmp_path: Path, name: str, chapter: str | bytes) -> Path:
    return write_epub(tmp_path / name, [("ch1.xhtml", chapter)])


def encryption_xml(*uris: str) -> str:
    refs = "".join(f'<enc:EncryptedData><enc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>'
                   f'<enc:CipherData><enc:CipherReference URI="{u}"/></enc:CipherData></enc:EncryptedData>'
                   for u in uris)
    return ('<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
            f'xmlns:enc="http://www.w3.org/2001/04/xmlenc#">{refs}</encryption>')


def make_broken(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Every broken case, built in its own folder: name -> (path, expected reason words)."""
    out = {}
    for name, (build, reason) in BROKEN.items():
        folder = tmp_path / name
        folder.mkdir(parents=True)
        out[name] = (build(folder), reason)
    return out
