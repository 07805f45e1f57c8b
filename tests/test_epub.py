"""EPUB -> text: reading order, paragraphs, junk removal, encodings, real EPUBs from Debian, every broken input."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from corpus_tools.epub import Book, EpubError, extract_text

from fixtures_epub import (
    BROKEN,
    CP1252_BODY,
    CP1252_TEXT,
    PRIDE,
    PRIDE_TEXT,
    encryption_xml,
    make_broken,
    nav_xhtml,
    opf,
    paragraphs_xhtml,
    pride_epub,
    write_epub,
    xhtml,
)

DATA = Path(__file__).parent / "data"
CALIBRE = DATA / "calibre-quick-start-eng.epub"
LIVE_MANUAL = DATA / "live-manual.en.epub"


def one_chapter(tmp_path: Path, body: str | bytes, name: str = "book.epub", **kw) -> Book:
    return extract_text(write_epub(tmp_path / name, [("ch1.xhtml", body)], **kw))


# ------------------------------------------------------------------------------------------------ good books

def test_clean_book_keeps_paragraphs_and_typography(tmp_path):
    book = extract_text(pride_epub(tmp_path / "pride.epub"))
    assert book.title == "Pride and Prejudice" and book.author == "Jane Austen" and book.language == "en"
    assert book.paragraphs == ["Chapter 1", *PRIDE_TEXT[:8], "Chapter 2", *PRIDE_TEXT[8:]]
    assert book.text == "\n\n".join(book.paragraphs)
    assert "\u201cMy dear Mr. Bennet,\u201d" in book.text  # curly quotes kept, NBSP became a space
    assert "of it\u2014it was" in book.text and book.text.endswith("manner\u2026")  # em dash and ellipsis kept


def test_spine_order_wins_over_manifest_order(tmp_path):
    docs = [(f"part{i}.xhtml", paragraphs_xhtml([p])) for i, p in enumerate(PRIDE[:4])]
    path = write_epub(tmp_path / "b.epub", docs, manifest_order=[h for h, _ in reversed(docs)])
    assert extract_text(path).paragraphs == PRIDE_TEXT[:4]


def test_blocks_and_line_breaks_never_glue_words(tmp_path):
    body = ("<p>first</p><p>second</p><div>third<div>fourth</div>fifth</div>"
            "<p>line one<br/>line two</p><ul><li>item a</li><li>item b</li></ul><h2>Head</h2>tail"
            "<table><tr><td>cell1</td><td>cell2</td></tr></table><p>x<br/><br/>y</p>")
    assert one_chapter(tmp_path, xhtml(body)).paragraphs == [
        "first", "second", "third", "fourth", "fifth", "line one\nline two", "item a", "item b", "Head", "tail",
        "cell1 cell2", "x", "y"]


def test_hard_wraps_are_rejoined_and_inline_markup_kept_inline(tmp_path):
    body = "<p>It is a truth\n      universally <i>acknow</i>ledged,\n\tthat a <b>single</b>\r\n man</p>"
    assert one_chapter(tmp_path, xhtml(body)).paragraphs == [
        "It is a truth universally acknowledged, that a single man"]


def test_head_style_script_nav_and_ncx_are_not_text(tmp_path):
    head = "<style>p { color: red; }</style><script>var secret = 1;</script>"
    body = "<script>alert('x')</script><p>Real text.</p><nav><a href='#x'>Skip me</a></nav>"
    book = one_chapter(tmp_path, xhtml(body, title="HEAD TITLE", head=head))
    assert book.paragraphs == ["Real text."]  # the nav page in the spine and the NCX labels are gone too
    assert "OEBPS/nav.xhtml" in book.skipped


def test_marked_navigation_page_numbers_and_note_markers_are_not_text(tmp_path):
    body = ('<div role="navigation"><a href="c0.xhtml">previous</a> | <a href="c2.xhtml">next</a></div>'
            '<p>It is a truth<span epub:type="pagebreak" title="2">2</span> universally acknowledged'
            '<a epub:type="noteref" href="#n1">1</a>.</p><aside epub:type="footnote" id="n1">A note.</aside>')
    assert one_chapter(tmp_path, xhtml(body)).paragraphs == ["It is a truth universally acknowledged.", "A note."]


def test_nbsp_soft_hyphen_and_zero_width_characters(tmp_path):
    body = "<p>Mr.&#160;Bennet\u00a0and\u202fMrs. Ben\u00adnet\u200b said&nbsp;so</p>"
    # &nbsp; is not an XML entity: that chapter is parsed by the HTML parser instead
    assert one_chapter(tmp_path, xhtml(body)).paragraphs == ["Mr. Bennet and Mrs. Bennet said so"]


def test_fragment_and_url_encoded_hrefs(tmp_path):
    opf_text = opf([("a", "Chapter%20One.xhtml", "application/xhtml+xml", ""),
                    ("a2", "Chapter%20One.xhtml#part2", "application/xhtml+xml", ""),
                    ("b", "two.xhtml#start", "application/xhtml+xml", "")], ["a", "a2", "b"])
    path = write_epub(tmp_path / "b.epub", [], nav=False, opf_text=opf_text, extra={
        "OEBPS/Chapter One.xhtml": paragraphs_xhtml(PRIDE[:2]), "OEBPS/two.xhtml": paragraphs_xhtml(PRIDE[2:3])})
    assert extract_text(path).paragraphs == PRIDE_TEXT[:3]  # a file listed twice (with a fragment) is read once


def test_href_case_and_leading_slash_mismatches(tmp_path):
    opf_text = opf([("a", "Text/CHAPTER1.xhtml", "application/xhtml+xml", ""),
                    ("b", "/OEBPS/Text/two.xhtml", "application/xhtml+xml", "")], ["a", "b"])
    path = write_epub(tmp_path / "b.epub", [], nav=False, opf_text=opf_text, extra={
        "OEBPS/Text/chapter1.xhtml": paragraphs_xhtml(PRIDE[:1]), "OEBPS/Text/two.xhtml": paragraphs_xhtml(PRIDE[1:2])})
    assert extract_text(path).paragraphs == PRIDE[:2]


def test_non_linear_items_html_toc_pages_and_empty_chapters_are_skipped(tmp_path):
    toc = xhtml("<h1>Contents</h1>" + "".join(f'<p><a href="c{i}.xhtml">Chapter {i}</a></p>' for i in range(4)))
    docs = [("toc.xhtml", toc), ("c1.xhtml", paragraphs_xhtml(PRIDE[:1])), ("empty.xhtml", b""),
            ("blank.xhtml", xhtml("<div> </div>")), ("notes.xhtml", paragraphs_xhtml(["A note."])),
            ("c2.xhtml", paragraphs_xhtml(PRIDE[1:2]))]
    ids = {h: f"c{i}" for i, (h, _) in enumerate(docs)}
    opf_text = opf([(ids[h], h, "application/xhtml+xml", "") for h, _ in docs], list(ids.values()),
                   spine_attrs={ids["notes.xhtml"]: 'linear="no"'})
    book = extract_text(write_epub(tmp_path / "b.epub", docs, nav=False, opf_text=opf_text))
    assert book.paragraphs == PRIDE[:2]
    assert set(book.skipped) >= {"OEBPS/toc.xhtml", "OEBPS/empty.xhtml", "OEBPS/blank.xhtml"}


def test_link_rich_prose_is_not_mistaken_for_a_toc(tmp_path):
    body = "<p>" + " ".join(f'See <a href="c{i}.xhtml">here</a> for {PRIDE[i]}' for i in range(4)) + "</p>"
    assert len(one_chapter(tmp_path, xhtml(body), nav=False).paragraphs) == 1


def test_pre_keeps_its_lines(tmp_path):
    body = "<pre>line one\n    line two\n\nnext block</pre>"
    assert one_chapter(tmp_path, xhtml(body)).paragraphs == ["line one\nline two", "next block"]


def test_title_falls_back_to_file_name(tmp_path):
    opf_text = opf([("c", "c.xhtml", "application/xhtml+xml", "")], ["c"], title="")
    path = write_epub(tmp_path / "No Title.epub", [("c.xhtml", paragraphs_xhtml(PRIDE[:1]))], nav=False,
                      opf_text=opf_text)
    assert extract_text(path).title == "No Title"


# ------------------------------------------------------------------------------------------------ encodings



@pytest.mark.parametrize("decl", ["", '<?xml version="1.0" encoding="utf-8"?>\n',
                                  '<?xml version="1.0" encoding="windows-1252"?>\n',
                                  '<?xml version="1.0" encoding="iso-8859-1"?>\n'])
def test_cp1252_text_is_detected_whatever_the_declaration(tmp_path, decl):
    data = xhtml(CP1252_BODY, decl=decl).encode("cp1252")
    assert one_chapter(tmp_path, data).paragraphs == [CP1252_TEXT]


def test_utf8_text_declared_as_cp1252_is_read_as_utf8(tmp_path):
    data = xhtml(CP1252_BODY, decl='<?xml version="1.0" encoding="windows-1252"?>\n').encode("utf-8")
    assert one_chapter(tmp_path, data).paragraphs == [CP1252_TEXT]


def test_cp1252_character_references_become_the_characters_meant(tmp_path):
    assert one_chapter(tmp_path, xhtml("<p>&#147;Yes,&#148; she said&#151;twice&#133;</p>")).paragraphs == [
        "\u201cYes,\u201d she said\u2014twice\u2026"]


def test_utf16_with_bom(tmp_path):
    data = b"\xff\xfe" + xhtml(CP1252_BODY, decl="").encode("utf-16-le")
    assert one_chapter(tmp_path, data).paragraphs == [CP1252_TEXT]


# ------------------------------------------------------------------------------------------------ real EPUBs

def test_real_calibre_quick_start_guide():
    book = extract_text(CALIBRE)
    assert book.title == "Quick Start Guide" and book.author == "John Schember"
    assert book.paragraphs[:3] == ["Calibre Quick Start Guide", "Fourth Edition", "By: John Schember"]
    text = book.text
    assert "Table of Contents" not in text and "@page" not in text  # TOC page and cover CSS skipped
    assert text.index("Introduction") < text.index("Installing calibre") < text.index("Where to get help")
    assert "calibre\u2019s development" in text and "the Tower of eBabel" in text
    assert 4500 < len(text.split()) < 5500


def test_real_calibre_guide_loses_no_text_that_epub2txt_finds():
    """epub2txt glues and reorders, but on this clean book it sees all text: every paragraph of ours is in it."""
    from epub2txt import epub2txt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = "".join(epub2txt(str(CALIBRE)).split())
    assert all("".join(p.split()) in theirs for p in extract_text(CALIBRE).paragraphs)


def test_real_live_manual_with_fragment_hrefs():
    """Debian's live-manual lists each chapter many times as `chapter.xhtml#oNN` (epub2txt: KeyError)."""
    book = extract_text(LIVE_MANUAL)
    assert book.title == "Live Systems Manual"
    assert book.paragraphs.count("1.1 For the impatient") == 1
    assert book.text.index("1. About this manual") < book.text.index("3. Installation")
    assert book.skipped == ["OEBPS/index.xhtml"]  # the HTML table of contents
    intro = next(p for p in book.paragraphs if p.startswith("This manual serves as a single access point"))
    assert "\n" not in intro and "  " not in intro and intro.endswith("<http://debian-live.alioth.debian.org/>")


# ------------------------------------------------------------------------------------------------ broken books

@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_books_raise_epub_error_naming_file_and_problem(tmp_path, case):
    path, reason = make_broken(tmp_path)[case]
    with pytest.raises(EpubError) as info:
        extract_text(path)
    err = info.value
    assert isinstance(err, ValueError) and err.path == str(path)
    assert reason in err.reason and str(path) in str(err)


def test_missing_file_is_an_epub_error(tmp_path):
    with pytest.raises(EpubError, match="no such file"):
        extract_text(tmp_path / "nope.epub")


def test_an_empty_chapter_among_others_is_skipped(tmp_path):
    path = write_epub(tmp_path / "b.epub", [("a.xhtml", paragraphs_xhtml(PRIDE[:1])), ("e.xhtml", b""),
                                            ("b.xhtml", paragraphs_xhtml(PRIDE[1:2]))])
    assert extract_text(path).paragraphs == PRIDE[:2]


def test_obfuscated_fonts_are_not_drm(tmp_path):
    path = write_epub(tmp_path / "fonts.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE[:1]))], extra={
        "META-INF/encryption.xml": encryption_xml("OEBPS/fonts/serif.otf"), "OEBPS/fonts/serif.otf": b"\x00" * 64})
    assert extract_text(path).paragraphs == PRIDE[:1]


def test_spine_id_missing_from_manifest(tmp_path):
    opf_text = opf([("c", "ch1.xhtml", "application/xhtml+xml", "")], ["c", "ghost"])
    path = write_epub(tmp_path / "b.epub", [("ch1.xhtml", paragraphs_xhtml(PRIDE))], nav=False, opf_text=opf_text)
    with pytest.raises(EpubError, match="'ghost', which is not in the OPF manifest"):
        extract_text(path)


def test_nav_only_spine_is_no_text(tmp_path):
    opf_text = opf([("nav", "nav.xhtml", "application/xhtml+xml", "nav")], ["nav"])
    path = write_epub(tmp_path / "b.epub", [], nav=False, opf_text=opf_text,
                      extra={"OEBPS/nav.xhtml": nav_xhtml([("a.xhtml", "Chapter 1")])})
    with pytest.raises(EpubError, match="no text found"):
        extract_text(path)
