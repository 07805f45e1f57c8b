"""Loading: a model name -> a transformers model and tokenizer (`load`), a tokenizer alone, an embedding table.

float32 is the default dtype: on CPUs without AVX512-BF16 bf16 matmuls run ~5x slower; pass "bfloat16" on a
GPU. Greedy outputs differ between dtypes: record, fit and decode with one. `main` is `train.py models`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.errors import ProjectError, one_line
from runtimes.info import LoadedModel, ModelSourceError, describe
from runtimes.sources import (
    ALIASES,
    CACHE_ENV,
    DEFAULT_MODEL,
    GGUF_ERRORS,
    cache_dir,
    check_gguf,
    gguf_reason,
    joined_gguf,
    packaged_gguf,
    resolve,
    source_key,
)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def load(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer by any supported name. float32 is the default: on CPUs without
    AVX512-BF16 (the AVX2 machines here) bf16 matmuls measured ~5x slower than fp32;
    pass dtype="bfloat16" on a GPU. Greedy outputs differ between dtypes: record, fit and decode with one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelSourceError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    src = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype]).to(device).eval()
    except OSError as e:
        raise ModelSourceError(f"cannot load model {name!r} from {src}: {e}") from e
    return LoadedModel(model, tok, describe(model, tok, name, str(src), dtype))


def load_tokenizer(name: str):
    """The tokenizer of a model by any supported name, without its weights: a GGUF's (packaged alias or .gguf
    file) is read from the file's metadata once and cached (gguf_tokenizer), not converted with the weights."""
    from transformers import AutoTokenizer

    p = Path(name).expanduser()
    if name in ALIASES or p.suffix == ".gguf":
        if name not in ALIASES and not p.is_file():
            raise ModelSourceError(f"GGUF file {p} does not exist")
        return gguf_tokenizer(joined_gguf(packaged_gguf(name), name) if name in ALIASES else p)
    src = resolve(name)
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot load the tokenizer of {name!r} from {src}: {one_line(e)}") from e


def gguf_tokenizer(gguf: Path):
    """The tokenizer stored in a GGUF file. transformers parses it from the metadata (21 s for Qwen's 152k
    vocabulary here), so the result is saved once into the cache (written to a temporary folder and renamed)."""
    from transformers import AutoTokenizer

    dst = cache_dir() / "tokenizers" / f"{gguf.stem}-{source_key([gguf])}"
    if not (dst / "tokenizer_config.json").is_file():
        check_gguf(gguf)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except GGUF_ERRORS as e:
            raise ModelSourceError(f"{gguf}: cannot read its tokenizer ({gguf_reason(e)})") from e
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            tok.save_pretrained(tmp)
            try:
                os.rename(tmp, dst)
            except OSError:
                if not (dst / "tokenizer_config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(dst)


def input_embedding(name: str) -> torch.Tensor:
    """The input embedding matrix [V, d] of a model, read alone (a 1.5B model's weights need not be loaded for
    one tensor): from a GGUF (packaged alias or .gguf file) de-quantised by gguf-py, without converting the
    model (30 s for Qwen-0.5B's Q-quantised 152k x 896 table here); else from the safetensors files; else by
    loading the model."""
    from safetensors import safe_open

    if name in ALIASES or Path(name).suffix == ".gguf":
        from gguf import GGUFReader
        from gguf.quants import dequantize

        gguf = joined_gguf(packaged_gguf(name), name) if name in ALIASES else Path(name)
        check_gguf(gguf)
        try:
            t = next((t for t in GGUFReader(gguf).tensors if t.name == "token_embd.weight"), None)
        except GGUF_ERRORS as e:
            raise ModelSourceError(f"{gguf}: cannot read this GGUF file ({gguf_reason(e)})") from e
        if t is None:
            raise ModelSourceError(f"{gguf}: no token_embd.weight tensor")
        w = dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(-1, w.shape[-1]))
    src = Path(resolve(name))
    for f in sorted(src.glob("*.safetensors")) if src.is_dir() else []:
        with safe_open(str(f), "pt") as st:
            key = next((k for k in st.keys() if k.endswith("embed_tokens.weight")), None)
            if key is not None:
                return st.get_tensor(key).float()
    return load(name).model.get_input_embeddings().weight.detach().float()


def main(argv=None) -> int:
    """`python train.py models`: list aliases, or load one and print its info and load time."""
    import argparse
    ap = argparse.ArgumentParser(prog="train.py models", description=main.__doc__)
    ap.add_argument("name", nargs="?", help="alias, hub id, local dir or .gguf file to load")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    if not args.name:
        for alias, e in ALIASES.items():
            print(f"{alias:22s} {'(default) ' if e.default else ''}{e.description}")
        print(f"cache: {cache_dir()} (set ${CACHE_ENV} to move it)")
        return 0
    t0 = time.time()
    try:
        lm = load(args.name, args.dtype)
    except ProjectError as e:
        print(f"train.py models: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps({**lm.info.to_dict(), "load_seconds": round(time.time() - t0, 2)}, indent=2))
    return 0
