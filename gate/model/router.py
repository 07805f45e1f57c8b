"""The router for a big/small pair: P(the small model's argmax == the big model's), from the small model's
distribution, last-layer hidden state and candidate token, the copy rule, and optionally the big model's stale
hidden state.

    X = features(topk_p, entropy_norm, small_h, cand, copy_tok, copy_len, s, big_h)   # RouterFeatures: [N, F]
    drafter = RouterDrafter.load(path, meta, (small_backend, small_info))          # through gate/model/load.py

RouterFeatures is the one feature function of training (gate/train/fit_router.py) and decoding (RouterDrafter,
which reads the small model through an `LM` view). Artifact format skipgate-router/1 (`ROUTER`,
router.safetensors); both models are checked by identity (check_identity). docs/drafters.md: features and why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from corpus_tools.inventory import KINDS
from corpus_tools.record import logit_stats
from gate.model.artifact import ArtifactError, Format, write_artifact
from gate.model.base import Drafter
from gate.model.copyrule import MAX_N, CopyIndex
from gate.model.features import GATES
from gate.model.precision import SourceMaps, combine_sources, maps_from_meta
from runtimes.backend import LM, Backend
from runtimes.info import ModelInfo, TokenizerMismatch

ROUTER_FORMAT = "skipgate-router/1"
ROUTER_TENSORS = "router.safetensors"
IDENTITY_KEYS = ("fingerprint", "n_layers", "hidden_size", "vocab_size")


def model_identity(info) -> dict:
    """What identifies a model for an artifact: its name (for messages) and the keys that must match."""
    d = info.to_dict() if isinstance(info, ModelInfo) else dict(info)
    return {"name": d.get("name"), **{k: d.get(k) for k in IDENTITY_KEYS}}


def check_identity(expected: dict, info, role: str, where: str) -> None:
    """Refuse a model that is not the one the artifact was trained for (TokenizerMismatch / ValueError)."""
    got = model_identity(info)
    if got["fingerprint"] != expected["fingerprint"]:
        raise TokenizerMismatch(f"{where}: trained for the {role} model {expected['name']!r} (tokenizer "
                                f"{expected['fingerprint']}) but {got['name']!r} has tokenizer {got['fingerprint']}")
    diff = [f"{k} {got[k]} (expected {expected[k]})" for k in IDENTITY_KEYS[1:] if got[k] != expected[k]]
    if diff:
        raise ValueError(f"{where}: trained for the {role} model {expected['name']!r}, but {got['name']!r} differs: "
                         f"{', '.join(diff)}; fit a router on records of this pair")


class Projection:
    """x -> (x - mean) @ proj: standardisation and PCA folded into one affine map (fitted in training)."""

    def __init__(self, mean: torch.Tensor, proj: torch.Tensor):
        self.mean, self.proj = mean.float(), proj.float()

    def __call__(self, x) -> torch.Tensor:
        return (torch.as_tensor(x).float() - self.mean) @ self.proj

    @property
    def width(self) -> int:
        return self.proj.shape[1]


class RouterFeatures:
    """The router's feature function (see the module docstring), shared by training and decoding."""

    def __init__(self, small: Projection, emb_table: torch.Tensor, kind: torch.Tensor, topk: int,
                 big: Projection | None = None, max_s: int = 0):
        self.small, self.emb_table, self.kind, self.topk = small, emb_table.float(), kind.long(), int(topk)
        self.big, self.max_s = big, int(max_s)

    def names(self) -> list[str]:
        out = [f"p{i + 1}" for i in range(self.topk)] + ["log_p1", "margin", "entropy_norm"]
        out += [f"small_pc{i}" for i in range(self.small.width)]
        out += [f"emb_pc{i}" for i in range(self.emb_table.shape[1])] + [f"kind_{k}" for k in KINDS]
        out += ["copy_has", "copy_len", "copy_agrees"]
        if self.big is not None:
            out += [f"big_pc{i}" for i in range(self.big.width)] + [f"s_{s}" for s in range(1, self.max_s + 1)]
        return out

    @torch.no_grad()
    def __call__(self, topk_p, entropy_norm, small_h, cand, copy_tok, copy_len, s=None, big_h=None) -> torch.Tensor:
        """Features [N, F] float32. topk_p [N, k] (descending), entropy_norm [N], small_h [N, d_small], cand [N]
        (the small argmax), copy_tok / copy_len [N] (the copy rule: -1 / 0 for none), and with a big projection
        s [N] (since_big >= 1) and big_h [N, d_big] (the big model's state at t - s)."""
        p = torch.as_tensor(topk_p).float()[:, :self.topk]
        cand = torch.as_tensor(np.asarray(cand), dtype=torch.long)
        clen = torch.as_tensor(np.asarray(copy_len), dtype=torch.float32)
        ctok = torch.as_tensor(np.asarray(copy_tok), dtype=torch.long)
        cols = [p, torch.log(p[:, :1] + 1e-6), p[:, :1] - p[:, 1:2], torch.as_tensor(entropy_norm).float()[:, None],
                self.small(small_h), self.emb_table[cand],
                torch.nn.functional.one_hot(self.kind[cand], len(KINDS)).float(),
                (clen > 0).float()[:, None], (torch.log1p(clen) / np.log(13.0))[:, None],
                (ctok == cand).float()[:, None]]
        if self.big is not None:
            s = torch.as_tensor(np.asarray(s), dtype=torch.long).clamp(1, self.max_s)
            cols += [self.big(big_h), torch.nn.functional.one_hot(s - 1, self.max_s).float()]
        return torch.cat(cols, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"small.mean": self.small.mean, "small.proj": self.small.proj, "emb_table": self.emb_table.half(),
             "kind": self.kind.to(torch.int8)}
        if self.big is not None:
            t.update({"big.mean": self.big.mean, "big.proj": self.big.proj})
        return t

    def config(self) -> dict:
        return {"topk": self.topk, "max_s": self.max_s, "big_hidden": self.big is not None}

    @classmethod
    def from_tensors(cls, t: dict, cfg: dict) -> "RouterFeatures":
        big = Projection(t["big.mean"], t["big.proj"]) if cfg["big_hidden"] else None
        return cls(Projection(t["small.mean"], t["small.proj"]), t["emb_table"], t["kind"], cfg["topk"], big,
                   cfg["max_s"])


def small_stats(logits: torch.Tensor, topk: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(argmax, top-k probabilities [1, k], normalised entropy [1]) of one next-token logits row, computed as
    the recorder computes them (corpus_tools.record.logit_stats), so decode features match training's."""
    st = logit_stats(logits.reshape(1, -1), torch.zeros(1, dtype=torch.long), topk)
    return int(st["argmax"][0]), st["topk_p"], st["entropy_norm"]


def save_router(path, features: RouterFeatures, gate, meta: dict) -> None:
    """router.safetensors, then drafter.json naming it (gate.model.artifact.write_artifact)."""
    tensors = {f"feat.{k}": v for k, v in features.tensors().items()}
    tensors.update({f"gate.{k}": v for k, v in gate.state().items()})
    write_artifact(path, ROUTER_TENSORS, tensors, {**meta, "format": ROUTER_FORMAT, "features": features.config(),
                                                   "feature_names": features.names(),
                                                   "gate": {"kind": gate.kind, "config": gate.config()}})


def load_router_parts(path, meta: dict, small_info) -> tuple[RouterFeatures, object]:
    """(features, gate) of an artifact whose drafter.json (`meta`) was read and checked against the big model;
    `small_info` is checked against the small model it was trained with."""
    from safetensors.torch import load_file

    check_identity(meta["small_model"], small_info, "small", str(path))
    t = load_file(str(Path(path) / ROUTER_TENSORS))
    feats = RouterFeatures.from_tensors({k[5:]: v for k, v in t.items() if k.startswith("feat.")}, meta["features"])
    gate = GATES[meta["gate"]["kind"]].from_state({k[5:]: v for k, v in t.items() if k.startswith("gate.")},
                                                  meta["gate"]["config"])
    return feats, gate


class RouterDrafter(Drafter):
    """The Drafter contract over the small model and a trained router: candidate = the small model's argmax,
    score = the router's probability that the big model agrees, through its precision map (`maps`: a SourceMaps
    without a copy rule, gate/model/precision.py; an artifact from before the maps: the probability as it is)."""

    def __init__(self, features: RouterFeatures, gate, threshold: float, max_skip: int, small: Backend,
                 small_layer: int, big_layer: int | None, copy_max_n: int = MAX_N, meta: dict | None = None,
                 maps: SourceMaps | None = None):
        self.features, self.gate, self.maps = features, gate, maps
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
        raw = self.gate.score(X).reshape(1).numpy()
        score = float(combine_sources(np.array([tok]), raw, np.array([copy_tok]), np.array([copy_len]),
                                      self.maps)[1][0])
        return tok, (score if since_big < self.max_skip else 0.0)

    @classmethod
    def load(cls, path: Path, meta: dict, small: tuple[Backend, ModelInfo] | None = None) -> "RouterDrafter":
        """The router of a folder whose drafter.json (`meta`) gate/model/load.py read and checked against the big
        model, over its small model `small` = (backend, ModelInfo); refuses another small model (check_identity)."""
        if small is None:   # it runs the small model: a decode runtime opens it (gate/decode/drafters.py)
            raise ArtifactError(f"{path}: a router for a big/small pair needs its small model "
                                f"({meta['small_model']['name']}); decode with it through infer.py or bench/decode.py "
                                "(--policy gate --gate PATH), which open it")
        backend, info = small
        feats, gate = load_router_parts(path, meta, info)
        big_layer = meta["hidden_layer"] if meta["features"]["big_hidden"] else None
        return cls(feats, gate, meta["threshold"], meta["max_skip"], backend, meta["small_model"]["n_layers"],
                   big_layer, meta.get("copy_max_n", MAX_N), meta, router_maps(meta, path))


def router_maps(meta: dict, path="") -> SourceMaps | None:
    """The primary gate's precision map of a router's drafter.json (None: an artifact from before the maps)."""
    try:
        maps = maps_from_meta(meta, path)
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    return None if maps is None else maps[meta.get("primary_gate")]


ROUTER = Format(ROUTER_FORMAT, "a router for a big/small pair (train.py fit --drafter router)",
                ("small_model", "gate", "features", "threshold"), RouterDrafter.load)

__all__ = ["RouterFeatures", "Projection", "RouterDrafter", "ROUTER", "model_identity", "check_identity",
           "save_router", "load_router_parts", "router_maps", "ROUTER_FORMAT", "small_stats"]
