"""Drafters as the `gate` policy gets them: loaded over a runtime (`load_gate`), or a small LM (`SmallLMDrafter`).

`Drafter` is the protocol; the trained artifact (gate/model/drafter.py, `load_drafter`) is one implementation
and `SmallLMDrafter` and `RouterDrafter` others. `DrafterBase` gives the optional part of the protocol (`start`) a no-op default.
`load_gate(rt, path)` is the one place a decode run loads a gate artifact (heads, feature head or router).

SmallLMDrafter is a small pre-trained LM with the big model's tokenizer serving as the gate's predictor: the
candidate is its argmax at the next position and the score its max-probability (BiLD's fallback rule). It reads
no big-model hidden state (hidden_layer = None, so the big backend computes none), and it can skip any number
of positions: its cache is caught up over the big model's tokens in one pass, like the big model's over the
skipped ones. It calls its model through an `LM` view, listed in `lms`, which the `gate` policy hands to the
loop so that the cache is cropped on rollback and counted in the ledger.

RouterDrafter is the small model behind a trained router (gate/model/router.py, `train.py fit --drafter router`):
the same candidate, but the score is the router's estimate that the big model agrees, from the small model's
distribution, last-layer hidden state, candidate token and the copy rule (and optionally the big model's stale
hidden state). Its artifact is loaded here, not in gate/model, because it runs a model through a backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch

from common.errors import UsageError
from gate.model.copyrule import MAX_N, CopyIndex
from gate.model.drafter import ArtifactError, check_big_model, check_files, load_drafter, read_meta
from gate.model.router import ROUTER_FORMAT, RouterFeatures, load_router_parts, small_stats
from runtimes.backend import LM, Backend
from runtimes.open import Runtime


class Drafter(Protocol):
    hidden_layer: int | None    # the big model's layer it reads (HF numbering); None: it reads none
    # reads_all_hidden (optional, default False): propose gets every position's hidden state [big_cached, d]
    # instead of the last one's (the feature head, gate/model/eagle.py)
    # last_logits (optional): next-token logits [V] behind the last proposal; with temperature > 0 the gate
    # policy then drafts a sample of them and speculative sampling keeps the big model's distribution
    threshold: float            # skip while score >= threshold (a calibrated value may be 2.0: never)
    max_skip: int               # skip only while since_big < max_skip

    def start(self) -> None:
        """A new text begins: forget per-text state."""

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        """(candidate for position len(ids), estimated P(candidate == the big model's greedy token))."""


class DrafterBase:
    """The optional members of the Drafter protocol with their defaults."""
    lms: tuple[LM, ...] = ()

    def start(self) -> None:
        pass


class SmallLMDrafter(DrafterBase):
    hidden_layer = None

    def __init__(self, small: Backend, threshold: float = 0.8, max_skip: int = 64):
        self.lm = LM(small)
        self.lms = (self.lm,)
        self.threshold = threshold
        self.max_skip = max_skip

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        p, tok = torch.softmax(self.lm(ids), -1).max(-1)
        return int(tok), float(p)


class RouterDrafter(DrafterBase):
    """The Drafter contract over the small model and a trained router: candidate = the small model's argmax,
    score = the router's estimate that the big model agrees (gate/model/router.py)."""

    def __init__(self, features: RouterFeatures, gate, threshold: float, max_skip: int, small: Backend,
                 small_layer: int, big_layer: int | None, copy_max_n: int = MAX_N, meta: dict | None = None):
        self.features, self.gate = features, gate
        self.threshold, self.max_skip = float(threshold), int(max_skip)
        self.hidden_layer = big_layer           # the big model's layer it reads (None: none)
        self.lm = LM(small, hidden_layer=small_layer)
        self.lms = (self.lm,)
        self.meta = meta or {}
        self.copies = CopyIndex(copy_max_n)     # the copy rule, one of the router's features
        self.last_logits = None                 # the small model's logits: sampled drafts (gate policy)

    def start(self) -> None:
        self.copies.reset()

    def propose(self, ids: Sequence[int], hidden: torch.Tensor | None, since_big: int) -> tuple[int, float]:
        if self.hidden_layer is not None and hidden is None:
            raise ValueError(f"the router needs the big model's hidden state at layer {self.hidden_layer}")
        logits = self.last_logits = self.lm(ids)
        tok, topk_p, entropy_norm = small_stats(logits, self.features.topk)
        self.copies.sync(ids)
        copy_tok, copy_len = self.copies.query()
        big_h = None if hidden is None else torch.as_tensor(hidden).reshape(1, -1)
        X = self.features(topk_p, entropy_norm, self.lm.hidden.reshape(1, -1), [tok], [copy_tok], [copy_len],
                          [since_big], big_h)
        score = float(self.gate.score(X).reshape(()))
        return tok, (score if since_big < self.max_skip else 0.0)

    @classmethod
    def load(cls, path, meta: dict, small: Backend, small_info) -> "RouterDrafter":
        """The router artifact at `path` (drafter.json already read into `meta` and checked against the big
        model) over the small model's backend; refuses another small model (gate.model.router.check_identity)."""
        feats, gate = load_router_parts(path, meta, small_info)
        big_layer = meta["hidden_layer"] if meta["features"]["big_hidden"] else None
        return cls(feats, gate, meta["threshold"], meta["max_skip"], small, meta["small_model"]["n_layers"],
                   big_layer, meta.get("copy_max_n", MAX_N), meta)


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
        check_big_model(meta, rt.big_info, path)
        check_files(Path(path), meta)
        return RouterDrafter.load(path, meta, rt.predictor(small), rt.infos[small])
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
