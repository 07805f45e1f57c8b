"""The project's error base, as the CLIs see it: a user's mistake is one `error:` line, a bug a traceback.

Every user-facing error type subclasses `ProjectError` (keeping its other base, ValueError or RuntimeError):
ModelSourceError for model names and files, CorpusError for corpus folders, RecordsError for records,
OutputPathError for output paths, LockedError for a busy output folder, ArtifactError, FitError, UsageError, ...,
each with a message that names the file or flag at fault. Each entry point (train.py, infer.py, bench/*.py) has
one handler: a ProjectError becomes `PROG: error: <one line>` and exit 2 (`fail`); anything else (TypeError, a
torch RuntimeError, ...) is a bug and keeps its traceback. This module is the bottom layer: standard library only.
"""
from __future__ import annotations

import sys


INTERRUPTED = 130   # exit status after Ctrl-C (128 + SIGINT, as a shell reports a process the signal ended)
BROKEN_PIPE = 141   # exit status when stdout's reader went away (128 + SIGPIPE)


class ProjectError(Exception):
    """A user's mistake (a bad flag, file, folder or model name): one `error:` line, never a traceback."""


def one_line(e: BaseException) -> str:
    """An error's message on one line (library messages may span several), for a CLI's `error:` line."""
    return " ".join(str(e).split()) or type(e).__name__


def fail(prog: str, e: BaseException) -> int:
    """Print `PROG: error: <one line>` to stderr; the exit status of a user's mistake, 2."""
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return 2


class UsageError(ValueError, ProjectError):
    """A bad option value or a missing input named on the command line."""
