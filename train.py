#!/usr/bin/env python
"""skipgate training-side CLI: corpus -> records -> report -> fit -> evaluate (-> calibrate on your own text).
    python train.py corpus    --epubs data/books --out runs/demo/corpus
    python train.py inventory --model smollm2-135m --corpus runs/demo/corpus
    python train.py record    --model smollm2-135m --corpus runs/demo/corpus --out runs/demo/records
    python train.py report    --records runs/demo/records
    python train.py selfgen   --model smollm2-135m --corpus runs/demo/corpus --out runs/demo/selfgen
    python train.py fit       --records runs/demo/records --out runs/demo/gate
    python train.py evaluate  --records runs/demo/records --gate runs/demo/gate
    python train.py calibrate --records runs/mine/records --gate runs/demo/gate --out runs/mine/gate
    python train.py export    --gate runs/eagle3/gate --format eagle3 --out runs/eagle3/export   (vLLM, SGLang, llama.cpp)
    python train.py models    [NAME]      list model aliases, or load one and print its info
    python train.py profile   smollm2-135m [--requant Q4_0 Q8_0]   what a verify pass of n tokens costs here
`train.py COMMAND --help`: its options. A mistake in the input: one line `train.py COMMAND: error: ...`, exit 2.
"""
import argparse
import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a model hub at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--shared-cpu" in sys.argv[1:]:   # passive OpenMP waiting, before torch loads libgomp (docs/speed.md)
    os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")   # only when asked

COMMANDS = {  # name -> module whose main(argv) implements it; imported lazily (torch is slow to import)
    "corpus": "corpus_tools.corpus",
    "inventory": "corpus_tools.inventory",
    "record": "corpus_tools.record",
    "report": "corpus_tools.report",
    "selfgen": "corpus_tools.selfgen",
    "fit": "gate.train.fit",
    "evaluate": "gate.train.evaluate",
    "calibrate": "gate.train.recalibrate",
    "export": "gate.train.export",
    "models": "runtimes.loading",
    "profile": "gate.decode.cost",
}
# Commands whose module does not check (and lock) its output folder itself: checked here before the module runs.
# corpus, record and selfgen check and lock theirs where the folder enters (also when called as functions).
OUTPUT_FOLDERS = {"fit": ("--out", True), "evaluate": ("--out", False)}  # command -> (flag, lock it)


def _output_folder(cmd: str, args: list[str]):
    """Check the command's output folder (if it is one of OUTPUT_FOLDERS and given); return a FolderLock to hold
    while it runs, or None."""
    if cmd not in OUTPUT_FOLDERS or {"-h", "--help"} & set(args):
        return None
    flag, lock = OUTPUT_FOLDERS[cmd]
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument(flag)
    known, _ = ap.parse_known_args(args)
    out = getattr(known, flag.lstrip("-").replace("-", "_"))
    if out is None:
        return None  # missing (the command's own parser says so) or defaulted by the command
    from common.files import FolderLock, check_output_dir
    check_output_dir(out, flag)
    return FolderLock(out, f"train.py {cmd}") if lock else None


def run(cmd: str, args: list[str]) -> int:
    """Run one command; the project's errors become one `error:` line and exit 2 (see common/errors.py)."""
    from contextlib import nullcontext

    from common.errors import ProjectError, fail
    try:
        lock = _output_folder(cmd, args)
        with lock or nullcontext():
            return importlib.import_module(COMMANDS[cmd]).main(args) or 0
    except ProjectError as e:   # a user's mistake is one line; anything else is a bug and keeps its traceback
        return fail(f"train.py {cmd}", e)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"train.py: error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0
    return run(argv[0], [a for a in argv[1:] if a != "--shared-cpu"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
