"""The heads drafter (`train.py fit`): a Predictor (word head, future heads, PCA, n-gram table) and trained
gates, with the copy rule; its artifact format skipgate-drafter/1. Scores are estimated precisions
(gate/model/precision.py: the maps in drafter.json); an artifact from before them keeps its copy trust table.

    tok, score = drafter.propose(ids, hidden, since_big)   # hidden: the big model's state at hidden_layer at
                                                           # the last position p it computed (ids: p + 1 + since_big)
Proposals are trained and calibrated for since_big = 1 .. max_skip - 1; beyond, propose still returns a
candidate but with score 0.0 (never skip). Folder: drafter.json + drafter.safetensors (gate/model/artifact.py);
load it with gate/model/load.py. docs/drafters.md describes the predictor, its features and the folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gate.model.artifact import ArtifactError, Format, write_artifact
from gate.model.base import Drafter
from gate.model.copyrule import CopyIndex
from gate.model.features import GATES, NEVER, NGRAM_ORDERS, compute_features, feature_names, pick_candidate
from gate.model.heads import ContextIndex, FutureHeads, HiddenNorm, NgramTable, WordHead
from gate.model.precision import SourceMaps, combine_sources, maps_meta
from gate.model.precision import maps_from_meta as precision_maps_from_meta

FORMAT = "skipgate-drafter/1"
TENSOR_FILE = "drafter.safetensors"


class Predictor:
    """Word head + future heads + PCA + token tables: (context, stale hidden, since_big) -> candidate, features."""

    def __init__(self, word: WordHead, future: FutureHeads, norm: HiddenNorm, rids: torch.Tensor,
                 tables: dict[str, np.ndarray], pca_mean: torch.Tensor, pca_proj: torch.Tensor,
                 mode: str = "word", max_s: int = 3, ngram=None):
        self.word, self.future, self.norm = word.eval(), future.eval(), norm
        self.rids = rids.long()
        self.tables = {"kind": np.asarray(tables["kind"], dtype=np.int8),
                       "cls": np.asarray(tables["cls"], dtype=np.int8),
                       "ends_alnum": np.asarray(tables["ends_alnum"], dtype=bool)}
        self.pca_mean, self.pca_proj = pca_mean.float(), pca_proj.float()
        self.mode, self.max_s = mode, max_s
        self.n_ctx, self.pad = word.n_ctx, word.pad
        self.ngram = ngram
        self.rmap = np.full(word.vocab_size, len(self.rids), dtype=np.int64)
        self.rmap[self.rids.numpy()] = np.arange(len(self.rids))

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.max_s, self.pca_proj.shape[1])

    def context(self, ids: Sequence[int]) -> torch.Tensor:
        ctx = list(ids[-self.n_ctx:])
        return torch.tensor([self.pad] * (self.n_ctx - len(ctx)) + ctx, dtype=torch.long)

    @torch.inference_mode()
    def run(self, ctx: torch.Tensor, hidden: torch.Tensor, s: torch.Tensor, copy: dict | None = None,
            mode: str | None = None) -> dict:
        """ctx [B, N] (pad = vocab_size), hidden [B, D] raw big hidden at p, s [B] since_big (clamped to max_s),
        copy: in-context copy statistics per order (gate.model.heads.ContextIndex / context_copy_stats)."""
        s = s.long().clamp(1, self.max_s)
        hn = self.norm(hidden.float())
        pw = torch.softmax(self.word(ctx.long(), hn, s).float(), -1)
        pf = torch.softmax(self.future(hn, s).float(), -1)
        z = (hn - self.pca_mean) @ self.pca_proj
        ng = self.ngram.lookup(ctx.numpy(), self.pad) if self.ngram is not None else None
        out = compute_features(pw, pf, mode or self.mode, self.rids, self.rmap, ctx[:, -1].long(), s, z,
                               self.tables, self.max_s, ng, copy)
        out["pw"], out["pf"] = pw, pf
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {f"word.{k}": v for k, v in self.word.state_dict().items()}
        t.update({f"future.{k}": v for k, v in self.future.state_dict().items()})
        t.update({"norm.mean": self.norm.mean, "norm.std": self.norm.std, "rids": self.rids,
                  "pca.mean": self.pca_mean, "pca.proj": self.pca_proj})
        t.update({f"tables.{k}": torch.from_numpy(v.copy()) for k, v in self.tables.items()})
        if self.ngram is not None:
            t.update({f"ngram.{k}": v for k, v in self.ngram.tensors().items()})
        return t

    def config(self) -> dict:
        return {"word": self.word.config(), "future": self.future.config(), "mode": self.mode,
                "max_s": self.max_s, "n_restricted": int(len(self.rids)), "n_pca": int(self.pca_proj.shape[1]),
                "ngram_entries": self.ngram.n_entries() if self.ngram is not None else 0}

    @classmethod
    def from_tensors(cls, t: dict, cfg: dict) -> "Predictor":
        word = WordHead(**cfg["word"])
        word.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("word.")})
        future = FutureHeads(**cfg["future"])
        future.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("future.")})
        norm = HiddenNorm(len(t["norm.mean"]), t["norm.mean"], t["norm.std"])
        tables = {k[7:]: v.numpy() for k, v in t.items() if k.startswith("tables.")}
        ng = {k[6:]: v for k, v in t.items() if k.startswith("ngram.")}
        ngram = NgramTable.from_tensors(ng, cfg["word"]["vocab_size"]) if ng else None
        return cls(word, future, norm, t["rids"], tables, t["pca.mean"], t["pca.proj"], cfg["mode"], cfg["max_s"],
                   ngram)

    def cost(self, big_params: int | None = None) -> dict:
        w, f = self.word.flops_per_token(), self.future.flops_per_token()
        out = {"word_head_params": self.word.n_params(), "future_heads_params": self.future.n_params(),
               "word_head_flops_per_token": w, "future_head_flops_per_token": f,
               "drafter_flops_per_token": w + f + 2 * self.pca_proj.numel()}
        if big_params:
            out["big_flops_per_token"] = 2 * big_params
            out["drafter_flops_vs_big"] = out["drafter_flops_per_token"] / (2 * big_params)
        return out


class HeadsDrafter(Drafter):
    """The Drafter contract (gate/model/base.py) around a Predictor and trained gates."""

    def __init__(self, predictor: Predictor, gates: dict, primary: str, threshold: float, max_skip: int,
                 hidden_layer: int, meta: dict | None = None, copy_trust: np.ndarray | None = None,
                 maps: dict | None = None):
        self.predictor, self.gates, self.primary = predictor, gates, primary
        self.threshold, self.max_skip, self.hidden_layer = float(threshold), int(max_skip), int(hidden_layer)
        self.meta = meta or {}
        self.index = ContextIndex(NGRAM_ORDERS)
        # {gate: SourceMaps}: each gate's and the copy rule's scores as estimated precisions (gate.model.precision);
        # without them, an older artifact: the copy rule's trust per match length (copy_trust), or None: an
        # artifact from before the copy rule was part of the drafter, which proposes what its gate picks alone
        self.maps = maps
        self.copy_trust = None if copy_trust is None or maps else np.asarray(copy_trust, dtype=np.float32)
        sc = self.scoring           # the copy index it reads
        if isinstance(sc, SourceMaps):
            self.copies, self.extend = (CopyIndex(sc.max_n), sc.extend) if sc.max_n > 0 else (None, 0)
        else:
            self.copies, self.extend = (CopyIndex(len(sc) - 1), 0) if sc is not None else (None, 0)

    @property
    def scoring(self):
        """What gate.model.precision.combine_sources takes for the primary gate: SourceMaps, a trust table or None."""
        return self.maps[self.primary] if self.maps else self.copy_trust

    @property
    def scoring_by_gate(self):
        """{gate: SourceMaps}, or the older artifact's trust table (or None) for every gate."""
        return self.maps if self.maps else self.copy_trust

    def start(self) -> None:
        """A new text begins (the decode policy calls this): forget the in-context copy statistics."""
        self.index.reset()
        if self.copies is not None:
            self.copies.reset()

    @property
    def gate(self):
        return self.gates[self.primary]

    def score(self, out: dict, gate: str | None = None) -> torch.Tensor:
        """Gate scores [B, K] for the candidates of Predictor.run's output."""
        X = out["X"]
        return self.gates[gate or self.primary].score(X.reshape(-1, X.shape[-1])).reshape(X.shape[:2])

    def propose(self, ids: Sequence[int], hidden: torch.Tensor, since_big: int) -> tuple[int, float]:
        if since_big < 1:
            raise ValueError(f"since_big must be >= 1 (got {since_big}): the big model's own token comes first")
        if hidden is None:
            raise ValueError(f"the drafter needs the big model's hidden state at layer {self.hidden_layer}")
        if not ids:
            raise ValueError("empty ids")
        self.index.sync(ids)
        tops, ps, tots = self.index.query()
        copy = {}
        for n in range(len(tops)):
            copy[f"top{n + 1}"], copy[f"p{n + 1}"], copy[f"n{n + 1}"] = (np.array([tops[n]]), np.array([ps[n]]),
                                                                         np.array([tots[n]]))
        h = torch.as_tensor(hidden).reshape(1, -1)
        out = self.predictor.run(self.predictor.context(ids)[None], h, torch.tensor([since_big]), copy)
        _, tok, score = pick_candidate(self.score(out), out)
        copy_tok, copy_len = -1, 0
        if self.copies is not None:
            self.copies.sync(ids)
            copy_tok, copy_len = self.copies.query(self.extend)
        tok, score, _ = combine_sources(tok, score, np.array([copy_tok]), np.array([copy_len]), self.scoring)
        score = float(score[0])
        if since_big >= self.max_skip:
            score = 0.0
        return int(tok[0]), score

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        tensors = {f"pred.{k}": v for k, v in self.predictor.tensors().items()}
        for name, g in self.gates.items():
            tensors.update({f"gate.{name}.{k}": v for k, v in g.state().items()})
        meta = dict(self.meta)
        meta.update(format=FORMAT, hidden_layer=self.hidden_layer, max_skip=self.max_skip,
                    threshold=self.threshold, primary_gate=self.primary,
                    gates={n: {"kind": g.kind, "config": g.config()} for n, g in self.gates.items()},
                    predictor=self.predictor.config(), features=self.predictor.feature_names,
                    copy_trust=None if self.copy_trust is None else [float(x) for x in self.copy_trust])
        if self.maps:
            meta["precision_maps"] = maps_meta(self.maps, self.meta.get("precision_maps"))
        self.meta = write_artifact(path, TENSOR_FILE, tensors, meta)
        return Path(path)

    @classmethod
    def load(cls, path: Path, meta: dict, small=None) -> "HeadsDrafter":
        """The drafter of a folder whose drafter.json (`meta`) gate/model/load.py read and checked."""
        from safetensors.torch import load_file

        t = load_file(str(path / TENSOR_FILE))
        pred = Predictor.from_tensors({k[5:]: v for k, v in t.items() if k.startswith("pred.")}, meta["predictor"])
        gates = {}
        for name, g in meta["gates"].items():
            pre = f"gate.{name}."
            gates[name] = GATES[g["kind"]].from_state({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)},
                                                      g["config"])
        return cls(pred, gates, meta["primary_gate"], meta.get("threshold", NEVER), meta["max_skip"],
                   meta["hidden_layer"], meta, meta.get("copy_trust"), maps_from_meta(meta, path))


def maps_from_meta(meta: dict, path="") -> dict | None:
    """{gate: SourceMaps} from drafter.json (None: an artifact from before the maps); ArtifactError if unreadable."""
    try:
        return precision_maps_from_meta(meta, path)
    except ValueError as e:
        raise ArtifactError(str(e)) from None


HEADS = Format(FORMAT, "the heads drafter (train.py fit)", ("predictor", "gates", "primary_gate"), HeadsDrafter.load)

__all__ = ["HeadsDrafter", "Predictor", "HEADS", "FORMAT", "TENSOR_FILE", "maps_meta", "maps_from_meta"]
