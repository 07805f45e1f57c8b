"""Decoding side: run a big model, skipping its forward passes where a policy allows.

    contract.py  the policy contract: Policy, Draft, DecodeState, Arg, @register, sampling helpers
    loop.py      Decoder: catch-up, verify, rollback, cache crops (the loop owns every cache)
    cost.py      cost profiles of a verify pass, the acceptance model and the draft Planner; `train.py profile`
    policies.py  big, small, ratio, entropy, cascade, gate, copy; registry.py: the CLI and benchmark built from them
    drafters.py  load_gate (the one place a run loads a gate artifact), SmallLMDrafter
    session.py   options -> runtime -> policy -> one decoded prompt (shared by cli, batch and bench/)
    ledger.py    the cost ledger and the side-by-side table;  audit.py: a lossy decode's skips judged after the fact
    cli.py       infer.py: prompt handling, streaming, the demo;  batch.py: --input/--output, resumable
    parallel.py  --parallel N: prompts side by side in one llama.cpp context (runtimes/batched.py)
Models and backends live in runtimes/. Where to add a policy, a backend or a drafter, and the design: docs/decode.md.
"""
