"""Writing outputs safely: no reader ever sees half a file, and one writer per output folder.

    write_text(path, text) / write_bytes(path, data) / write_json(path, obj)
    with atomic_path(path) as tmp: save_file(tensors, tmp)     # for libraries that write to a path
    with atomic_dir(path) as tmp: ...fill tmp...                # a whole folder, renamed into place
    with FolderLock(out, "train.py record"): ...                # refuses a second writer, naming the first
    with FileLock(path, "infer.py --output") as lock: ...       # one output file: every name of it (lock.follow())
    check_output_dir(out, "--out") / check_output_file(path, "--json")    # before any work: a typo fails at once

A file is written to a temporary name in its folder and renamed into place, with the mode open() would give it; a
dead process's lock does not block a resume; symlinks are resolved first (real_path); a path that is neither a
regular file nor a folder, or not writable, or a name longer than its file system takes, is refused with
OutputPathError naming the flag; the names derived from a path (temporary files, lock files) are shortened to
fit. Why: docs/files.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np

from common.errors import ProjectError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def real_path(path: str | Path) -> Path:
    """`path` with every symlink resolved (a dangling link: its target), absolute: where a writer writes."""
    return Path(os.path.realpath(path))


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of `folder` (or of its nearest existing ancestor) takes."""
    try:
        return os.pathconf(_nearest_existing(Path(folder)), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def fit_name(folder: Path, name: str, extra: int) -> str:
    """`name`, or when `extra` more bytes would not fit in a file name of `folder`, its head and a hash of the
    whole (the same for every process): the stem of a name derived from `name` (a temporary file, a lock)."""
    limit = name_max(folder) - extra
    if len(os.fsencode(name)) <= limit:
        return name
    tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    head = name
    while head and len(os.fsencode(head + tag)) > limit:
        head = head[:-1]
    return head + tag


def _tmp_name(path: Path) -> Path:
    suffix = f".{os.getpid()}-{secrets.token_hex(4)}.tmp"
    return path.with_name(f".{fit_name(path.parent, path.name, 1 + len(suffix))}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path` (links resolved: beside the real file); on success it is renamed onto
    the real file, on error removed."""
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (which must not exist
    or be an empty folder; links resolved), on error it is removed."""
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    """UTF-8, '\\n' line ends whatever the platform."""
    write_bytes(path, text.encode("utf-8"))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, np.bool_)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def json_text(obj, indent: int | None = 1) -> str:
    """JSON (numpy scalars/arrays and paths allowed), without escaping, a newline at the end: write_json's text,
    also for a caller that writes it to stdout ('-')."""
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n"


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """json_text, UTF-8."""
    write_text(path, json_text(obj, indent))


def write_result(out: str | Path, obj, md: str) -> None:
    """A benchmark's result: OUT.json (obj) and OUT.md (md), each atomically; the markdown is printed too."""
    write_json(Path(out).with_suffix(".json"), obj)
    write_text(Path(out).with_suffix(".md"), md)
    print(md)


def save_tensors(tensors: dict, path: str | Path) -> None:
    """A safetensors file, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


class OutputPathError(ValueError, ProjectError):
    """An output path that cannot be written (a file where a folder belongs, a read-only place, ...)."""


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists (or is a dangling link), else its nearest existing ancestor."""
    p = path
    while not os.path.lexists(p):   # (False, not an error, for a name too long to exist)
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_writable(folder: Path, shown: Path, flag: str) -> None:
    """Create and remove a temporary file in `folder`: the only test that answers as root, on read-only mounts
    and in /proc alike (os.access says yes to root everywhere)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".skipgate-probe-", dir=folder)
    except OSError as e:
        raise OutputPathError(f"{flag} {shown}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def _probe_file(path: Path, shown: Path, flag: str) -> None:
    """Open an existing file for writing (nothing written, nothing truncated): refuses a read-only or immutable
    file (chattr +i, which even root cannot write or replace)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as e:
        raise OutputPathError(f"{flag} {shown}: cannot be written ({e.strerror or e}); name another file") from None


SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
           (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: str | Path) -> str | None:
    """What `path` is (links followed) when it exists and is neither a regular file nor a folder, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((name for test, name in SPECIAL if test(mode)), "not a regular file")


def _check_output(shown: Path, flag: str, want_dir: bool, hint: str = "") -> Path:
    kind = "folder" if want_dir else "file"
    special = special_kind(shown)
    if special:
        want = "a folder" if want_dir else "a regular file"
        raise OutputPathError(f"{flag} {shown}: is {special}, not {want}; writing would replace it "
                              f"(name {want}{hint})")
    path = real_path(shown)
    size, limit = len(os.fsencode(path.name)), name_max(path.parent)
    if size > limit:
        raise OutputPathError(f"{flag} {shown}: a name of {size} bytes, more than the {limit} its file system "
                              "takes; name a shorter one")
    existing = _nearest_existing(path)
    if existing == path:
        if want_dir and not path.is_dir():
            raise OutputPathError(f"{flag} {shown}: exists and is not a folder; name a folder (new or to resume)")
        if not want_dir and path.is_dir():
            raise OutputPathError(f"{flag} {shown}: is a folder; name a file")
        if not want_dir:
            _probe_file(path, shown, flag)
        folder = path if want_dir else path.parent
    else:
        if not existing.is_dir():
            raise OutputPathError(f"{flag} {shown}: cannot create this {kind}: {existing} is a file, not a folder")
        folder = existing
    _probe_writable(folder, shown, flag)
    return shown


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Check, before any work, that `path` is an output folder this process can create or write into: it is a
    folder or does not exist, no ancestor is a file, and the nearest existing folder takes a new file (links
    resolved; a device, FIFO or socket is refused). Creates nothing; raises OutputPathError naming `flag` and the
    path. Returns the path."""
    return _check_output(Path(path), flag, want_dir=True)


def check_output_file(path: str | Path, flag: str = "--out", *, parents: bool = True, stdout: bool = False) -> Path:
    """Check, before any work, that `path` is a file this process can write: a regular file (links resolved) or
    new, not a folder, device, FIFO or socket, no ancestor is a file, and its folder (or, with `parents`, the
    nearest existing ancestor, as atomic_path creates missing folders) takes a new file. parents=False also
    refuses a missing folder (a typo there should not create folders). stdout=True accepts '-' (the caller
    streams to stdout). Creates nothing; raises OutputPathError naming `flag` and the path. Returns the path."""
    if stdout and str(path) == "-":
        return Path("-")
    path = Path(path)
    if not parents and not path.parent.is_dir() and not path.parent.is_symlink():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise OutputPathError(f"{flag} {path}: folder {path.parent} {what}")
    return _check_output(path, flag, want_dir=False, hint=", or '-' for stdout" if stdout else "")


class LockedError(RuntimeError, ProjectError):
    """Another live process holds the lock of an output folder; the message names it."""


class FolderLock:
    """An exclusive lock on an output folder: `OUT/.lock`, flock()ed while held, holds the owner's pid, host and
    command (for the message a second writer gets).

    Why flock and not a pid file alone: the kernel drops a process's flock when it dies, however it dies, so a
    lock file left by a killed run (dead pid) never blocks a resume and nothing has to guess whether a pid is
    still the same process; and taking it is atomic, so two runs started together cannot both win (a pid file
    that is read, judged stale and replaced can be taken twice). The file is removed on release; a taker
    checks after flock() that the path still names the file it locked (the holder may have just removed it).
    Use as a context manager. Processes of one multi-process run share one lock: only the main one takes it.
    `name` (default .lock) gives one output file of a shared folder a lock of its own (infer.py --output; see
    FileLock). The lock file lies in the real folder (links resolved).
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str = "", name: str | None = None):
        self.folder, self.what = Path(folder), what
        self.file = real_path(self.folder) / (name or self.NAME)   # name: one lock per output file of a folder
        self._fd: int | None = None
        self._made = False  # the folder did not exist: removed on release if still empty

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _refuse(self) -> LockedError:
        o = self._owner()
        who = f"{o.get('what') or 'another process'} (pid {o.get('pid', '?')} on {o.get('host', '?')})"
        return LockedError(f"{self.folder}: in use by {who}; wait for it to finish (its lock: {self.file})")

    def acquire(self) -> "FolderLock":
        import fcntl

        self._made = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = real_path(self.folder) / self.file.name   # the folder may have been a dangling link
        for _ in range(20):
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputPathError(f"{self.folder}: cannot take the lock {self.file} ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse() from None
            except OSError:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our flock: take the new one
                os.close(fd)
                continue
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, me, 0)
            self._fd = fd
            return self
        raise LockedError(f"{self.folder}: could not take {self.file} (other processes keep taking it)")

    def release(self) -> None:
        if self._fd is not None:
            self.file.unlink(missing_ok=True)  # before unlocking: a waiter then sees a removed file and retries
            os.close(self._fd)
            self._fd = None
            if self._made:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # a run that wrote nothing leaves no empty folder behind

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class FileLock:
    """The lock of one output file of a shared folder (infer.py --output), whatever name reaches it.

    Two locks, both flock()s: `.NAME.lock` beside the real file, named after the real path (a FolderLock: every
    symlink or `..` name of the file takes the same one, and it holds the owner for the message a second writer
    gets), and one on the file itself, i.e. on its device and inode (a hard link is another path to the same
    inode). An atomic rewrite (a repair) puts a new inode under the path: `follow()` locks whatever inode the
    path names now (call it after rewriting or creating the file); the path lock covers the moment between.
    """

    def __init__(self, path: str | Path, what: str = ""):
        self.path, self.what = Path(path), what
        real = real_path(path)
        self.names = FolderLock(real.parent, what, name=f".{fit_name(real.parent, real.name, 6)}.lock")
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    @property
    def file(self) -> Path:
        """The path lock's file."""
        return self.names.file

    def acquire(self) -> "FileLock":
        self.names.acquire()
        try:
            self.follow()
        except BaseException:
            self.release()
            raise
        return self

    def follow(self) -> None:
        """Lock the inode the path names now, if it exists and is not the one locked already."""
        import fcntl

        for _ in range(20):
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == self._inode:
                return
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise OutputPathError(f"{self.path}: cannot be opened ({e.strerror or e})") from None
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):   # replaced between stat and open: again
                os.close(fd)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(f"{self.path}: in use by {_inode_holder(st.st_dev, st.st_ino)} writing the same "
                                  f"file under another name (a hard link: device {st.st_dev}, inode {st.st_ino}); "
                                  "wait for it to finish") from None
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._inode = fd, (st.st_dev, st.st_ino)
            return
        raise LockedError(f"{self.path}: could not lock it (it keeps being replaced)")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._inode = None
        self.names.release()

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _inode_holder(dev: int, ino: int) -> str:
    """Who holds an flock on the inode (pid and command, from /proc/locks on Linux), for a refusal's message."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()
            if len(f) > 5 and f[1] == "FLOCK" and f[5] == want:
                pid = f[4]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"{' '.join(cmd.split()[:8]) or 'a process'} (pid {pid})"
    except OSError:
        pass
    return "another process"


__all__ = ["atomic_path", "atomic_dir", "write_bytes", "write_text", "write_json", "write_result", "save_tensors", "FolderLock",
           "FileLock", "LockedError", "OutputPathError", "check_output_dir", "check_output_file", "real_path",
           "special_kind", "fit_name", "name_max", "json_text"]
