"""The project's error types, as the CLIs see them: a user's mistake is one `error:` line, a bug a traceback.

Each layer raises its own error type (ModelSourceError for model names and files, CorpusError for corpus folders,
RecordsError for records, OutputPathError for output paths, LockedError for a busy output folder, ...), with a
message that names the file or flag at fault. `train.py`'s dispatcher turns any of them into
`train.py CMD: error: ...` and exit 2; anything else (TypeError, a torch RuntimeError, ...) is a bug and keeps its
traceback. The types are looked up by name in the modules already imported: an error of a module that was never
imported cannot have been raised, and the dispatcher imports no torch-heavy module to learn a class name.
"""
from __future__ import annotations

import sys

PROJECT_ERRORS = {  # module -> its error types
    "corpus_tools.files": ("OutputPathError", "LockedError"),
    "corpus_tools.corpus": ("CorpusError",),
    "corpus_tools.epub": ("EpubError",),
    "corpus_tools.models": ("ModelSourceError", "TokenizerMismatch", "ContextLengthError"),
    "corpus_tools.records": ("RecordsError",),
    "gate.model.drafter": ("ArtifactError",),
    "corpus_tools.llamacpp": ("LayerUnavailable",),
    "gate.train.data": ("FitError",),
    "gate.decode.runtime": ("UsageError",),
}


def project_errors() -> tuple[type[BaseException], ...]:
    """The project's error classes among the modules imported so far."""
    found = []
    for module, names in PROJECT_ERRORS.items():
        mod = sys.modules.get(module)
        found += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(found)


def one_line(e: BaseException) -> str:
    """An error's message on one line (library messages may span several), for a CLI's `error:` line."""
    return " ".join(str(e).split()) or type(e).__name__
