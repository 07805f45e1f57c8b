"""Decoding side: backends, the decode loop, policies, drafters and the `infer.py` CLI."""
