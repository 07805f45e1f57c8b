"""The one loader of gate artifacts, over the table of their formats.

    drafter = load_drafter(path, big_info, small=None)   # HeadsDrafter, EagleDrafter or RouterDrafter
    meta = read_meta(path); kind_of(meta)                 # drafter.json, checked; its kind in words

FORMATS maps drafter.json's "format" to the Format its module declares (gate/model/artifact.py): the heads
drafter, the feature head, the router. load_drafter refuses a big model with another tokenizer
(TokenizerMismatch) or other sizes, and a folder whose files are missing or changed (ArtifactError); a router
needs `small`, its small model as (backend, ModelInfo), which must be the one it was trained with. A new format
is one module declaring a Format and one entry here.
"""
from __future__ import annotations

import json
from pathlib import Path

from gate.model.artifact import META_FILE, ArtifactError, check_big_model, check_files
from gate.model.eagle import EAGLE
from gate.model.heads_drafter import HEADS
from gate.model.router import ROUTER
from runtimes.info import ModelInfo

FORMATS = {f.name: f for f in (HEADS, EAGLE, ROUTER)}
KINDS = {name.split("/")[0]: f.kind for name, f in FORMATS.items()}


def read_meta(path: str | Path) -> dict:
    """drafter.json of the folder at `path`, with the keys its format needs (ArtifactError naming the file)."""
    path = Path(path)
    mf = path / META_FILE
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such drafter folder (build one with `python train.py fit`)")
    if not mf.is_file():
        raise ArtifactError(f"{mf}: missing - {path} is not a finished drafter artifact (fit interrupted?)")
    try:
        meta = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # garbled: named here, not as a KeyError later
        raise ArtifactError(f"{mf}: not valid JSON ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{mf}: cannot read it ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{mf}: not a drafter description (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") not in FORMATS:
        raise ArtifactError(f"{mf}: format {meta.get('format')!r}, this code reads "
                            f"{' or '.join(map(repr, FORMATS))}")
    keys = FORMATS[meta["format"]].keys
    missing = [k for k in ("big_model", *keys, "max_skip", "hidden_layer", "files") if k not in meta]
    if missing or not isinstance(meta["big_model"], dict) or not isinstance(meta.get("gates", {}), dict):
        raise ArtifactError(f"{mf}: damaged drafter description ("
                            f"{'missing ' + ', '.join(missing) if missing else 'big_model or gates not an object'})")
    return meta


def kind_of(meta: dict) -> str:
    """What kind of artifact drafter.json describes, in words (for messages)."""
    return KINDS.get(str(meta.get("format")).split("/")[0], f"a {meta.get('format')!r} artifact")


def load_drafter(path: str | Path, big_info: ModelInfo | dict | None, small: tuple | None = None):
    """The drafter in the artifact folder at `path`, checked against the big model (big_info; None: unchecked)
    and, for a router, over its small model `small` = (backend, ModelInfo) (ArtifactError without it)."""
    path = Path(path)
    meta = read_meta(path)
    check_big_model(meta, big_info, str(path))
    check_files(path, meta)
    return FORMATS[meta["format"]].load(path, meta, small)


__all__ = ["FORMATS", "KINDS", "load_drafter", "read_meta", "kind_of", "ArtifactError"]
