"""Resumable training stages: a finished stage is loaded instead of recomputed when its key still matches.

A fit trains in stages (heads, predictor mode, gates; see gate/train/fit.py). Each stage's result is saved
under OUT/stages/ as NAME.json (its key first, then its metadata) and, if it has tensors, NAME.safetensors.
The key hashes the stage's settings and the key of the stage it builds on, so a changed setting retrains that
stage and every later one. Files are written atomically and the JSON last, so an interrupted stage is never
mistaken for a finished one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from common.files import save_tensors, write_json


def stage_key(*parts) -> str:
    """A short hash of JSON-able parts (settings, data identity, the previous stage's key)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """The folder of finished stages of one fit; `force` recomputes every stage."""

    def __init__(self, folder: str | Path, force: bool = False, log=print):
        self.folder, self.force, self.log = Path(folder), force, log
        self.folder.mkdir(parents=True, exist_ok=True)

    def _finished(self, name: str, key: str, with_tensors: bool) -> dict | None:
        meta_file, tensor_file = self.folder / f"{name}.json", self.folder / f"{name}.safetensors"
        if self.force or not meta_file.is_file() or (with_tensors and not tensor_file.is_file()):
            return None
        meta = json.loads(meta_file.read_text())
        return meta if meta.get("key") == key else None

    def run(self, name: str, key: str, compute: Callable[[], tuple[dict, dict | None]],
            with_tensors: bool = False) -> tuple[dict, dict | None]:
        """(metadata, tensors) of stage `name`: loaded if finished with this key, else compute() -> (metadata,
        tensors or None), saved atomically (tensors first, the JSON with the key last)."""
        meta = self._finished(name, key, with_tensors)
        if meta is not None:
            tensors = None
            if with_tensors:
                from safetensors.torch import load_file
                tensors = load_file(str(self.folder / f"{name}.safetensors"))
            self.log(f"[fit] {name}: loaded finished stage {self.folder / name}")
            return meta, tensors
        meta, tensors = compute()
        if with_tensors:
            save_tensors(tensors, self.folder / f"{name}.safetensors")
        meta = {"key": key, **meta}
        write_json(self.folder / f"{name}.json", meta)
        return meta, tensors
