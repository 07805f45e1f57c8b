"""Output paths checked before any work, and one writer per output folder (common/files.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.files import (
    FileLock,
    FolderLock,
    LockedError,
    OutputPathError,
    atomic_path,
    check_output_dir,
    check_output_file,
    write_text,
)

from helpers import hold_lock, kill, unwritable

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
    with FileLock(tmp_path / "b" / "r.jsonl", "infer.py --output b/r.jsonl"):
        assert (tmp_path / "b" / ".r.jsonl.lock").is_file()
        with pytest.raises(LockedError, match=r"in use by infer.py --output b/r.jsonl"):
            FileLock(tmp_path / "a" / "r2.jsonl").acquire()
    assert sorted(os.listdir(tmp_path / "a")) == ["r2.jsonl"] and os.listdir(tmp_path / "b") == ["r.jsonl"]


# ------------------------------------------------------------------------------------------------ issue 29
def test_a_hard_link_is_the_same_file_to_the_lock(tmp_path):
    """Case 3: a hard link is another path to the same inode: the lock is on the file (device, inode) as well
    as on its real path, and follows the file through an atomic rewrite (a new inode under the path)."""
    (tmp_path / "a").mkdir()
    out, link = tmp_path / "out.jsonl", tmp_path / "a" / "link.jsonl"
    out.write_text("")
    os.link(out, link)
    with FileLock(out, "infer.py --output out.jsonl") as lock:
        with pytest.raises(LockedError, match=r"link.jsonl: in use by .* \(pid \d+\) writing the same file under "
                                              r"another name \(a hard link: device \d+, inode \d+\)"):
            FileLock(link).acquire()
        write_text(out, "repaired\n")      # a repair: `out` is a new inode now, the link keeps the old one
        os.link(out, tmp_path / "a" / "link2.jsonl")
        lock.follow()
        with pytest.raises(LockedError, match="a hard link"):
            FileLock(tmp_path / "a" / "link2.jsonl").acquire()
        with pytest.raises(LockedError, match="in use by infer.py --output out.jsonl"):
            FileLock(out).acquire()       # the path lock
    with FileLock(tmp_path / "a" / "link2.jsonl"):   # released: free again
        pass
    assert sorted(os.listdir(tmp_path / "a")) == ["link.jsonl", "link2.jsonl"]


def test_names_near_the_file_systems_limit(tmp_path):
    """Case 9: a name of 250 bytes is legal; the names derived from it (its temporary file, its lock) are
    shortened to fit, the same for every process; a name past the limit is refused before any work."""
    name = "r" * 250
    out = tmp_path / name
    assert check_output_file(out, "--output") == out
    write_text(out, "x\n")                          # its temporary name would be 250 + 21 bytes
    with atomic_path(out) as tmp:
        assert len(tmp.name) <= 255
        tmp.write_text("y\n")
    assert out.read_text() == "y\n"
    with FileLock(out, "infer.py") as lock:
        assert len(lock.file.name) <= 255 and lock.file.is_file()
        with pytest.raises(LockedError):
            FileLock(out).acquire()                  # the same shortened name: the same lock
    with pytest.raises(OutputPathError, match=rf"^--output's summary .*: a name of 263 bytes, more than the 255 "):
        check_output_file(f"{out}.summary.json", "--output's summary")
    assert sorted(os.listdir(tmp_path)) == [name]


def test_an_existing_file_that_cannot_be_written_is_refused(tmp_path):
    """Case 9: an output that exists but cannot be written (chattr +i, which stops root too; or read-only for
    another user) is refused when it is checked, not when the results are written."""
    out = tmp_path / "out.jsonl"
    out.write_text("x\n")
    with unwritable(out):
        with pytest.raises(OutputPathError, match=r"^--output .*out.jsonl: cannot be written \((Operation not "
                                                  r"permitted|Permission denied)\)"):
            check_output_file(out, "--output")
    assert out.read_text() == "x\n"
