"""Model runtimes, the bottom floor under recording and decoding: where models come from and how they run.

    sources.py   model names -> files (packaged GGUF aliases, .gguf, HF folders, hub ids; the cache)
    info.py      ModelInfo, tokenizer fingerprints, the context-length check, their errors
    loading.py   transformers models and tokenizers (`train.py models`)
    backend.py   the Backend protocol (one model + one KV cache), catch_up, the LM view policies read
    hf.py        HFBackend (transformers); llamacpp.py: LlamaCppBackend (llama.cpp, GGUF on CPU)
    open.py      BACKENDS (kind -> opener), open_backend, open_models -> Runtime
    llama_tools.py  llama.cpp's own converter and programs from the pinned source (train.py export, make llama-tools)
"""
