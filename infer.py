#!/usr/bin/env python
"""skipgate decoding CLI: generate text, skipping big-model passes where a policy allows.

See `python infer.py --help` for policies and examples; the implementation is gate/decode/cli.py.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":
    from gate.decode.cli import main
    sys.exit(main(sys.argv[1:]) or 0)
