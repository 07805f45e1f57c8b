#!/usr/bin/env python
"""skipgate training-side CLI: corpus -> records -> report -> fit -> evaluate.

    python train.py corpus    --epubs data/books --out runs/demo/corpus
    python train.py inventory --model smollm2-135m --corpus runs/demo/corpus
    python train.py record    --model smollm2-135m --corpus runs/demo/corpus --out runs/demo/records
    python train.py report    --records runs/demo/records
    python train.py selfgen   --model smollm2-135m --corpus runs/demo/corpus --out runs/demo/selfgen
    python train.py fit       --records runs/demo/records --out runs/demo/gate
    python train.py evaluate  --records runs/demo/records --gate runs/demo/gate
    python train.py models    [NAME]      list model aliases, or load one and print its info

`python train.py COMMAND --help` shows each command's options.
"""
import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a model hub at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMMANDS = {  # name -> module whose main(argv) implements it; imported lazily (torch is slow to import)
    "corpus": "corpus_tools.corpus",
    "inventory": "corpus_tools.inventory",
    "record": "corpus_tools.record",
    "report": "corpus_tools.report",
    "selfgen": "corpus_tools.selfgen",
    "fit": "gate.train.fit",
    "evaluate": "gate.train.evaluate",
    "models": "corpus_tools.models",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
