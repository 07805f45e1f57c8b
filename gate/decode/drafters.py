"""Drafters as the `gate` policy gets them: a gate artifact loaded over a runtime (`load_gate`, the one place a
decode run loads one), or a small LM (`SmallLMDrafter`).

    drafter = load_gate(rt, path)   # heads drafter, feature head, or a router over its small model in rt
    gate_layer(path)                # the big model's layer a gate artifact reads: 'last', None or a number

SmallLMDrafter is a small pre-trained LM with the big model's tokenizer as the gate's predictor: candidate =
its argmax, score = its max-probability (BiLD's fallback rule); it reads no big hidden state and calls its model
through an `LM` view listed in `lms`. Every drafter subclasses gate.model.base.Drafter; artifacts are read by
gate/model/load.py. A user's mistake (no folder, a damaged one, no small model) is a UsageError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from common.errors import UsageError
from gate.model.artifact import ArtifactError
from gate.model.base import Drafter
from gate.model.load import load_drafter, read_meta
from gate.model.router import ROUTER_FORMAT
from runtimes.backend import LM, Backend
from runtimes.open import Runtime


class SmallLMDrafter(Drafter):
    hidden_layer = None

    def __init__(self, small: Backend, threshold: float = 0.8, max_skip: int = 64):
        self.lm = LM(small)
        self.lms = (self.lm,)
        self.threshold = threshold
        self.max_skip = max_skip

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        p, tok = torch.softmax(self.lm(ids), -1).max(-1)
        return int(tok), float(p)


def load_gate(rt: Runtime, path: str):
    """The drafter at `path` over the runtime's models, loaded once (kept in rt.loaded); a router artifact runs
    over its small model, which the runtime opened by name."""
    key = ("gate", path)
    if key not in rt.loaded:
        if not Path(path).exists():
            raise UsageError(f"--gate {path}: no such folder (train a gate with `python train.py fit`)")
        meta = router_meta(path)
        try:   # TokenizerMismatch passes through: the CLI reports it
            rt.loaded[key] = load_drafter(path, rt.big_info) if meta is None else load_router(path, meta, rt)
        except ArtifactError as e:
            raise UsageError(str(e)) from e
    return rt.loaded[key]


def router_meta(path: str) -> dict | None:
    """drafter.json of a router artifact (a big/small pair), or None for any other drafter (or no folder:
    load_gate reports that)."""
    if not Path(path, "drafter.json").is_file():
        return None
    try:
        meta = read_meta(path)
    except ArtifactError as e:
        raise UsageError(str(e)) from e
    return meta if meta["format"] == ROUTER_FORMAT else None


def load_router(path: str, meta: dict, rt: Runtime):
    """A router artifact over the small model the runtime opened for it (the policy's model_names asks for the
    artifact's small model unless --small names another, which the identity check then refuses)."""
    wanted = meta["small_model"]["name"]
    small = wanted if wanted in rt.infos else next((n for n in rt.infos if n != rt.big_info.name), None)
    if small is None:
        raise UsageError(f"--gate {path}: a router needs its small model ({meta['small_model']['name']}): "
                         "pass --small NAME")
    try:
        return load_drafter(path, rt.big_info, (rt.predictor(small), rt.infos[small]))
    except ValueError as e:
        raise UsageError(str(e)) from e


def gate_layer(path: str):
    """'last', None (reads no big hidden state) or the layer number a gate artifact reads, from drafter.json."""
    try:
        meta = read_meta(path)
    except (ArtifactError, OSError):
        return None                     # load_gate reports it
    layer, feats = meta.get("hidden_layer"), meta.get("features")
    if layer is None or (isinstance(feats, dict) and not feats.get("big_hidden", True)):
        return None
    n = meta.get("big_model", {}).get("n_layers")
    return "last" if layer == n else layer
