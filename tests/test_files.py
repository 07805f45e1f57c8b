"""Output paths checked before any work, and one writer per output folder (corpus_tools/files.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corpus_tools.files import FolderLock, LockedError, OutputPathError, check_output_dir, check_output_file

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from corpus_tools.files import FolderLock; "
        "FolderLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); time.sleep(120)")


def hold_lock(folder: Path, what: str = "train.py record") -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), what], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays behind, naming a dead pid
    p.wait()
    p.stdout.close()


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
