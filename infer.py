#!/usr/bin/env python
"""skipgate decoding CLI: generate text, skipping big-model passes where a policy allows.

See `python infer.py --help` for policies and examples; the implementation is gate/decode/cli.py.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads: torch and llama.cpp share one OpenMP runtime (libgomp.so.1), which reads this once. With its
# default spin-wait, 2 threads on 2 busy cores ran 32 tokens of `big` at 1.8 tok/s (hf) and 14.7 (llama.cpp);
# passive: 9.5 and 33.2 (1 thread: the same either way). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __name__ == "__main__":
    from gate.decode.cli import main
    sys.exit(main(sys.argv[1:]) or 0)
