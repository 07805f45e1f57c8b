"""Corpus building: manifest and texts, failures in a batch, resume, atomic writes, splits, CLI, demo books."""
from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import struct
import types
import zlib
from pathlib import Path

import pytest

from common import files
from corpus_tools import corpus
from corpus_tools.corpus import assign_splits, books_of_split, build_corpus, load_manifest, main, read_book
from corpus_tools.epub import extract_text

from fixtures_epub import BROKEN, PRIDE, PRIDE_TEXT, make_broken, pride_epub
from helpers import call_main

ROOT = Path(__file__).resolve().parent.parent
TITLES = ["Pride and Prejudice", "Emma", "Persuasion", "Mansfield Park", "Northanger Abbey",
          "Sense and Sensibility", "Lady Susan"]


def library(folder: Path, titles: list[str] = TITLES) -> Path:
    """One small book per title (different titles, so different files)."""
    for t in titles:
        pride_epub(folder / f"{t}.epub", title=t)
    return folder


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_build_writes_texts_manifest_and_report(tmp_path):
    report = build_corpus([library(tmp_path / "books", TITLES[:3])], tmp_path / "out", progress=False)
    entries = load_manifest(tmp_path / "out")
    assert [e["title"] for e in entries] == ["Emma", "Persuasion", "Pride and Prejudice"]  # sorted file names
    e = entries[2]
    assert e["book_id"] == f"pride-and-prejudice-{e['sha256'][:8]}" and e["source"].endswith("Pride and Prejudice.epub")
    text = read_book(tmp_path / "out", e["book_id"])
    assert text == extract_text(e["source"]).text == "\n\n".join(["Chapter 1", *PRIDE_TEXT[:8], "Chapter 2",
                                                                   *PRIDE_TEXT[8:]])
    assert (e["chars"], e["words"], e["paragraphs"]) == (len(text), len(text.split()), 11)
    assert set(e) >= {"book_id", "title", "source", "sha256", "chars", "words", "paragraphs", "split"}
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == report and report["books"] == 3 and report["failed"] == []
    assert report["total"]["words"] == sum(e["words"] for e in entries)
    assert no_temp_files(tmp_path / "out")


def test_batch_goes_on_past_broken_books_and_reports_each(tmp_path):
    broken = make_broken(tmp_path / "broken")
    (tmp_path / "empty-folder").mkdir()
    inputs = [library(tmp_path / "good", TITLES[:2]), tmp_path / "broken", tmp_path / "not-there.epub",
              tmp_path / "empty-folder"]
    report = build_corpus(inputs, tmp_path / "out", progress=False)
    assert report["books"] == 2
    failed = {f["file"]: f["reason"] for f in report["failed"]}
    assert failed.pop(str(tmp_path / "not-there.epub")) == "no such file or folder"
    assert failed.pop(str(tmp_path / "empty-folder")) == "no .epub files in this folder"
    assert set(failed) == {str(path) for path, _ in broken.values()}
    for path, reason in broken.values():
        assert reason in failed[str(path)]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["failed"] == report["failed"]


def test_cli_exit_code_is_nonzero_only_when_nothing_converted(tmp_path, capsys):
    make_broken(tmp_path / "broken")
    assert main(["--epubs", str(tmp_path / "broken"), "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"train.py corpus: error: none of the {len(BROKEN)} EPUB file(s)")
    assert not (tmp_path / "o1").exists()  # a run that read no book leaves nothing behind
    pride_epub(tmp_path / "broken" / "pride.epub")
    assert main(["--epubs", str(tmp_path / "broken"), "--out", str(tmp_path / "o2"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 books" in out and f"{len(BROKEN)} failed" in out and "train" in out


def test_cli_counts_tokens_per_split(tmp_path, capsys, smollm2):
    books = library(tmp_path / "books", TITLES[:3])
    assert main(["--epubs", str(books), "--out", str(tmp_path / "out"), "--quiet", "--val", "0.34",
                 "--tokens-of", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    want: dict[str, int] = {}
    for e in load_manifest(tmp_path / "out"):
        n = len(smollm2.tokenizer(read_book(tmp_path / "out", e["book_id"])).input_ids)
        want[e["split"]] = want.get(e["split"], 0) + n
    assert len(want) >= 2
    for split, n in want.items():
        line = next(x for x in out.splitlines() if x.strip().startswith(split))
        assert f"{n:,} tokens (smollm2-135m)" in line


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: train.py corpus") and "--epubs PATH [PATH ...]" in out and "--pin" in out


def test_duplicate_files_count_once(tmp_path):
    books = library(tmp_path / "books", TITLES[:1])
    (books / "copy.epub").write_bytes((books / f"{TITLES[0]}.epub").read_bytes())
    report = build_corpus([books], tmp_path / "out", progress=False)
    assert report["books"] == 1 and len(report["duplicates"]) == 1


# ------------------------------------------------------------------------------------------------ resume, atomicity

def test_rerun_skips_books_converted_before(tmp_path, monkeypatch):
    books = library(tmp_path / "books", TITLES[:4])
    first = build_corpus([books], tmp_path / "out", progress=False)
    monkeypatch.setattr(corpus, "extract_text", lambda p: pytest.fail(f"converted {p} again"))
    second = build_corpus([books], tmp_path / "out", progress=False)
    assert (second["converted"], second["reused"]) == (0, 4)
    assert second["splits"] == first["splits"]


def test_rerun_converts_new_changed_and_damaged_books(tmp_path):
    books = library(tmp_path / "books", TITLES[:3])
    build_corpus([books], tmp_path / "out", progress=False)
    damaged = load_manifest(tmp_path / "out")[0]
    (tmp_path / "out" / "text" / f"{damaged['book_id']}.txt").write_text("half a bo")
    pride_epub(books / "new.epub", title="Lady Susan")
    report = build_corpus([books], tmp_path / "out", progress=False)
    assert (report["converted"], report["reused"]) == (2, 2)
    assert read_book(tmp_path / "out", damaged["book_id"]) == extract_text(damaged["source"]).text


def test_books_no_longer_given_stay_unless_pruned(tmp_path):
    books = library(tmp_path / "books", TITLES[:3])
    build_corpus([books], tmp_path / "out", progress=False)
    gone = load_manifest(tmp_path / "out")[0]
    Path(gone["source"]).unlink()
    report = build_corpus([books], tmp_path / "out", progress=False)
    assert (report["books"], report["kept"], report["pruned"]) == (3, 1, [])
    assert read_book(tmp_path / "out", gone["book_id"])  # kept: its text and its manifest entry
    report = build_corpus([books], tmp_path / "out", progress=False, prune=True)
    assert (report["books"], report["kept"], report["pruned"]) == (2, 0, [gone["book_id"]])
    assert gone["book_id"] not in {e["book_id"] for e in load_manifest(tmp_path / "out")}
    assert not (tmp_path / "out" / "text" / f"{gone['book_id']}.txt").exists()


def test_prune_refuses_an_input_that_reads_no_book(tmp_path):
    books = library(tmp_path / "books", TITLES[:3])
    build_corpus([books], tmp_path / "out", progress=False)
    before = files_of(tmp_path / "out")
    with pytest.raises(corpus.CorpusError, match="--prune.*no such file or folder.*unchanged"):
        build_corpus([books, tmp_path / "typo"], tmp_path / "out", progress=False, prune=True)
    assert files_of(tmp_path / "out") == before


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_typo_in_epubs_never_wipes_a_corpus(tmp_path):
    """Issue 13 case 1, through train.py: `train.py corpus --epubs MISSING --out EXISTING` emptied text/ and the
    manifest. Now it exits 2 with one error line and changes no byte; so does a folder of unreadable books."""
    books = library(tmp_path / "books", TITLES[:3])
    assert run_cli("corpus", "--epubs", books, "--out", tmp_path / "cc", "--quiet").returncode == 0
    before = files_of(tmp_path / "cc")
    assert len([f for f in before if f.startswith("text/")]) == 3
    make_broken(tmp_path / "broken")
    for bad in (tmp_path / "no_such", tmp_path / "broken"):
        r = run_cli("corpus", "--epubs", bad, "--out", tmp_path / "cc", "--quiet")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("train.py corpus: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert f"{tmp_path / 'cc'} is unchanged" in r.stderr
        assert files_of(tmp_path / "cc") == before
    r = run_cli("corpus", "--epubs", books / f"{TITLES[0]}.epub", "--out", tmp_path / "cc", "--quiet")
    assert r.returncode == 0 and "2 kept from earlier runs" in r.stdout  # one book given: the others stay
    assert len(load_manifest(tmp_path / "cc")) == 3


def test_help_documents_prune(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--prune" in capsys.readouterr().out


def run_cli(*args) -> types.SimpleNamespace:
    """`python train.py ARGS` run as train.py's main in this process (a fresh interpreter per run costs seconds):
    its exit status, stdout and stderr."""
    import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc, err = call_main(train.main, args)
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err)


def test_crash_mid_write_leaves_no_partial_file_or_manifest_line(tmp_path, monkeypatch):
    books = library(tmp_path / "books", TITLES[:4])
    calls = []

    def crash_on_third_file(fd):  # text 1, manifest, text 2 (crash: written, never renamed into place)
        calls.append(fd)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", crash_on_third_file)
    with pytest.raises(KeyboardInterrupt):
        build_corpus([books], tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert no_temp_files(out)
    entries = load_manifest(out)  # every line parses, and lists a complete text
    assert len(entries) == 1 and sorted(p.name for p in (out / "text").iterdir()) == [f"{entries[0]['book_id']}.txt"]
    assert read_book(out, entries[0]["book_id"]) == extract_text(entries[0]["source"]).text
    assert not (out / "report.json").exists()

    monkeypatch.undo()
    report = build_corpus([books], out, progress=False)
    assert (report["books"], report["reused"], report["converted"]) == (4, 1, 3)
    assert no_temp_files(out)


def test_failed_manifest_replace_keeps_the_old_manifest(tmp_path, monkeypatch):
    books = library(tmp_path / "books", TITLES[:2])
    build_corpus([books], tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "manifest.jsonl").read_bytes()
    pride_epub(books / "new.epub", title="Lady Susan")
    real_replace = files.os.replace

    def fail_manifest(src, dst):
        if Path(dst).name == "manifest.jsonl":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", fail_manifest)
    with pytest.raises(OSError, match="disk full"):
        build_corpus([books], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "manifest.jsonl").read_bytes() == before
    assert no_temp_files(tmp_path / "out")


# ------------------------------------------------------------------------------------------------ splits

def fake_books(n: int) -> list[dict]:
    return [{"book_id": f"book-{i}", "title": f"Book {i}", "sha256": f"{i:064x}"} for i in range(n)]


def test_split_is_by_book_and_covers_every_book(tmp_path):
    build_corpus([library(tmp_path / "books")], tmp_path / "out", val=0.3, test=0.3, progress=False)
    by_split = {s: books_of_split(tmp_path / "out", s) for s in ("train", "val", "test")}
    ids = [e["book_id"] for books in by_split.values() for e in books]
    assert sorted(ids) == sorted(e["book_id"] for e in load_manifest(tmp_path / "out"))  # each book exactly once
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [3, 2, 2]  # 7 books: 2.1 -> 2 each
    for e in ids:
        assert read_book(tmp_path / "out", e)  # whole books: every split's text is a full book file


@pytest.mark.parametrize("n, val, test, expected", [
    (1, 0.1, 0.1, (1, 0, 0)), (2, 0.1, 0.1, (2, 0, 0)), (3, 0.1, 0.1, (1, 1, 1)), (6, 0.1, 0.1, (4, 1, 1)),
    (10, 0.1, 0.2, (7, 1, 2)), (20, 0.25, 0.25, (10, 5, 5)), (5, 0.0, 0.1, (4, 0, 1)), (3, 0.5, 0.4, (1, 1, 1))])
def test_split_sizes(n, val, test, expected):
    splits = assign_splits(fake_books(n), val, test)
    assert tuple(splits.count(s) for s in ("train", "val", "test")) == expected


def test_split_is_deterministic_and_independent_of_input_order():
    books = fake_books(30)
    splits = dict(zip((b["book_id"] for b in books), assign_splits(books, 0.1, 0.1, seed=1)))
    shuffled = books[::-1]
    assert dict(zip((b["book_id"] for b in shuffled), assign_splits(shuffled, 0.1, 0.1, seed=1))) == splits
    assert any(assign_splits(books, 0.1, 0.1, seed=s) != assign_splits(books, 0.1, 0.1, seed=1) for s in (2, 3))


def test_split_keys_on_title_so_a_remade_epub_stays_in_its_split():
    books = fake_books(12)
    remade = [dict(b, sha256="f" * 64) if b["book_id"] == "book-3" else b for b in books]
    assert assign_splits(books, 0.2, 0.2) == assign_splits(remade, 0.2, 0.2)


def test_pins_go_first_and_count_towards_the_share():
    books = fake_books(10)
    splits = assign_splits(books, 0.1, 0.1, pins={"test": ["book 7"], "train": ["BOOK-0"]})
    assert splits[7] == "test" and splits[0] == "train" and splits.count("test") == 1 and splits.count("val") == 1
    with pytest.raises(ValueError, match="several splits"):
        assign_splits(books, 0.1, 0.1, pins={"test": ["book 7"], "val": ["7"]})


def test_cli_pins_and_fractions(tmp_path, capsys):
    books = library(tmp_path / "books")
    args = ["--epubs", str(books), "--out", str(tmp_path / "out"), "--quiet", "--val", "0", "--test", "0.3",
            "--pin", "test=persuasion", "--pin", "val=lady susan", "--pin", "test=no such book"]
    assert main(args) == 0
    splits = {e["title"]: e["split"] for e in load_manifest(tmp_path / "out")}
    assert splits["Persuasion"] == "test" and splits["Lady Susan"] == "val"
    assert list(splits.values()).count("test") == 2 and list(splits.values()).count("val") == 1
    assert "pin matched no book: test=no such book" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--epubs", str(books), "--out", str(tmp_path / "o"), "--pin", "dev=x"])


# ------------------------------------------------------------------------------------------------ demo books

def demo_module():
    spec = importlib.util.spec_from_file_location("make_demo_books", ROOT / "data" / "make_demo_books.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def r_serialize(value) -> bytes:
    """A minimal R XDR serializer (the inverse of make_demo_books.unserialize) for str/int lists and named lists."""
    def chars(s: str) -> bytes:
        return struct.pack(">ii", 0x40009, len(s.encode())) + s.encode()

    def item(v) -> bytes:
        if isinstance(v, dict):
            body = struct.pack(">ii", 19 | 1 << 9, len(v)) + b"".join(item(x) for x in v.values())
            names = struct.pack(">ii", 16, len(v)) + b"".join(chars(k) for k in v)
            return body + struct.pack(">i", 2 | 1 << 10) + struct.pack(">i", 1) + chars("names") + names + \
                struct.pack(">i", 254)
        if all(isinstance(x, int) for x in v):
            return struct.pack(f">ii{len(v)}i", 13, len(v), *v)
        return struct.pack(">ii", 16, len(v)) + b"".join(chars(x) for x in v)

    return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8" + item(value)


def test_demo_books_decoder_reads_r_lazy_load_files():
    mdb = demo_module()
    lines = {"prideprejudice": ["PRIDE AND PREJUDICE", "", "Chapter 1", "", "It is a truth"],
             "emma": ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse"]}
    rdb, index = b"", {}
    for name, value in lines.items():
        payload = r_serialize(value)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        index[name] = [len(rdb), len(record)]
        rdb += record
    rdx = gzip.compress(r_serialize({"variables": index, "references": {}, "compressed": [1]}))
    assert mdb.read_novels(rdx, rdb) == lines


def test_demo_book_epub_round_trips_through_extraction(tmp_path):
    mdb = demo_module()
    wrapped = ["PRIDE AND PREJUDICE", "", "By Jane Austen", "", "", "VOLUME I", "", "Chapter 1", "",
               "It is a truth universally acknowledged, that a single man in possession",
               "of a good fortune, must be in want of a _wife_.", "",
               "    My first doth affliction denote,", "      Which my second is destin'd to feel", "",
               "Chapter 2", "", "Mr. Bennet was among the earliest of all those who waited on", "Mr. Bingley."]
    path = tmp_path / "pride.epub"
    mdb.write_atomic(path, mdb.make_epub("prideprejudice", "Pride and Prejudice", wrapped))
    book = extract_text(path)
    assert (book.title, book.author, book.language) == ("Pride and Prejudice", "Jane Austen", "en")
    assert book.paragraphs == [
        "PRIDE AND PREJUDICE", "By Jane Austen", "VOLUME I", "Chapter 1", PRIDE[0],
        "My first doth affliction denote,\nWhich my second is destin'd to feel", "Chapter 2",
        "Mr. Bennet was among the earliest of all those who waited on Mr. Bingley."]
    assert len(book.text.split()) == len(" ".join(wrapped).replace("_", "").split())  # no word lost or glued
    assert path.read_bytes() == mdb.make_epub("prideprejudice", "Pride and Prejudice", wrapped)  # deterministic


@pytest.mark.skipif(not (ROOT / "data" / "books").is_dir(), reason="demo books not made (make books)")
def test_the_six_demo_novels_convert(tmp_path):
    report = build_corpus([ROOT / "data" / "books"], tmp_path / "out", progress=False)
    assert report["books"] == 6 and report["failed"] == []
    assert report["total"]["words"] == 717_537  # the word count of the janeaustenr text: nothing lost or glued
    assert [report["splits"][s]["books"] for s in ("train", "val", "test")] == [4, 1, 1]


def test_training_genres_strip_markup_and_keep_the_held_out_books_out():
    """data/make_train_books.py: POD, AsciiDoc and Vim help markup become plain paragraphs; a fortune that quotes
    a held-out book (Bierce's Devil's Dictionary, the Jargon File) is dropped; Latin-1 files and overstrikes read."""
    spec = importlib.util.spec_from_file_location("make_train_books", ROOT / "data" / "make_train_books.py")
    mtb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mtb)
    assert mtb.paragraphs(mtb.pod(["=head1 NAME", "", "Use B<strict> and C<< $x >> here.", "", "=cut"])) == \
        ["NAME", "Use strict and $x here."]
    assert mtb.paragraphs(mtb.asciidoc(["== Getting a repo", "[[anchor]]", "----", "See linkgit:git-log[1] and",
                                        "<<sec,the section>>."])) == ["Getting a repo", "See git-log and the section."]
    assert mtb.paragraphs(mtb.vimhelp(["*usr_01.txt*  For Vim", "=" * 20, "Type |:help| to read.~"])) == \
        ["For Vim", "Type :help to read."]
    files = {"./f/cookie": "A fine day.\n%\nCYNIC, n. A blackguard.\n\t\t-- Ambrose Bierce\n%\nOne\n  two\n".encode(),
             "./f/latin": "Caf\xe9 n_\bo_\bt\x07e\n%\n".encode("latin-1")}
    paras = [p for _, ps in mtb.fortunes(files) for p in ps]
    assert paras == ["A fine day.", "One\n  two", "Café note"]
