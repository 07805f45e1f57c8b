"""Output paths checked before any work, and one writer per output folder (common/files.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.files import FolderLock, LockedError, OutputPathError, check_output_dir, check_output_file

from helpers import hold_lock, kill

ROOT = Path(__file__).resolve().parents[1]
def test_output_folder_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_dir(tmp_path) == tmp_path
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["file"]  # creates nothing, no probe left
    with pytest.raises(OutputPathError, match=r"^--out .*file: exists and is not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputPathError, match=r"^--records-out .*file/x/y: cannot create this folder: .*file is a"):
        check_output_dir(tmp_path / "file" / "x" / "y", "--records-out")
    with pytest.raises(OutputPathError, match="^--out /proc/x: cannot write in /proc"):
        check_output_dir("/proc/x")


def test_output_file_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_output_file(tmp_path / "file", "--json") == tmp_path / "file"  # overwritten, atomically
    assert check_output_file(tmp_path / "new" / "r.json", "--json") == tmp_path / "new" / "r.json"
    with pytest.raises(OutputPathError, match=r"^--json .*: folder .*new does not exist"):
        check_output_file(tmp_path / "new" / "r.json", "--json", parents=False)
    with pytest.raises(OutputPathError, match="is a folder; name a file"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(OutputPathError, match="file is a file, not a folder"):
        check_output_file(tmp_path / "file" / "r.json", "--json")
    with pytest.raises(OutputPathError, match="^--json /proc/x.json: cannot write in /proc"):
        check_output_file("/proc/x.json", "--json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(OutputPathError, match="cannot write in"):
        check_output_dir(tmp_path / "ro" / "out")


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    holder = hold_lock(tmp_path / "out")
    try:
        with pytest.raises(LockedError, match=rf"out: in use by train.py record \(pid {holder.pid} on "):
            FolderLock(tmp_path / "out", "train.py record").acquire()
        with pytest.raises(LockedError):  # nor a second one in this process
            FolderLock(tmp_path / "out").acquire()
    finally:
        kill(holder)


def test_a_dead_writers_lock_does_not_block_a_resume(tmp_path):
    kill(hold_lock(tmp_path / "out"))
    lock_file = tmp_path / "out" / FolderLock.NAME
    assert lock_file.is_file() and json.loads(lock_file.read_text())["what"] == "train.py record"
    with FolderLock(tmp_path / "out", "resume") as lock:
        assert lock.held and json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()
    lock_file.write_text("garbage, not JSON")  # e.g. an old-style or hand-made lock file nobody holds
    with FolderLock(tmp_path / "out"):
        pass


def test_lock_is_reentrant_after_release_and_leaves_no_empty_folder(tmp_path):
    with FolderLock(tmp_path / "made" / "here"):
        assert (tmp_path / "made" / "here").is_dir()
    assert not (tmp_path / "made" / "here").exists()  # created by the lock, nothing written: removed again
    (tmp_path / "kept").mkdir()
    for _ in range(2):
        with FolderLock(tmp_path / "kept"):
            (tmp_path / "kept" / "data").write_text("x")
    assert os.listdir(tmp_path / "kept") == ["data"]


# ------------------------------------------------------------------------------------------------ issue 22
def test_a_write_through_a_link_updates_the_real_file(tmp_path):
    """Case 3: a symlinked output stays a link; the file it names gets the new content (not a detached copy)."""
    from common.files import atomic_dir, write_text

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "r.jsonl").write_text("old\n")
    link = tmp_path / "r.jsonl"
    link.symlink_to(tmp_path / "real" / "r.jsonl")
    write_text(link, "new\n")
    assert link.is_symlink() and (tmp_path / "real" / "r.jsonl").read_text() == "new\n"
    assert os.listdir(tmp_path / "real") == ["r.jsonl"]                      # no temporary file left
    dangling = tmp_path / "later.json"
    dangling.symlink_to(tmp_path / "real" / "later.json")                    # a link to a file not written yet
    write_text(dangling, "{}\n")
    assert dangling.is_symlink() and (tmp_path / "real" / "later.json").read_text() == "{}\n"
    (tmp_path / "dir_link").symlink_to(tmp_path / "real" / "folder")
    with atomic_dir(tmp_path / "dir_link") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "dir_link").is_symlink() and (tmp_path / "real" / "folder" / "x").is_file()


def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path):
    """Case 1: a FIFO stands in for /dev/null (a device), a link to it for /dev/stdout on a pipe: refused, so
    no writer renames a file onto them; '-' passes where the caller streams to stdout."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "stdout").symlink_to(fifo)
    for p in (fifo, tmp_path / "stdout"):
        with pytest.raises(OutputPathError, match=r"^--json .*: is a FIFO \(named pipe\), not a regular file; "
                                                  "writing would replace it"):
            check_output_file(p, "--json")
        with pytest.raises(OutputPathError, match=r"is a FIFO \(named pipe\), not a folder"):
            check_output_dir(p)
    with pytest.raises(OutputPathError, match=r"is a character device, not a regular file; .*or '-' for stdout"):
        check_output_file("/dev/null", "--output", stdout=True)
    assert check_output_file("-", "--output", stdout=True) == Path("-")
    assert (tmp_path / "stdout").is_symlink() and fifo.is_fifo()


def test_two_names_of_one_file_are_one_lock(tmp_path):
    """Case 2: the lock of an output file is named after the real path, whatever name reached it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "r.jsonl").write_text("")
    (tmp_path / "a" / "r2.jsonl").symlink_to(tmp_path / "b" / "r.jsonl")
    with FolderLock.of_file(tmp_path / "b" / "r.jsonl", "infer.py --output b/r.jsonl"):
        assert (tmp_path / "b" / ".r.jsonl.lock").is_file()
        with pytest.raises(LockedError, match=r"in use by infer.py --output b/r.jsonl"):
            FolderLock.of_file(tmp_path / "a" / "r2.jsonl").acquire()
    assert sorted(os.listdir(tmp_path / "a")) == ["r2.jsonl"] and os.listdir(tmp_path / "b") == ["r.jsonl"]
