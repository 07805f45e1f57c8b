"""The folder every gate artifact is, whatever its format; imports no format module.

    write_artifact(path, tensor_file, tensors, meta)   # tensors (atomic), then META_FILE naming them, last
    check_big_model(meta, big_info, where); check_files(path, meta)   # before a load
    Format(name, kind, keys, load)                     # what a format module declares (gate/model/load.py)

A folder holds one safetensors file and META_FILE (drafter.json: "format", the big model, hidden_layer,
max_skip, the files with their sha256, library versions); a folder without META_FILE is unfinished, one whose
files differ from their sha256 is refused (ArtifactError), and a big model with another tokenizer is refused
with TokenizerMismatch. docs/drafters.md describes the formats.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common.errors import ProjectError
from common.files import atomic_path, write_json
from corpus_tools.records import sha256_file
from runtimes.info import ModelInfo, TokenizerMismatch

META_FILE = "drafter.json"


class ArtifactError(RuntimeError, ProjectError):
    """A drafter folder that is missing, incomplete or inconsistent; the message names the path."""


@dataclass(frozen=True)
class Format:
    """One artifact format, declared by its module: drafter.json's "format" string, what it is in words, the keys
    its drafter.json holds beside the common ones, and load(path, meta, small) -> the drafter (`small`: the
    router's small model as (backend, ModelInfo), or None)."""
    name: str
    kind: str
    keys: tuple[str, ...]
    load: Callable


def write_artifact(path: str | Path, tensor_file: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """An artifact folder: the tensors (safetensors, written atomically), then META_FILE with their sha256 and the
    library versions, written last (a folder without it is unfinished). Returns the metadata written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / tensor_file) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        sha = sha256_file(tmp)
    meta = {**meta, "files": {tensor_file: sha}, "versions": library_versions()}
    write_json(path / META_FILE, meta)
    return meta


def artifact_digest(path: str | Path) -> str | None:
    """A hash of the artifact at `path`: of its META_FILE, which holds every tensor file's sha256 (checked on
    load), the threshold and the precision maps, so a recalibrated or retrained artifact in the same folder gets
    another one. None when there is no META_FILE to read (loading it says why)."""
    try:
        return hashlib.sha256((Path(path) / META_FILE).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_big_model(meta: dict, big_info, where: str) -> None:
    """Raise TokenizerMismatch / ArtifactError unless big_info matches the artifact's big model."""
    if big_info is None:
        return
    info = big_info.to_dict() if isinstance(big_info, ModelInfo) else dict(big_info)
    big = meta["big_model"]
    if info.get("fingerprint") != big["fingerprint"]:
        raise TokenizerMismatch(
            f"{where}: drafter trained for {big['name']!r} (tokenizer {big['fingerprint']}) but the big model "
            f"{info.get('name')!r} has tokenizer {info.get('fingerprint')}; the same text gives other token "
            "ids, so its proposals would be meaningless - retrain it with `python train.py fit` on records of "
            "this model")
    for key in ("hidden_size", "vocab_size", "n_layers"):   # one tokenizer may serve a family of sizes
        if key in info and key in big and info[key] != big[key]:
            raise ArtifactError(f"{where}: drafter expects {key} {big[key]} but {info.get('name')!r} has "
                                f"{info[key]}")
    n_layers = info.get("n_layers")
    lay = meta["hidden_layer"]
    if n_layers is not None and lay is not None and not all(0 <= x <= n_layers for x in
                                                            (lay if isinstance(lay, list) else [lay])):
        raise ArtifactError(f"{where}: drafter reads hidden layer {meta['hidden_layer']} but "
                            f"{info.get('name')!r} has layers 0..{n_layers}")


def check_files(path: Path, meta: dict) -> None:
    """Every file drafter.json lists exists and has its sha256: a half-rewritten folder is refused."""
    for name, sha in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in {path / META_FILE} but missing")
        if sha256_file(f) != sha:
            raise ArtifactError(f"{f}: sha256 differs from {path / META_FILE} (folder partly rewritten?)")


__all__ = ["META_FILE", "ArtifactError", "Format", "write_artifact", "library_versions", "check_big_model",
           "check_files"]
