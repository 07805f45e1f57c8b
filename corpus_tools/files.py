"""Writing outputs safely: no reader ever sees half a file, and one writer per output folder.

Every long job here (corpus, record, selfgen, fit, batch inference) may be killed at any moment and re-run to
resume, so each file is written to a temporary name in its own folder and renamed into place (os.replace is
atomic on POSIX): a reader sees the old file or the new one, never a mix. One rule for file modes: a new
file gets the mode `open()` would give it (0o666 less the umask), also when a library writes the temporary
file (tempfile.mkstemp alone would leave it 0600).

    write_text(path, text) / write_bytes(path, data) / write_json(path, obj)
    with atomic_path(path) as tmp: save_file(tensors, tmp)     # for libraries that write to a path
    with atomic_dir(path) as tmp: ...fill tmp...                # a whole folder, renamed into place
    with FolderLock(out, "train.py record"): ...                # refuses a second writer, naming the first

A lock left by a process that died (same host, pid gone) does not block a resume: it is taken over.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
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
    or be an empty folder), on error it is removed."""
    path = Path(path)
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


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """JSON (numpy scalars/arrays and paths allowed), UTF-8 without escaping, a newline at the end."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def save_tensors(tensors: dict, path: str | Path) -> None:
    """A safetensors file, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


class LockedError(RuntimeError):
    """Another live process holds the lock of an output folder; the message names it."""


class FolderLock:
    """An exclusive lock on an output folder: `OUT/.lock` holds the owner's pid, host and command.

    Taken with O_CREAT|O_EXCL, so two processes cannot both take it; a lock whose process is gone (same host)
    is stale and taken over. Use as a context manager; it removes its file on exit.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str = ""):
        self.folder, self.what = Path(folder), what
        self.file = self.folder / self.NAME
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return False          # another machine's process: we cannot tell, so it is not stale
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what})
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if self._stale(owner):
                    self.file.unlink(missing_ok=True)
                    continue
                raise LockedError(
                    f"{self.folder}: in use by {owner.get('what') or 'another process'} (pid {owner.get('pid')} "
                    f"on {owner.get('host')}); wait for it to finish, or remove {self.file} if that process is "
                    "gone") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise LockedError(f"{self.folder}: could not take {self.file} (another process keeps taking it)")

    def release(self) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["atomic_path", "atomic_dir", "write_bytes", "write_text", "write_json", "save_tensors", "FolderLock", "LockedError"]
