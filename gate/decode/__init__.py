"""Decoding side: run a big model, skipping its forward passes where a policy allows.

    backend.py   Backend protocol, HFBackend (transformers + DynamicCache), catch_up, early_exit_view
    (LlamaCppBackend, the llama.cpp runtime, is corpus_tools/llamacpp.py: recording runs it too)
    runtime.py   make_backend (BACKENDS registry), open_models -> Runtime, load_gate, held-out prompts, EOS ids
    loop.py      Decoder (catch-up, verify, rollback, cache crops), DecodeState, LM views, Policy base, Draft
    registry.py  @register, POLICIES, Arg: the CLI and the benchmark are generated from the policy classes
    policies.py  big, small, ratio, entropy, cascade, gate, copy
    drafters.py  Drafter protocol, DrafterBase, SmallLMDrafter, RouterDrafter
    ledger.py    Ledger (the cost ledger's keys), sum_ledgers, the side-by-side table
    cli.py       infer.py: prompt handling, streaming, the demo
    batch.py     infer.py --input/--output: many prompts from a JSONL file, one model load, resumable

Where to add: a policy = one @register class in policies.py; a backend = one class + one entry in
runtime.BACKENDS; a drafter = one class with the Drafter members.
"""
