#!/usr/bin/env python
"""skipgate decoding CLI: generate text, skipping big-model passes where a policy allows.

See `python infer.py --help` for policies and examples; the implementation is gate/decode/cli.py.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP is left as the user set it: its default spin-wait is the fastest on an idle machine (docs/speed.md).
# --shared-cpu asks for passive waiting, which must be set before torch loads libgomp (a user's setting wins).
if "--shared-cpu" in sys.argv[1:]:
    os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")   # only when asked

if __name__ == "__main__":
    from gate.decode.cli import main
    sys.exit(main(sys.argv[1:]) or 0)
