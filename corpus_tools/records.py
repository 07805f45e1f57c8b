"""Reading per-token records written by `python train.py record` (docs/interfaces.md, "Records").

Layout of a records folder:
    manifest.json                       written last: settings, models, books and shards with sha256 checksums
    settings.json                       written first: a re-run with other settings is refused
    <split>/<book_id>/book.json         the book is complete (token count, shard count)
    <split>/<book_id>/<chunk>/          one shard: consecutive positions of one book
        token.npy target.npy pos.npy    shared fields
        m<i>/<field>.npy                per model i (meta["models"][i]["dir"]); hidden/<L> is stored as
                                        hidden.<L>.npy (fp16, or int8 + hidden.<L>.scale.npy with --hidden-dtype int8)
        shard.json                      position count and sha256 of every file
Arrays are memory-mapped; load(verify=True) checks the sha256 of each file it reads. More: docs/corpus.md.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from common.errors import ProjectError

FORMAT = 1
SHARED_FIELDS = {"token": np.int32, "target": np.int32, "pos": np.int32, "book": np.int16}
MODEL_FIELDS = {"argmax": np.int32, "p_target": np.float32, "p_max": np.float32, "entropy": np.float32,
                "entropy_norm": np.float32, "topk_ids": np.int32, "topk_p": np.float32}


class RecordsError(RuntimeError, ProjectError):
    """A records folder that cannot be read; the message names the file and the problem."""


def field_file(field: str, model_dir: str | None = None) -> str:
    """Relative path of a field's array inside a shard ("hidden/15" -> "m0/hidden.15.npy")."""
    name = field.replace("/", ".") + ".npy"
    return f"{model_dir}/{name}" if model_dir else name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_verified: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) already checked here


def _verify(path: Path, sha: str, shard_dir: Path) -> None:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, sha)
    if key in _verified:
        return
    if sha256_file(path) != sha:
        raise RecordsError(f"{path}: checksum mismatch, shard {shard_dir} is corrupt; delete that folder and re-run "
                           "the same `train.py record` command to record it again")
    _verified.add(key)


class Records:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            hint = (" (recording incomplete: re-run the same `train.py record` command to resume)"
                    if (self.path / "settings.json").is_file() else "")
            raise RecordsError(f"{mf}: no records manifest{hint}")
        try:
            manifest = json.loads(mf.read_text())
            if manifest.get("format") != FORMAT:
                raise RecordsError(f"{mf}: records format {manifest.get('format')!r}, this reader reads {FORMAT}")
            self._shards = manifest.pop("shards")
            self.meta = manifest
            self._model = {m["name"]: m for m in manifest["models"]}
            self._books = manifest["books"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise RecordsError(f"{mf}: bad records manifest ({type(e).__name__}: {e})") from None

    @property
    def models(self) -> list[str]:
        return list(self._model)

    @property
    def splits(self) -> list[str]:
        return list(self._books)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def books(self, split: str) -> list[str]:
        self._check_split(split)
        return list(self._books[split])

    def fields(self, model: str) -> list[str]:
        """Per-model field names available for `model` (including "hidden/<layer>")."""
        return list(MODEL_FIELDS) + [f"hidden/{layer}" for layer in self._model[model]["layers"]]

    def load(self, split: str, fields=None, models=None, verify: bool = True) -> dict[str, np.ndarray]:
        """Shared fields by name, per-model fields as "<model>/<field>"; `fields` selects names of either kind
        (a per-model name applies to every model in `models` that has it)."""
        self._check_split(split)
        models = self.models if models is None else list(models)
        for m in models:
            if m not in self._model:
                raise KeyError(f"{self.path}: no model {m!r} in these records (models: {', '.join(self.models)})")
        names = set(SHARED_FIELDS).union(*(self.fields(m) for m in models))
        unknown = set(fields or ()) - names
        if unknown:
            raise KeyError(f"{self.path}: no field(s) {', '.join(sorted(unknown))}; fields: {', '.join(sorted(names))}")
        want = names if fields is None else set(fields)
        cols = [(f, None, f) for f in SHARED_FIELDS if f in want]  # (key, model, field)
        cols += [(f"{m}/{f}", m, f) for m in models for f in self.fields(m) if f in want]
        parts = {key: [] for key, _, _ in cols}
        for shard in self._shards[split]:
            book_index = self._books[split].index(shard["book"])
            for key, model, field in cols:
                parts[key].append(self._read(shard, model, field, book_index, verify))
        return {key: (v[0] if len(v) == 1 else np.concatenate(v)) if v else self._empty(model, field)
                for (key, model, field), v in zip(cols, parts.values())}

    def _check_split(self, split: str) -> None:
        if split not in self._books:
            raise KeyError(f"{self.path}: no split {split!r} (splits: {', '.join(self.splits)})")

    def _read(self, shard: dict, model: str | None, field: str, book_index: int, verify: bool) -> np.ndarray:
        if field == "book":
            return np.full(shard["n"], book_index, dtype=np.int16)
        mdir = self._model[model]["dir"] if model else None
        a = self._load_file(shard, field_file(field, mdir), verify)
        if field.startswith("hidden/") and a.dtype == np.int8:  # int8 + per-row scale: dequantize (a copy)
            scale = self._load_file(shard, field_file(field + "/scale", mdir), verify)
            return (a * scale[:, None]).astype(np.float16)
        return a

    def _load_file(self, shard: dict, rel: str, verify: bool) -> np.ndarray:
        shard_dir = self.path / shard["path"]
        path = shard_dir / rel
        if rel not in shard["files"]:
            raise RecordsError(f"{shard_dir}: manifest.json lists no {rel} in this shard")
        if not path.is_file():
            raise RecordsError(f"{path}: missing shard file (records damaged or moved)")
        if verify:
            _verify(path, shard["files"][rel], shard_dir)
        try:
            a = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise RecordsError(f"{path}: not a readable .npy array ({e})") from None
        if len(a) != shard["n"]:
            raise RecordsError(f"{path}: {len(a)} rows, manifest.json says {shard['n']}")
        return a

    def _empty(self, model: str | None, field: str) -> np.ndarray:
        if model is None:
            return np.empty(0, SHARED_FIELDS[field])
        if field.startswith("hidden/"):
            return np.empty((0, self._model[model]["hidden_size"]), np.float16)
        shape = (0, self.meta["topk"]) if field.startswith("topk") else (0,)
        return np.empty(shape, MODEL_FIELDS[field])


def open_records(path: str | Path) -> Records:
    """Open a records folder; raises RecordsError (naming the file and the problem) if it cannot be read."""
    return Records(path)
